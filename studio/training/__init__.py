"""The training run: loop, callbacks, stages, coach, multi-process launch."""
