"""Access control on a real `studio serve`: a network bind needs a password, the password guards the
page and the API alike, and a network-facing server reads no file outside its allowed roots."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.e2e.conftest import REPO, Server, stop_workers

pytestmark = pytest.mark.e2e


def test_network_bind_without_auth_is_refused(tmp_path):
    env = dict(os.environ, STUDIO_HOME=str(tmp_path / "home"))
    env.pop("STUDIO_AUTH", None)
    out = subprocess.run(
        [sys.executable, "-m", "studio.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: Refusing to listen on 0.0.0.0 without authentication")
    assert "--auth" in out.stderr and "--insecure" in out.stderr


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    home = tmp_path_factory.mktemp("guarded-home")
    # Bound to all interfaces (the traffic here stays on loopback), so the network rules apply.
    srv = Server(home, ["--host", "0.0.0.0", "--auth", "ann:s3cret"])
    srv.url = f"http://127.0.0.1:{srv.port}/"
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        stop_workers(home)


def test_api_without_credentials_is_rejected(guarded):
    from gradio_client import Client

    with pytest.raises(Exception) as err:
        Client(guarded.url, verbose=False).predict(api_name="/list_runs")
    assert "401" in str(err.value) or "auth" in str(err.value).lower() or "login" in str(err.value).lower()
    with pytest.raises(Exception):  # noqa: B017
        Client(guarded.url, auth=("ann", "wrong"), verbose=False)


def test_page_without_credentials_shows_only_the_login(guarded):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(guarded.url + "config", timeout=10)  # the app's layout and endpoints
    assert err.value.code == 401
    with urllib.request.urlopen(guarded.url, timeout=10) as resp:
        page = resp.read().decode()
    assert "train-start" not in page and "ds-upload" not in page


def test_with_credentials_works_and_paths_outside_the_roots_are_refused(guarded, tmp_path):
    from gradio_client import Client

    client = Client(guarded.url, auth=("ann", "s3cret"), verbose=False)
    assert isinstance(client.predict(api_name="/list_runs"), (list, dict))
    secret = tmp_path / "secret.json"
    secret.write_text('[{"instruction": "q", "output": "a"}]')
    message, *_ = client.predict(None, str(secret), "auto", api_name="/check_dataset")
    assert "outside the folders this server may read" in message and str(secret) in message
    inside = REPO / "datasets" / "studio_facts.json"  # the bundled samples are an allowed root
    message, *_ = client.predict(None, str(inside), "auto", api_name="/check_dataset")
    assert "Ready to register" in message
