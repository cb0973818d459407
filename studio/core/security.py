"""Who may use a served studio, and which files a remote user may make it read.

A studio on 127.0.0.1 serves only this machine's user, who can read their own files anyway. Bound to
another address it serves a network: it then needs a password, and paths typed into the page (model
folders, dataset files) are limited to allowed roots, so nobody can make the server read /etc/shadow
as a "dataset".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from studio.core.errors import StudioError

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
ROOTS_ENV = "STUDIO_ALLOWED_ROOTS"


class AccessError(StudioError, ValueError):
    """A serve setting that would expose the studio, or a path outside the allowed roots."""


def is_local_host(host: str) -> bool:
    return host in LOCAL_HOSTS or host.startswith("127.")


def parse_auth(spec: str) -> list[tuple[str, str]]:
    """'user:pass' or 'u1:p1,u2:p2' (one pair per line in a file works too)."""
    pairs = []
    for item in spec.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise AccessError(f"Authentication must be given as user:password, got '{item.split(':')[0]}:...'.")
        pairs.append((user, password))
    if not pairs:
        raise AccessError("Authentication is empty: give user:password.")
    return pairs


def load_auth(cli_value: str | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """From --auth, else --auth-file, else the STUDIO_AUTH / STUDIO_AUTH_FILE variables; None if none."""
    spec = cli_value or os.environ.get("STUDIO_AUTH")
    path = auth_file or os.environ.get("STUDIO_AUTH_FILE")
    if spec:
        return parse_auth(spec)
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise AccessError(f"Auth file '{path}' does not exist. Write user:password lines into it.")
        return parse_auth(file.read_text())
    return None


@dataclass(frozen=True)
class ServePolicy:
    host: str
    auth: list[tuple[str, str]] | None
    allowed_roots: list[Path] | None  # None: the local user, no restriction


def serve_policy(host: str, auth: list[tuple[str, str]] | None, insecure: bool, roots: list[Path]) -> ServePolicy:
    """Refuse to serve a network without a password unless the user insists (--insecure)."""
    if is_local_host(host):
        return ServePolicy(host, auth, None)
    if auth is None and not insecure:
        raise AccessError(
            f"Refusing to listen on {host} without authentication: anyone who can reach this machine could "
            "train, chat and read files. Give --auth user:password (or STUDIO_AUTH / --auth-file), or pass "
            "--insecure if this network is yours alone."
        )
    return ServePolicy(host, auth, [Path(r).resolve() for r in roots])


def allowed_roots() -> list[Path] | None:
    value = os.environ.get(ROOTS_ENV)
    if not value:
        return None
    return [Path(p).resolve() for p in value.split(os.pathsep) if p]


def ensure_allowed(path: str | Path, what: str) -> Path:
    """Return the resolved path, or raise AccessError if a network-facing server may not read it."""
    resolved = Path(path).expanduser().resolve()
    roots = allowed_roots()
    if roots is None:
        return resolved
    if any(resolved == root or root in resolved.parents for root in roots):
        return resolved
    shown = ", ".join(str(r) for r in roots)
    raise AccessError(
        f"{what} '{path}' is outside the folders this server may read ({shown}). Copy it under one of them, "
        "or start the server with --allow-root DIR."
    )
