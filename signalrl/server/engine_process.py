"""The engine in a child process of ``signal serve`` (its default, ``--engine process``).

**Why.** In one process the event loop and the engine's worker share one interpreter lock, so the protocol's
per-request Python (HTTP, decoding, the request log) cannot overlap the model's Python; on ``signal-tiny`` the
server process was CPU-saturated and the remote step cost ~25 % more than the local one (docs/server.md,
"Overhead"). Here the server's process keeps HTTP, keys, ownership, the acceptance of requests into the log, their
order and the long-polls; the child owns the engine through a :class:`~.runner.Runner`: it opens and restores runs,
runs requests, records their outcomes in the same SQLite file (WAL: two processes, one writer at a time) and takes
the automatic checkpoints.

**Protocol**, over two socket pairs (requests down, outcomes up; the server's event loop reads the second itself,
with no reader thread): frames ``<II`` (head length, body length), a JSON head, raw body bytes; nothing is ever
pickled. Server → child: ``{"cmd": "open" | "run" | "ask" | "close", ...}`` (a ``run``'s body is the request's
payload as accepted; an ``ask`` is ``recover``, ``run_info`` or ``queue_stats``, answered in order, so the server's
start waits for the engine's half of a restart before it takes a request). Child → server: ``{"t": "ready"}``;
``{"t": "done", "rid", "status"}`` with the outcome's bytes, sent once the outcome is committed;
``{"t": "reply", "id", "ok"}`` with the ask's JSON answer (or error document). The child reads on its main
thread, decodes the payload there and only queues work, so a ``run`` frame never waits for a running request and its
decoding overlaps the request before it.

**Lifetime.** The child dies with the server: ``PR_SET_PDEATHSIG`` (``SIGKILL``) on Linux; elsewhere it exits at
once (``os._exit``, dropping its queue) when its socket ends without a ``close``. So after ``kill -9`` of
``signal serve`` no orphan keeps writing, and the restarted server's child recovers the runs (:mod:`.recovery`)
exactly as the one-process server does. Ctrl-C is the server's to handle: the child ignores ``SIGINT`` and, on
``close``, finishes its queued work. If the child dies on its own, the server answers 503 from then on and
``signal serve`` exits with status 1, to be restarted.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import os
import signal
import socket
import queue
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from .ordering import Pending

log = logging.getLogger("signalrl.server")
_HEAD = struct.Struct("<II")
ASKS = ("recover", "run_info", "queue_stats")
_DIRECT = 1 << 16  # frames with a body up to this are tried at once, without the writer thread
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # (where the flag is missing, every frame goes to the writer)
# The child's command line: import the server's signalrl (argv[1] is its source root), then run main().
_CHILD = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from signalrl.server.engine_process import main; "
          "sys.exit(main(sys.argv[1:]))")


def frame_prefix(head: dict, body_len: int) -> bytes:
    """A frame's bytes before its body: the two lengths and the JSON head."""
    h = json.dumps(head, separators=(",", ":")).encode()
    return _HEAD.pack(len(h), body_len) + h


def send_frame(sock: socket.socket, lock: threading.Lock, head: dict, body: bytes = b"") -> None:
    prefix = frame_prefix(head, len(body))
    with lock:
        if len(body) < 65536:  # one write; a large body is not copied
            sock.sendall(prefix + body)
        else:
            sock.sendall(prefix)
            sock.sendall(body)


def read_frame(f) -> tuple[dict, bytes] | None:
    """The next frame from the buffered reader ``f``; None at the end of the stream."""
    n = f.read(_HEAD.size)
    if len(n) < _HEAD.size:
        return None
    hlen, blen = _HEAD.unpack(n)
    head, body = f.read(hlen), f.read(blen) if blen else b""
    if len(head) < hlen or len(body) < blen:
        return None
    return json.loads(head), body


class EngineProcessError(RuntimeError):
    """The engine process could not start, or is gone."""


