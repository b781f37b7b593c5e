"""Every client test runs twice: on the local engine, and through a real ``signal serve`` (uvicorn on
127.0.0.1, an ephemeral port, in a thread of this process) over the *same* engine — so tests that look at the
engine's runs see the remote client's runs too."""
import asyncio

import pytest

from signalrl.client import AsyncSignalClient, SignalClient
from signalrl.engine import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine(str(tmp_path_factory.mktemp("client-engine")))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    """``(url, api_key)`` of a server on ``engine``."""
    pytest.importorskip("fastapi")
    from signalrl.server import Service, auth
    from signalrl.server.thread import ServerThread

    service = Service(str(tmp_path_factory.mktemp("server")), engine=engine)
    _, key = auth.create_key(service.store, "client-tests")
    thread = ServerThread(service)
    url = thread.start()
    yield url, key
    thread.stop()


REMOTE_OPTIONS = dict(retry_deadline=30, result_timeout=300, poll_hold=5)


@pytest.fixture(params=["local", "remote"])
def client(request, engine):
    if request.param == "local":
        yield AsyncSignalClient(engine=engine)
        return
    url, key = request.getfixturevalue("server")
    c = AsyncSignalClient(base_url=url, api_key=key, **REMOTE_OPTIONS)
    yield c
    asyncio.run(c.close())


@pytest.fixture(params=["local", "remote"])
def sync_client(request, engine):
    if request.param == "local":
        yield SignalClient(engine=engine)
        return
    url, key = request.getfixturevalue("server")
    c = SignalClient(base_url=url, api_key=key, **REMOTE_OPTIONS)
    yield c
    c.close()


@pytest.fixture
def sft_batch():
    return [{"prompt": "2+2=", "response": "4"}, {"prompt": "3+3=", "response": "6"},
            {"prompt": "hello ", "response": "world"}]
