"""Spike server: POST /submit, GET /result/{id}?wait=S, GET /info.

  python server.py thread  PORT ROOT   # Engine in this process; its worker thread executes
  python server.py process PORT ROOT   # Engine in a spawned child process; a Pipe of JSON bytes
"""
import asyncio
import json
import multiprocessing as mp
import os
import sys
import threading

os.environ.setdefault("OMP_NUM_THREADS", "1")
RUN = dict(base_model="signal-tiny", lora_r=0, learning_rate=3e-3, max_grad_norm=1.0, seed=0)


def _make_engine(root):
    import torch
    torch.set_num_threads(1)
    from signalrl.engine import Engine
    eng = Engine(root)
    rid = eng.create_run(**RUN).result()["run_id"]
    return eng, rid


def _execute(eng, rid, op, batch):
    """Queue one op on the engine; return its concurrent Future mapped to a JSON-able dict."""
    if op == "fb":
        return eng.request(rid, "forward_backward", batch, "causal_lm"), lambda r: {"loss": float(r.loss)}
    return eng.request(rid, "optim_step"), lambda r: {}


def child_main(conn, root):
    """Process mode: owns the Engine. Receives b'<id>\\n<json body>', sends b'<json {id, result|error}>'."""
    os.environ["OMP_NUM_THREADS"] = "1"
    eng, rid = _make_engine(root)
    send_lock = threading.Lock()
    conn.send_bytes(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            msg = conn.recv_bytes()
        except EOFError:
            break
        if msg == b"quit":
            break
        head, _, body = msg.partition(b"\n")
        k = int(head)
        req = json.loads(body)

        def done(f, k=k, conv=None):
            try:
                out = {"id": k, "result": conv(f.result())}
            except BaseException as exc:  # noqa: BLE001
                out = {"id": k, "error": repr(exc)}
            data = json.dumps(out).encode()
            with send_lock:
                conn.send_bytes(data)

        try:
            fut, conv = _execute(eng, rid, req["op"], req.get("batch"))
        except BaseException as exc:  # noqa: BLE001
            with send_lock:
                conn.send_bytes(json.dumps({"id": k, "error": repr(exc)}).encode())
            continue
        fut.add_done_callback(lambda f, k=k, conv=conv: done(f, k, conv))
    eng.close()


def build_app(mode, root):
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    app = FastAPI()
    state = {"next": 0, "futs": {}, "child_pid": None}

    def resolve(k, payload):  # on the loop
        fut = state["futs"].get(k)
        if fut is not None and not fut.done():
            fut.set_result(payload)

    @app.on_event("startup")
    async def startup():
        loop = asyncio.get_running_loop()
        state["loop"] = loop
        if mode == "thread":
            eng, rid = await loop.run_in_executor(None, _make_engine, root)
            state["eng"], state["rid"] = eng, rid
        else:
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=child_main, args=(child, root), daemon=True)
            proc.start()
            child.close()
            ready = await loop.run_in_executor(None, lambda: parent.poll(300) and parent.recv_bytes())
            if not ready:
                raise RuntimeError("child did not start")
            state["child_pid"] = json.loads(ready)["pid"]
            state["conn"], state["proc"] = parent, proc
            state["send_lock"] = threading.Lock()

            def reader():
                while True:
                    try:
                        data = parent.recv_bytes()
                    except (EOFError, OSError):
                        return
                    msg = json.loads(data)
                    payload = msg["result"] if "result" in msg else {"error": msg["error"]}
                    loop.call_soon_threadsafe(resolve, msg["id"], payload)

            threading.Thread(target=reader, daemon=True).start()

    @app.on_event("shutdown")
    async def shutdown():
        if mode == "thread":
            state["eng"].close()
        else:
            try:
                state["conn"].send_bytes(b"quit")
            except OSError:
                pass
            state["proc"].join(10)
            if state["proc"].is_alive():
                state["proc"].kill()

    @app.post("/submit")
    async def submit(request: Request):
        body = await request.body()
        k = state["next"]
        state["next"] += 1
        loop = state["loop"]
        fut = loop.create_future()
        state["futs"][k] = fut
        if mode == "thread":
            req = json.loads(body)
            try:
                cf, conv = _execute(state["eng"], state["rid"], req["op"], req.get("batch"))
            except Exception as exc:  # noqa: BLE001
                fut.set_result({"error": repr(exc)})
            else:
                def done(f, k=k, conv=conv):
                    try:
                        payload = conv(f.result())
                    except BaseException as exc:  # noqa: BLE001
                        payload = {"error": repr(exc)}
                    loop.call_soon_threadsafe(resolve, k, payload)
                cf.add_done_callback(done)
        else:
            # raw body forwarded: the child parses the JSON (send_bytes of ~ tens of KB is a few us)
            state["conn"].send_bytes(str(k).encode() + b"\n" + body)
        return {"id": k}

    @app.get("/result/{k}")
    async def result(k: int, wait: float = 30.0):
        fut = state["futs"].get(k)
        if fut is None:
            return Response(status_code=404)
        try:
            payload = await asyncio.wait_for(asyncio.shield(fut), wait)
        except asyncio.TimeoutError:
            return Response(status_code=202)
        state["futs"].pop(k, None)
        return payload

    @app.get("/info")
    async def info():
        return {"pid": os.getpid(), "child_pid": state["child_pid"], "mode": mode}

    return app


if __name__ == "__main__":
    import torch
    torch.set_num_threads(1)
    import uvicorn
    mode, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kw = {}
    try:
        import uvloop  # noqa: F401
        kw["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401
        kw["http"] = "httptools"
    except ImportError:
        pass
    print("uvicorn options", kw, flush=True)
    uvicorn.run(build_app(mode, root), host="127.0.0.1", port=port, log_level="warning", access_log=False, **kw)
