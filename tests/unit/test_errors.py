"""One error base with exit codes, one mapping to an exit status: what `studio` exits with is decided by
the kind of error, in one place (studio.cli.common.exits_cleanly)."""

import ast
import importlib
from pathlib import Path

import pytest

from studio.cli.common import UsageError, exits_cleanly
from studio.core.config import ConfigError
from studio.core.errors import ExitCode, StudioError

STUDIO = Path(__file__).resolve().parents[2] / "studio"


def error_classes():
    """Every class named *Error defined in studio/, as (module, name)."""
    for path in sorted(STUDIO.rglob("*.py")):
        module = ".".join(path.relative_to(STUDIO.parent).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and "ui" not in module.split("."):
                yield module, node.name


@pytest.mark.parametrize(("module", "name"), list(error_classes()))
def test_every_engine_error_is_a_studio_error(module, name):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, StudioError), f"{module}.{name} must derive from studio.core.errors.StudioError"
    assert cls.exit_code in (ExitCode.FAILED, ExitCode.BAD_INPUT)


def test_one_mapping_turns_errors_into_one_line_and_their_exit_status(capsys):
    @exits_cleanly
    def command(error: Exception | None) -> int:
        if error:
            raise error
        return 0

    from studio.runs.queue import JobError

    assert command(None) == 0
    assert command(UsageError("--set takes KEY=VALUE,\n  got 'x'")) == 2
    assert capsys.readouterr().err == "error: --set takes KEY=VALUE, got 'x'\n"  # bad input: one line
    assert command(JobError("the run failed:\nTraceback line")) == 1
    assert capsys.readouterr().err == "error: the run failed:\nTraceback line\n"  # a failure keeps its lines
    assert command(ConfigError(["lora.r must be ...", "lora.alpha must be ..."])) == 2
    assert capsys.readouterr().err == "error: lora.r must be ...; lora.alpha must be ...\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as a user error
        command(ZeroDivisionError("bug"))