class EngineReplyError(RuntimeError):
    """What an ``ask`` raised in the engine process: ``doc`` is its error document (``wire.encode_error``)."""

    def __init__(self, doc: dict):
        super().__init__(f"{doc.get('type', 'error')}: {doc.get('message')}")
        self.doc = doc


class EngineProcess:
    """The server's handle on its engine process: :class:`~.runner.Runner`'s methods, sent as frames (``recover``,
    ``run_info`` and ``queue_stats`` are asked with :meth:`ask` and awaited). Created on the server's event loop, which
    reads the child's frames itself (no reader thread, no hand-off): ``deliver(request_id, status, outcome)`` is called
    on the loop for every outcome, ``on_exit(returncode)`` if the child ends without being closed.

    Two socket pairs: requests go down one, outcomes come up the other, read by the loop without blocking. A request
    is written by the loop itself when the socket takes it whole at once (``MSG_DONTWAIT``), else by a writer thread,
    in order either way: the loop never waits for the child to read a large body, so neither side's writes can wait
    on the other's."""

    def __init__(self, root: str, settings, deliver: Callable[[str, str, bytes], None],
                 on_exit: Callable[[int], None] | None = None):
        import signalrl

        self.deliver, self.on_exit = deliver, on_exit
        self._loop = asyncio.get_running_loop()
        down, down_child = socket.socketpair()
        up, up_child = socket.socketpair()
        # The child imports the signalrl this process runs (a source checkout too), without changing the PYTHONPATH
        # of anything it starts.
        src = os.path.dirname(os.path.dirname(os.path.abspath(signalrl.__file__)))
        level = logging.getLevelName(logging.getLogger("signalrl.server").getEffectiveLevel())
        fds = (down_child.fileno(), up_child.fileno())
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, src, "--root", root, "--fds", f"{fds[0]},{fds[1]}",
                 "--parent", str(os.getpid()), "--log-level", str(level),
                 "--settings", json.dumps(dataclasses.asdict(settings))], pass_fds=fds)
        except BaseException:
            for sock in (down, down_child, up, up_child):
                sock.close()
            raise
        down_child.close()
        up_child.close()
        self._down, self._up = down, up
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # (head, prefix, body) for the writer thread
        self._qlock, self._queued = threading.Lock(), 0  # frames handed to the writer and not yet written
        self._buf = bytearray()
        self._asks: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._ready: asyncio.Future = self._loop.create_future()
        self._closing = self._gone = False
        self.returncode: int | None = None
        up.setblocking(False)
        self._loop.add_reader(up.fileno(), self._readable)
        threading.Thread(target=self._write, name="signal-engine-writer", daemon=True).start()

    async def started(self, timeout: float = 600.0) -> None:
        """Wait for the child's ``ready`` (it has opened the store and built its engine)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            await asyncio.to_thread(self.close, 5)
            raise EngineProcessError(f"the engine process did not start within {timeout:g} s") from None

    # ------------------------------------------------------------------ Runner's methods
    def open(self, run_id: str, key_id: str, stored: dict, create_request: str | None = None) -> None:
        self._send({"cmd": "open", "run_id": run_id, "key_id": key_id, "stored": stored,
                    "create_request": create_request})

    def run(self, run_id: str, key_id: str, p: Pending, exec_order: int) -> None:
        self._send({"cmd": "run", "run_id": run_id, "key_id": key_id, "request_id": p.request_id, "seq": p.seq,
                    "op": p.op, "exec_order": exec_order, "ctype": p.ctype}, p.body)

    async def ask(self, name: str, run_id: str | None = None, timeout: float = 600.0) -> Any:
        """``name`` run in the child (``recover`` on its main thread, before any frame after it), its JSON answer.
        A failure there raises :class:`EngineReplyError`; a child that is gone, :class:`EngineProcessError`."""
        if self._gone:
            raise EngineProcessError(f"the engine process is gone (code {self.returncode})")
        fut = self._loop.create_future()
        n = next(self._ids)
        self._asks[n] = fut
        try:
            self._send({"cmd": "ask", "id": n, "name": name, "run_id": run_id})
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._asks.pop(n, None)

    def close(self, timeout: float = 60.0) -> None:
        """Ask the child to finish its queued work and exit; kill it after ``timeout`` (a restart recovers). Blocks:
        call it off the event loop (``asyncio.to_thread``)."""
        self._closing = True
        self._send({"cmd": "close"})
        self._outbox.put(None)  # the writer's last item
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not exit within %g s; killing it", timeout)
            self.proc.kill()
            self.proc.wait(30)
        self._down.close()

    # ------------------------------------------------------------------ plumbing
    def _send(self, head: dict, body: bytes | None = b"") -> None:
        """Hand a frame to the child in order. A small frame with nothing queued before it is written here at once,
        if the socket takes it whole without waiting (the usual case: no hop to the writer thread); anything else,
        or what is left of it, goes to the writer thread."""
        body = body or b""
        prefix = frame_prefix(head, len(body))
        with self._qlock:
            if _DONTWAIT and not self._queued and len(body) <= _DIRECT:
                data = prefix + body
                try:
                    n = self._down.send(data, _DONTWAIT)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    self._lost(head, exc)
                    return
                if n == len(data):
                    return
                prefix, body = data[n:], b""
            self._queued += 1
            self._outbox.put((head, prefix, body))

    def _write(self) -> None:
        """The writer thread: frames down to the child, in order. One that cannot be handed over (the child is gone)
        leaves its request ``queued`` in the log, for the restarted server."""
        while (item := self._outbox.get()) is not None:
            head, prefix, body = item
            try:
                self._down.sendall(prefix)
                if body:
                    self._down.sendall(body)
            except OSError as exc:
                self._lost(head, exc)
            with self._qlock:
                self._queued -= 1

    def _lost(self, head: dict, exc: OSError) -> None:
        if not self._closing:
            log.error("could not reach the engine process (%s): %s left for the next start", exc, head.get("cmd"))

    def _readable(self) -> None:
        """On the loop: read what the child sent and handle every complete frame."""
        try:
            data = self._up.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._channel_closed()
            return
        buf = self._buf
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= _HEAD.size:
                hlen, blen = _HEAD.unpack_from(buf, pos)
                end = pos + _HEAD.size + hlen + blen
                if len(buf) < end:
                    break
                frame = bytes(buf[pos + _HEAD.size:pos + _HEAD.size + hlen]), bytes(buf[end - blen:end])
                pos = end
                self._handle(json.loads(frame[0]), frame[1])
        finally:
            del buf[:pos]

    def _handle(self, head: dict, body: bytes) -> None:
        t = head.get("t")
        if t == "done":
            self.deliver(head["rid"], head["status"], body)
        elif t == "reply":
            fut = self._asks.get(head["id"])
            if fut is not None:
                _settle(fut, head["ok"], body)
        elif t == "ready" and not self._ready.done():
            self._ready.set_result(None)

    def detach(self) -> None:
        """On the loop, after :meth:`close`: stop reading (the child is gone)."""
        if not self._gone:
            self._gone = True
            self._loop.remove_reader(self._up.fileno())
            self._up.close()

    def _channel_closed(self) -> None:
        if not self._gone:
            self.detach()
            self._loop.run_in_executor(None, self._reap)

    def _reap(self) -> None:  # (a thread: waits for the exit code)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(30)
        try:
            self._loop.call_soon_threadsafe(self._exited, code)
        except RuntimeError:  # the loop is closed: the server is gone too
            pass

    def _exited(self, code: int) -> None:
        self.returncode = code
        gone = EngineProcessError(f"the engine process exited (code {code})")
        if not self._ready.done():
            self._ready.set_exception(EngineProcessError(
                f"the engine process exited with code {code} while starting (its error is in the server's output)"))
        for fut in self._asks.values():
            if not fut.done():
                fut.set_exception(gone)
        if not self._closing:
            log.critical("the engine process exited with code %s; restart the server (it recovers every run)", code)
            if self.on_exit is not None:
                self.on_exit(code)


def _settle(fut: asyncio.Future, ok: bool, body: bytes) -> None:
    if fut.done():
        return
    doc = json.loads(body)
    if ok:
        fut.set_result(doc)
    else:
        fut.set_exception(EngineReplyError(doc))


# ---------------------------------------------------------------------- the child
def _die_with(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the server died before the line above
        os._exit(1)


def _decoded(body: bytes, ctype: str) -> tuple[list | None, dict | None]:
    """A request's ``(args, kwargs)``; ``(None, None)`` if it does not decode (the worker then raises the error)."""
    from signalrl import wire

    try:
        return wire.decode_request(body, ctype)
    except ValueError:
        return None, None


