"""Foundations every layer may use: config, errors, workspace paths, the run store, processes."""
