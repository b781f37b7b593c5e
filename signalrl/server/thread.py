"""A server on a background thread of this process (tests, benchmarks, notebooks): ``with ServerThread(service)
as url: ...``. Binds 127.0.0.1 on an ephemeral port unless told otherwise."""
from __future__ import annotations

import threading
import time

from .cli import _bind
from .service import Service


class ServerThread:
    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        from . import create_app

        self.service = service
        self._sock = _bind(host, port)
        host, port = self._sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="signal-server", daemon=True)

    def start(self, timeout: float = 60.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start within {timeout:g} s")
            time.sleep(0.01)
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
