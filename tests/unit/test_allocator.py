"""Allocator choice for the child processes: which library, in which order, and the environment they get."""

from __future__ import annotations

import subprocess
import sys

import pytest

from studio.core.allocator import Allocator, allocator_of, child_env, choose_allocator, find_library, loaded_allocator


@pytest.fixture
def libdir(tmp_path):
    def make(*names: str):
        for name in names:
            (tmp_path / name).write_bytes(b"")
        return [tmp_path]

    return make


def test_auto_prefers_tcmalloc_then_jemalloc(libdir):
    dirs = libdir("libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    assert choose_allocator("auto", dirs, "linux").name == "tcmalloc"
    (dirs[0] / "libtcmalloc_minimal.so.4").unlink()
    chosen = choose_allocator("auto", dirs, "linux")
    assert chosen == Allocator("jemalloc", dirs[0] / "libjemalloc.so.2")


def test_nothing_installed_falls_back_with_the_fix(libdir):
    chosen = choose_allocator("auto", libdir(), "linux")
    assert chosen.path is None and chosen.name == "system"
    assert "libtcmalloc-minimal4" in chosen.note


def test_explicit_choice_missing_or_unknown_or_system(libdir):
    dirs = libdir("libtcmalloc_minimal.so.4")
    assert "jemalloc not found" in choose_allocator("jemalloc", dirs, "linux").note
    assert choose_allocator("system", dirs, "linux") == Allocator("system", None)
    odd = choose_allocator("mimalloc", dirs, "linux")
    assert odd.path is None and "'mimalloc' is not one of auto, tcmalloc, jemalloc, system" in odd.note
    assert choose_allocator("auto", dirs, "darwin").path is None


def test_environment_variable_is_the_default(libdir, monkeypatch):
    dirs = libdir("libtcmalloc_minimal.so.4")
    monkeypatch.setenv("STUDIO_ALLOCATOR", "system")
    assert choose_allocator(None, dirs, "linux").name == "system"


def test_child_env_puts_the_allocator_first_once(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    alloc = Allocator("tcmalloc", lib)
    env = child_env({"LD_PRELOAD": f"/x/libfoo.so:{lib}", "A": "1"}, alloc)
    assert env["LD_PRELOAD"] == f"{lib}:/x/libfoo.so" and env["A"] == "1"
    assert "LD_PRELOAD" not in child_env({"A": "1"}, Allocator("system", None))


def test_the_allocator_is_read_from_the_memory_map():
    assert allocator_of(["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10", "/usr/lib/libc.so.6"]) == "tcmalloc"
    assert allocator_of(["/usr/lib/x86_64-linux-gnu/libc.so.6"]) == "system"
    assert loaded_allocator() in ("system", "tcmalloc", "jemalloc")  # this process's own map, through psutil


@pytest.mark.skipif(find_library("tcmalloc") is None, reason="libtcmalloc-minimal4 is not installed")
def test_a_child_really_runs_under_the_preloaded_allocator():
    code = "from studio.core.allocator import loaded_allocator; print(loaded_allocator())"
    env = child_env({"PATH": "/usr/bin:/bin"}, choose_allocator("tcmalloc"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tcmalloc"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={})
    assert plain.stdout.strip() == "system"
