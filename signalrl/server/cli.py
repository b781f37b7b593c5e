"""``signal serve`` and ``signal keys create | list | revoke``."""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import sys
from typing import Sequence

ENV_ROOT = "SIGNAL_SERVER_ROOT"


def default_root() -> str:
    return os.environ.get(ENV_ROOT) or os.path.join(os.getcwd(), "signal-server")


def _root_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=None, help=f"server state: signal.db, runs/, files/ (default ${ENV_ROOT} "
                        "or ./signal-server)")


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on such sockets (else Nagle + delayed ACKs add 40 ms)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(argv: Sequence[str] | None = None) -> int:
    from .service import Settings

    d = Settings()
    p = argparse.ArgumentParser(prog="signal serve", description="Run the training engine behind the HTTP API.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the URL printed says which)")
    _root_arg(p)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger request bodies get 413")
    p.add_argument("--max-hold", type=float, default=d.max_hold_s, help="longest long-poll hold, seconds")
    p.add_argument("--result-ttl", type=float, default=d.result_ttl_s, help="seconds a result is kept after delivery")
    p.add_argument("--undelivered-ttl", type=float, default=d.undelivered_ttl_s,
                   help="seconds a result never fetched is kept")
    p.add_argument("--gap-timeout", type=float, default=d.gap_timeout_s,
                   help="seconds a request waits for a missing predecessor before it fails")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="automatic checkpoint every N optimizer steps for runs that do not set checkpoint_every")
    p.add_argument("--engine", choices=["process", "thread"], default=None,
                   help="where the engine runs: 'process' (default on POSIX), a child process of the server, so HTTP "
                   "and the model never wait for each other's interpreter lock; 'thread', a worker thread of the "
                   "server's process (a sharded server always uses it)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    from signalrl.distributed import launch

    launch.add_arguments(p)  # --nproc-per-node N and torchrun's rendezvous options
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    launch.check(p, args)
    sharded = args.sharded or launch.wants_torchrun(args)
    if args.engine == "process" and sharded:
        p.error("--engine process: a sharded server (--nproc-per-node > 1) runs its engine in the torchrun ranks; "
                "leave --engine out")
    in_process = args.engine == "thread" or sharded or (args.engine is None and os.name != "posix")
    settings = Settings(max_body_bytes=args.max_body_bytes, max_hold_s=args.max_hold, result_ttl_s=args.result_ttl,
                        undelivered_ttl_s=args.undelivered_ttl, gap_timeout_s=args.gap_timeout,
                        checkpoint_every=args.checkpoint_every)
    for name in ("max_body_bytes", "max_hold_s", "gap_timeout_s", "checkpoint_every"):
        if not getattr(settings, name) > 0:
            p.error(f"--{name.replace('_s', '').replace('_', '-')} must be > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        print(f"signal serve needs FastAPI and uvicorn ({exc}): pip install 'signal-rl[server]'", file=sys.stderr)
        return 2
    if launch.wants_torchrun(args):
        launch.relaunch(args, argv)  # execs torchrun, which starts every rank with --sharded

    from . import create_app
    from .service import Service

    # The event loop shares the GIL with the engine's worker thread (or the engine process's reader); a short switch
    # interval lets it answer (and hand over the next request) within a fraction of a millisecond, not up to 5 ms.
    sys.setswitchinterval(0.0005)
    root = os.path.abspath(args.root or default_root())
    engine = launch.sharded_engine(args, os.path.join(root, "runs")) if args.sharded else None
    if args.sharded and engine is None:  # a rank > 0: it served rank 0's engine until the server stopped
        launch.finish()
        return 0
    service = Service(root, settings=settings, engine=engine, engine_process=not in_process)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"Signal server on {url}  (root {root})", flush=True)
    if engine is not None:
        print(f"Sharded engine: {engine.comm.world_size} ranks (FSDP2, {engine.device})", flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: bound to {host}: anyone who reaches this port can try keys; put TLS in front (a reverse "
              "proxy) before exposing it", flush=True)
    if not service.store.list_keys():
        print(f"No API key yet: create one with  signal keys create --root {root}", flush=True)
    else:
        print(f"Create an API key with  signal keys create --root {root}", flush=True)
    print(f"Then train with:  SIGNAL_BASE_URL={url} SIGNAL_API_KEY=<key> python examples/ppo_gae.py   "
          f"(or: signal demo --remote {url} --api-key <key>)", flush=True)
    config = uvicorn.Config(create_app(service), log_level=args.log_level, access_log=args.log_level == "debug",
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)

    def engine_down() -> None:  # the engine process died: stop, so that whoever runs the server restarts it
        server.should_exit = True
    service.on_down = engine_down
    try:
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raises the Ctrl-C it caught
            return 130
        if service.down is not None:
            print(f"signal serve: {service.down}", file=sys.stderr, flush=True)
            return 1
    finally:
        if engine is not None:  # stops the other ranks
            engine.close()
            launch.finish()
    return 0


def keys(argv: Sequence[str] | None = None) -> int:
    from . import auth
    from .store import Store

    p = argparse.ArgumentParser(prog="signal keys", description="API keys of a Signal server.")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create a key and print it (once: only a salted hash is stored)")
    c.add_argument("--name", default=None, help="a label for the key")
    _root_arg(c)
    ls = sub.add_parser("list", help="list keys (ids, names, dates; never the keys)")
    _root_arg(ls)
    r = sub.add_parser("revoke", help="revoke a key (by id or whole key); it stops working at once")
    r.add_argument("key_id")
    _root_arg(r)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    root = os.path.abspath(args.root or default_root())
    os.makedirs(root, exist_ok=True)
    store = Store(os.path.join(root, "signal.db"))
    try:
        if args.action == "create":
            key_id, key = auth.create_key(store, args.name)
            print(key)
            print(f"(key id {key_id}; shown once — store it now. Use it as SIGNAL_API_KEY=... or "
                  "AsyncSignalClient(api_key=...))", file=sys.stderr)
        elif args.action == "list":
            rows = store.list_keys()
            if not rows:
                print("no keys")
            for k in rows:
                when = datetime.datetime.fromtimestamp(k["created_at"]).isoformat(timespec="seconds")
                state = "revoked" if k["revoked_at"] else "active"
                print(f"{k['key_id']}  {state:<8} {when}  {k['name'] or ''}")
        else:
            key_id = auth.key_id_of(args.key_id)
            if not store.revoke_key(key_id):
                print(f"no active key {key_id!r}", file=sys.stderr)
                return 1
            print(f"revoked {key_id}")
    finally:
        store.close()
    return 0
