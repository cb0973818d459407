"""Launch the studio: `python app.py` (the same as `studio serve`)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from studio.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["serve"]))  # the same edge as `studio serve`: host, port, auth and policy from it
