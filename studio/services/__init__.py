"""Long-lived helpers in child processes: chat, the workspace check."""
