"""Runs as jobs: the pre-submit check, the queue, sweeps, the worker process."""
