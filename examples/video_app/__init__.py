"""The host app jobflow's design came from: coaches upload session videos.

FastAPI with SQLAlchemy's ``AsyncSession`` on PostgreSQL (or SQLite) and
uploads straight from the browser to S3 (or, on the embedded defaults, to a
local folder through the app). :mod:`~examples.video_app.app` holds the
routes, :mod:`~examples.video_app.worker` the handler ``jobflow worker``
runs, :mod:`~examples.video_app.setup` the bucket's set-up.
``README.md`` beside this file says how to run it; ``docs/fastapi.md``
explains it.
"""