def serve_child(down: socket.socket, up: socket.socket, root: str, settings) -> None:
    """The engine process's loop: read frames from ``down`` until ``close`` (then finish the queued work) or its end
    (then exit at once); answer on ``up``."""
    from .runner import Runner
    from .store import Store

    lock = threading.Lock()

    def done(rid: str, status: str, outcome: bytes) -> None:
        send_frame(up, lock, {"t": "done", "rid": rid, "status": status}, outcome)

    store = Store(os.path.join(root, "signal.db"))
    runner = Runner(root, store, settings, done)
    send_frame(up, lock, {"t": "ready", "pid": os.getpid()})
    f = down.makefile("rb")
    while True:
        frame = read_frame(f)
        if frame is None:  # the server is gone without closing us: stop now, as kill -9 would (its restart reruns
            os._exit(1)    # what was queued); finishing the queue would race the restarted server's engine
        head, body = frame
        cmd = head.get("cmd")
        if cmd == "close":
            break
        try:
            if cmd == "run":  # decoded here, while the worker runs the request before it
                args, kwargs = _decoded(body, head["ctype"])
                p = Pending(head["request_id"], head["seq"], head["op"], args, kwargs, time.monotonic(), body=body,
                            ctype=head["ctype"])
                runner.run(head["run_id"], head["key_id"], p, head["exec_order"])
            elif cmd == "open":
                runner.open(head["run_id"], head["key_id"], head["stored"], head.get("create_request"))
            elif cmd == "ask":
                send_frame(up, lock, *_answer(runner, head))
            else:
                log.error("engine process: unknown command %r", cmd)
        except Exception:  # noqa: BLE001 - one bad frame must not end the engine
            log.exception("engine process: command %r failed", cmd)
            if cmd == "run":
                runner.record(head["request_id"], error=RuntimeError("the engine process could not queue it"))
    runner.close()
    store.close()


