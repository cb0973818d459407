"""Rules that keep the studio safe and its layers apart, checked on the source itself."""

import ast
from pathlib import Path

STUDIO = Path(__file__).resolve().parents[2] / "studio"


def python_files():
    return sorted(STUDIO.rglob("*.py"))


def test_no_subprocess_goes_through_a_shell():
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    assert not (kw.arg == "shell" and getattr(kw.value, "value", False) is True), path
                func = getattr(node.func, "attr", "")
                assert func not in ("system", "popen") or "os" not in ast.unparse(node.func), path


def test_the_engine_never_imports_gradio():
    for path in python_files():
        if "ui" in path.relative_to(STUDIO).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "gradio" or n.startswith(("gradio.", "gradio_client")) for n in names), path


def test_the_engine_never_prints():
    # Below the faces (cli, ui) output is data: returned, logged to a run's log, or sent over a child's pipe.
    for path in python_files():
        if {"ui", "cli"} & set(path.relative_to(STUDIO).parts):
            continue
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        assert not [n.lineno for n in calls if isinstance(n.func, ast.Name) and n.func.id == "print"], path


def test_remote_code_is_off_unless_asked():
    from studio.core.config import ModelSpec

    assert ModelSpec().trust_remote_code is False
    for path in python_files():
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
