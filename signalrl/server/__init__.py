"""``signal serve``: the engine behind an HTTP API (FastAPI + uvicorn), with API keys, run ownership, an ordered and
idempotent request log in SQLite, long-polled results, and restarts that lose nothing. See docs/server.md.

Nothing below this package knows about HTTP; :mod:`.service` is the server without it, :mod:`.app` the routes.
"""
from .service import Service, Settings

__all__ = ["Service", "Settings", "create_app"]


def create_app(service: Service):
    from .app import create_app as make

    return make(service)