def _answer(runner, head: dict) -> tuple[dict, bytes]:
    """The reply frame to an ``ask``: ``recover()``, or ``run_info`` / ``queue_stats`` of ``head["run_id"]``."""
    from signalrl import wire

    name = head.get("name")
    try:
        if name not in ASKS:
            raise ValueError(f"name: expected one of {ASKS}, got {name!r}")
        value = runner.recover() if name == "recover" else getattr(runner, name)(head["run_id"])
        answer, ok = json.dumps(value).encode(), True
    except Exception as exc:  # noqa: BLE001 - answered, not raised
        answer, ok = json.dumps(wire.encode_error(exc)).encode(), False
    return {"t": "reply", "id": head["id"], "ok": ok}, answer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="signal-engine-process",
                                description="The engine process of `signal serve` (started by it; not by hand).")
    p.add_argument("--root", required=True)
    p.add_argument("--fds", required=True, help="this end of the server's two socket pairs: requests,outcomes")
    p.add_argument("--parent", type=int, required=True, help="the server's pid")
    p.add_argument("--settings", required=True, help="the server's Settings as JSON")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    _die_with(args.parent)
    # Ctrl-C in a terminal reaches the whole process group: the server shuts down and closes this process itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    # The reader must get the interpreter lock soon after a frame arrives while the worker runs Python.
    sys.setswitchinterval(0.0005)
    from .service import Settings

    down, up = (socket.socket(fileno=int(fd)) for fd in args.fds.split(","))
    serve_child(down, up, os.path.abspath(args.root), Settings(**json.loads(args.settings)))
    return 0
