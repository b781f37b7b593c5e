import pytest

from signalrl.client import AsyncSignalClient
from signalrl.engine import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine(str(tmp_path_factory.mktemp("client-engine")))
    yield eng
    eng.close()


@pytest.fixture
def client(engine):
    return AsyncSignalClient(engine=engine)


@pytest.fixture
def sft_batch():
    return [{"prompt": "2+2=", "response": "4"}, {"prompt": "3+3=", "response": "6"},
            {"prompt": "hello ", "response": "world"}]
