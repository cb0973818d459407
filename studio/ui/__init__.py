"""The browser UI: wiring only. Widgets become engine dataclasses; the engine does the work."""
