"""``python -m examples.video_app``: serve the app with uvicorn, configured from
the environment (see :mod:`examples.video_app.settings`)."""

from __future__ import annotations

import uvicorn

from examples.video_app.app import create_app
from examples.video_app.settings import Settings


def main() -> None:
    settings = Settings.from_env()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
