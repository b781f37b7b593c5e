"""The HTTP API (FastAPI): authentication, ownership, body limits, and the routes over :class:`Service`.

Every route but ``/healthz`` needs ``Authorization: Bearer <key>`` (else 401). A run, its requests and its files
belong to the key that created it: for any other key every route answers 404 exactly as for a run that does not
exist. Bodies over ``max_body_bytes`` are answered 413, other content types 415, malformed bodies 400; errors are
``{"error": {"type", "mro", "message", "args"}}``. The protocol is described in docs/server.md.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from signalrl import __version__, wire
from signalrl.engine.limits import RequestTooLargeError

from . import auth
from .service import ApiError, Service, payload_hash

_CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
log = logging.getLogger("signalrl.server")


def _json(doc, status: int = 200) -> Response:
    return Response(json.dumps(doc).encode(), status_code=status, media_type=wire.JSON)


async def _read_body(request: Request, cap: int) -> bytes:
    """The body, or :class:`ApiError` 413 once it passes ``cap`` bytes (the rest is drained, so the client reads
    the answer instead of a broken connection)."""
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > cap
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cap or too_big:
            too_big = True
            if n > 16 * cap:
                break
            continue
        chunks.append(chunk)
    if too_big:
        size = declared if declared is not None else f"more than {cap}"
        raise ApiError(413, RequestTooLargeError(
            f"request body: expected at most {cap} bytes (the server's max_body_bytes), got {size}; split the "
            "batch into smaller requests (accumulate with several forward_backward calls before optim_step), or "
            "start the server with a larger --max-body-bytes"))
    return b"".join(chunks)


def _ctype(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower()


def _error(exc: ApiError) -> Response:
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
    return Response(json.dumps({"error": exc.doc}).encode(), status_code=exc.status, media_type=wire.JSON,
                    headers=headers)


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="Signal", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.service = service
    limits = service.settings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc)

    def key_of(request: Request) -> str:
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        key_id = auth.verify(service.store, token.strip()) if scheme.lower() == "bearer" else None
        if key_id is None:
            raise ApiError(401, wire.error_doc("SignalAuthError", "authorization: expected 'Bearer <API key>' with a "
                                               "valid, unrevoked key (create one with `signal keys create`)"))
        return key_id

    def hold_of(request: Request, default: float = 0.0) -> float:
        raw = request.query_params.get("wait", default)
        try:
            hold = float(raw)
        except (TypeError, ValueError):
            raise ApiError(400, ValueError(f"wait: expected a number of seconds, got {raw!r}")) from None
        if not hold >= 0:
            raise ApiError(400, ValueError(f"wait: expected a number of seconds >= 0, got {raw!r}"))
        return hold

    async def submit(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        key_id = key_of(request)
        service.check_run(key_id, run_id)
        q = request.query_params
        op, client_id = q.get("op", ""), q.get("client_id", "")
        if not _CLIENT_ID.match(client_id) or not q.get("seq", "").isdigit() or int(q["seq"]) < 1:
            raise ApiError(400, ValueError("client_id, seq: expected client_id of 1-64 characters of [A-Za-z0-9_-] "
                                           f"and seq an integer >= 1, got {client_id!r}, {q.get('seq')!r}"))
        seq, hold = int(q["seq"]), hold_of(request)
        # A new number is the usual case: it is inserted at once, and a number seen before is found by the
        # insert's uniqueness conflict (no lookup ahead of every request).
        try:
            body = await _read_body(request, limits.max_body_bytes)
        except ApiError as exc:
            service.reject(key_id, run_id, client_id, seq, op, RequestTooLargeError(exc.doc["message"]))
            raise  # (a number seen before stays as it was: reject leaves it alone)
        ctype = _ctype(request)
        try:
            if ctype not in wire.CONTENT_TYPES:
                raise wire.WireError(f"content-type: expected one of {wire.CONTENT_TYPES}, got {ctype!r}")
            head = service.new_request(key_id, run_id, client_id, seq, op, body, ctype)
        except wire.WireError as exc:
            existing = service.store.find(run_id, client_id, seq)
            if existing is None:
                service.reject(key_id, run_id, client_id, seq, op, exc)
                raise ApiError(415 if ctype not in wire.CONTENT_TYPES else 400, exc) from None
        except sqlite3.IntegrityError:  # the number exists: a retry (or a concurrent one got there first)
            existing = service.store.find(run_id, client_id, seq)
            if existing is None:
                raise
        else:
            return Response(await service.wait(key_id, head["request_id"], hold, head), status_code=202,
                            media_type=wire.JSON)
        if existing["payload_hash"] is not None and (existing["op"] != op or existing["payload_hash"] !=
                                                     payload_hash(op, ctype, body)):
            raise ApiError(409, wire.error_doc(
                "SignalConflictError", f"seq: request {seq} of training client {client_id} was already submitted with "
                "another payload; a retry must send the same op and body (use a new number for a new request)"))
        return Response(await service.wait(key_id, existing["request_id"], hold), status_code=200,
                        media_type=wire.JSON)

    async def result(request: Request) -> Response:
        key_id = key_of(request)
        return Response(await service.wait(key_id, request.path_params["request_id"], hold_of(request)),
                        media_type=wire.JSON)

    # The two routes of every training step come first (routes are matched in order) and are plain Starlette
    # routes: FastAPI's per-request dependency solving and parameter validation add nothing to an endpoint that
    # reads the request itself, and cost about a fifth of the server's time in the HTTP layers.
    app.add_route("/v1/runs/{run_id}/requests", submit, methods=["POST"])
    app.add_route("/v1/requests/{request_id}", result, methods=["GET"])

    @app.get("/healthz")
    async def healthz() -> Response:
        if service.down is not None:
            return _json({"status": "down", "reason": service.down, "version": __version__}, 503)
        return _json({"status": "ok", "version": __version__})

    @app.get("/v1/info")
    async def info(request: Request) -> Response:
        key_of(request)
        return _json({"version": __version__, "max_body_bytes": limits.max_body_bytes, "max_hold_s": limits.max_hold_s,
                      "result_ttl_s": limits.result_ttl_s, "undelivered_ttl_s": limits.undelivered_ttl_s,
                      "gap_timeout_s": limits.gap_timeout_s, "checkpoint_every": limits.checkpoint_every})

    @app.post("/v1/runs")
    async def create_run(request: Request) -> Response:
        key_id = key_of(request)
        body = await _read_body(request, limits.max_body_bytes)
        if _ctype(request) != wire.JSON:
            raise ApiError(415, ValueError(f"content-type: expected {wire.JSON}, got {_ctype(request)!r}"))
        try:
            doc = wire.decode_body(body, wire.JSON)
        except wire.WireError as exc:
            raise ApiError(400, exc) from None
        idem = request.headers.get("idempotency-key") or os.urandom(16).hex()
        if not _CLIENT_ID.match(idem):
            raise ApiError(400, ValueError("idempotency-key: expected 1-64 characters of [A-Za-z0-9_-]"))
        out = service.create_run(key_id, idem, doc, payload_hash("create_run", wire.JSON, body))
        return Response(await service.wait(key_id, out["request_id"], hold_of(request)), status_code=202,
                        media_type=wire.JSON)

    @app.get("/v1/runs")
    async def list_runs(request: Request) -> Response:
        return _json({"runs": await service.list_runs(key_of(request))})

    @app.get("/v1/runs/{run_id}")
    async def get_run(run_id: str, request: Request) -> Response:
        service.run_row(key_of(request), run_id)
        return _json(await service.ask("run_info", run_id))

    @app.get("/v1/runs/{run_id}/queue_stats")
    async def queue_stats(run_id: str, request: Request) -> Response:
        service.run_row(key_of(request), run_id)
        return _json(await service.ask("queue_stats", run_id))

    @app.get("/v1/runs/{run_id}/metrics")
    async def metrics(run_id: str, request: Request) -> Response:
        service.run_row(key_of(request), run_id)
        try:
            since = max(0, int(request.query_params.get("since", 0)))
            limit = max(1, min(100_000, int(request.query_params.get("limit", 10_000))))
        except ValueError:
            raise ApiError(400, ValueError("since, limit: expected integers")) from None
        path = os.path.join(service.runs_dir, run_id, "metrics.jsonl")

        def read() -> list:
            if not os.path.exists(path):
                return []
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for i, line in enumerate(f) if since <= i < since + limit and line.strip()]
        records = await asyncio.to_thread(read)
        return _json({"records": records, "next": since + len(records)})

    @app.get("/v1/runs/{run_id}/checkpoints")
    async def checkpoints(run_id: str, request: Request) -> Response:
        service.run_row(key_of(request), run_id)
        d = os.path.join(service.runs_dir, run_id, "checkpoints")
        names = sorted(n for n in os.listdir(d) if not n.startswith(".")) if os.path.isdir(d) else []
        return _json({"checkpoints": names})

    return app
