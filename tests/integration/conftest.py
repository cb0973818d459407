"""Fixtures for the integration tests: a job manager over the test's own workspace that leaves no
worker behind, whatever the test did."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from studio.core.store import RunStatus
from studio.runs.queue import JobManager


@pytest.fixture
def jobs(home):
    manager = JobManager(home, slots=1)  # one worker at a time: the CI machine has two cores
    yield manager
    for run in manager.store.list_runs(RunStatus.RUNNING):
        if run.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGKILL)
