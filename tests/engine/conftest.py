import pytest

from signalrl.engine import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine(str(tmp_path_factory.mktemp("engine")))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def make_run(engine):
    def make(**config):
        info = engine.create_run(**config).result()
        return engine._run(info["run_id"])

    return make
