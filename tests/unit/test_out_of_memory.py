"""Out-of-memory is recognised by the exception's type (and the CPU allocator's own failure), not by
words in a message; the worker then tells the user what to change."""

from __future__ import annotations

import pytest
import torch

from studio.runs.worker import explain
from studio.training.errors import TrainingError, is_out_of_memory


def cpu_allocator_failure() -> RuntimeError:
    """A real refusal of torch's CPU allocator: 1 EiB is more than any address space."""
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**60, dtype=torch.uint8)
    return caught.value


def test_allocation_failures_are_out_of_memory_by_type():
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(cpu_allocator_failure())


def test_other_errors_mentioning_memory_are_not_out_of_memory():
    assert not is_out_of_memory(RuntimeError("the cache ran out of memory slots"))
    assert not is_out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))  # not torch's error
    assert not is_out_of_memory(TrainingError("Lower train.batch_size"))


def test_the_worker_says_what_to_change_on_out_of_memory():
    for err in (cpu_allocator_failure(), MemoryError(), torch.OutOfMemoryError("CUDA out of memory.")):
        message = explain(err)
        assert message.startswith("Out of memory (") and "train.batch_size" in message
    assert explain(RuntimeError("ran out of memory slots")) == "RuntimeError: ran out of memory slots"
