"""Server tests: protocol and auth in-process through httpx's ASGI transport (``_asgi.asgi``), real servers on
127.0.0.1 where a socket matters. Every wait is bounded. Helpers live in ``_asgi.py`` and ``_proc.py`` (a
``conftest`` module name is shared with tests/client, so nothing is imported from here)."""
import importlib.util

import pytest

from signalrl.engine import Engine

if importlib.util.find_spec("fastapi") is None:
    # Skipped raised by a conftest aborts a whole run that names this folder, so the folder's modules are left out
    collect_ignore_glob = ["test_*.py"]
else:
    from _asgi import engine_process_env
    from signalrl.server import Service, Settings


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine(str(tmp_path_factory.mktemp("server-engine")))
    yield eng
    eng.close()


@pytest.fixture(params=["thread", "process"])
def service(request, tmp_path, monkeypatch):
    """A service with its engine on a worker thread (the module's shared engine) or in an engine process."""
    settings = Settings(max_body_bytes=1 << 20, max_hold_s=20)
    if request.param == "process":
        engine_process_env(monkeypatch)
        return Service(str(tmp_path / "root"), settings=settings, engine_process=True)
    return Service(str(tmp_path / "root"), engine=request.getfixturevalue("engine"), settings=settings)
