"""How a training run fails: the error a run raises itself, and recognising out-of-memory by its type."""

from __future__ import annotations

from studio.core.errors import ExitCode, StudioError


class TrainingError(StudioError, RuntimeError):
    """A run cannot start or continue; the message says why and what to change."""

    exit_code = ExitCode.FAILED


# The one allocator failure without a type of its own: torch's CPU allocator raises a plain RuntimeError
# (a c10 enforce failure) naming itself; CUDA, MPS and XPU raise torch.OutOfMemoryError.
_CPU_ALLOCATOR = "DefaultCPUAllocator: can't allocate memory"


def is_out_of_memory(err: BaseException) -> bool:
    """True when `err` is an allocation that failed: torch.OutOfMemoryError (the same class as
    torch.cuda.OutOfMemoryError), Python's MemoryError, or torch's CPU allocator refusing."""
    if isinstance(err, MemoryError):
        return True
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    return type(err) is RuntimeError and _CPU_ALLOCATOR in str(err)
