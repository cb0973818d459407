"""Launch the studio: `python app.py` (the same as `studio serve`)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from studio.ui.app import launch

if __name__ == "__main__":
    raise SystemExit(
        launch(host=os.environ.get("STUDIO_HOST", "127.0.0.1"), port=int(os.environ.get("STUDIO_PORT", "7860")))
    )
