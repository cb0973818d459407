import pytest

from studio.core.security import AccessError, ensure_allowed, is_local_host, load_auth, parse_auth, serve_policy


def test_auth_forms():
    assert parse_auth("ann:pw1") == [("ann", "pw1")]
    assert parse_auth("ann:pw1, bob:p:w") == [("ann", "pw1"), ("bob", "p:w")]  # a password may hold ':'
    for bad in ("", "ann", "ann:", ":pw"):
        with pytest.raises(AccessError):
            parse_auth(bad)


def test_auth_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.delenv("STUDIO_AUTH", raising=False)
    assert load_auth(None, None) is None
    monkeypatch.setenv("STUDIO_AUTH", "env:pw")
    assert load_auth(None, None) == [("env", "pw")]
    assert load_auth("cli:pw", None) == [("cli", "pw")]  # the flag wins
    monkeypatch.delenv("STUDIO_AUTH")
    f = tmp_path / "users"
    f.write_text("# users\nann:pw1\nbob:pw2\n")
    assert load_auth(None, str(f)) == [("ann", "pw1"), ("bob", "pw2")]
    with pytest.raises(AccessError, match="does not exist"):
        load_auth(None, str(tmp_path / "missing"))


def test_local_host_needs_nothing_and_is_unrestricted():
    assert is_local_host("127.0.0.1") and is_local_host("localhost") and not is_local_host("0.0.0.0")
    policy = serve_policy("127.0.0.1", None, False, [])
    assert policy.allowed_roots is None and policy.auth is None


def test_network_host_refuses_without_auth_unless_insecure(tmp_path):
    with pytest.raises(AccessError, match="without authentication"):
        serve_policy("0.0.0.0", None, False, [tmp_path])
    assert serve_policy("0.0.0.0", None, True, [tmp_path]).allowed_roots == [tmp_path.resolve()]
    assert serve_policy("0.0.0.0", [("a", "b")], False, [tmp_path]).auth == [("a", "b")]


def test_paths_outside_the_roots_are_refused(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    monkeypatch.delenv("STUDIO_ALLOWED_ROOTS", raising=False)
    assert ensure_allowed("/etc/passwd", "File") == ensure_allowed("/etc/passwd", "File")  # unrestricted
    monkeypatch.setenv("STUDIO_ALLOWED_ROOTS", str(root))
    assert ensure_allowed(root / "data" / "x.json", "File") == (root / "data" / "x.json").resolve()
    for outside in ("/etc/passwd", root / ".." / "elsewhere.json", tmp_path / "rootx" / "a.json"):
        with pytest.raises(AccessError, match="outside the folders"):
            ensure_allowed(outside, "File")


def test_symlink_out_of_a_root_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.json"
    secret.write_text("[]")
    (root / "link.json").symlink_to(secret)
    monkeypatch.setenv("STUDIO_ALLOWED_ROOTS", str(root))
    with pytest.raises(AccessError):
        ensure_allowed(root / "link.json", "File")


def test_export_folder_names_cannot_escape(home):
    from studio.ui.common import UIContext
    from studio.ui.export import target_dir

    ctx = UIContext(home)
    assert target_dir(ctx, "run1", "merged", "") == home / "exports" / "run1-merged"
    for bad in ("../x", "a/b", "..", "/etc", "x\ny", "a\x00b"):
        with pytest.raises(ValueError, match="not allowed"):
            target_dir(ctx, "run1", "merged", bad)


def test_serve_binds_loopback_by_default(monkeypatch):
    from studio.cli.main import build_parser

    monkeypatch.delenv("STUDIO_HOST", raising=False)
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 7860 and not args.insecure


def test_uploaded_file_names_cannot_place_files_outside_the_dataset_folder(home, tmp_path):
    from studio.data import DatasetRegistry

    weird = tmp_path / "..%2f..%2fescape.jsonl"  # a hostile client-side name arrives as one path component
    weird.write_text('{"instruction": "q", "output": "a"}\n')
    entry, *_ = DatasetRegistry(home).add("safe-name", weird)
    stored = (home / "datasets" / entry.file).resolve()
    assert stored.is_file() and (home / "datasets" / "safe-name") in stored.parents
    assert sorted(p.name for p in (home / "datasets").iterdir()) == ["safe-name"]


def test_model_folders_outside_the_roots_are_refused_on_a_network_server(tmp_path, monkeypatch, tiny_model_dir):
    from studio.model.loading import ModelError, resolve_model

    monkeypatch.setenv("STUDIO_ALLOWED_ROOTS", str(tmp_path))
    with pytest.raises(ModelError, match="outside the folders this server may read"):
        resolve_model(str(tiny_model_dir))
    monkeypatch.setenv("STUDIO_ALLOWED_ROOTS", str(tiny_model_dir.parent))
    assert resolve_model(str(tiny_model_dir)).kind == "local"
