"""The server's state in SQLite (stdlib ``sqlite3``): API keys, runs, the request log, training clients.

One file, ``<root>/signal.db``, in WAL mode with ``synchronous=NORMAL``: a committed transaction survives the
server process being killed (``kill -9``); an operating-system crash may lose the last ones. One connection per
process, shared by its threads under a lock: the server's (the event loop; the engine's worker threads too when the
engine runs in the server's process) and, by default, the engine process's. WAL lets readers read while one of
them writes; a writer waits for the other's transaction (each is one or two short statements), up to 30 s.

Request states: ``waiting`` (accepted; an earlier number of its training client has not arrived), ``queued``
(handed to the engine, in execution order ``exec_order``), ``done`` / ``failed`` (result or error stored). A result
is dropped (``expired_at``) once delivered + the result TTL, or never delivered + the undelivered TTL; the row
stays, so a retried number still finds its request. The payload of a request is kept while it may still
have to run, or be replayed after a restart (see :mod:`signalrl.server.recovery`).

On a training step's path a request costs two commits, each one statement: its acceptance (an INSERT, already
``queued`` when it is its client's next number) and its outcome (an UPDATE, on the worker, before the result is
handed to anyone). In WAL mode a commit appends to the log file without an fsync (the operating system's page cache
survives the process), which is what a restart after ``kill -9`` needs.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
  key_id TEXT PRIMARY KEY, name TEXT, salt BLOB NOT NULL, hash BLOB NOT NULL,
  created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL,
  step INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, checkpoint TEXT, checkpoint_exec INTEGER);
CREATE INDEX IF NOT EXISTS runs_key ON runs(key_id);
CREATE TABLE IF NOT EXISTS requests (
  request_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, key_id TEXT NOT NULL, client_id TEXT NOT NULL,
  seq INTEGER NOT NULL, op TEXT NOT NULL, payload_hash TEXT, payload BLOB, content_type TEXT,
  status TEXT NOT NULL, exec_order INTEGER, result BLOB, error TEXT,
  created_at REAL NOT NULL, finished_at REAL, delivered_at REAL, expired_at REAL,
  UNIQUE (run_id, client_id, seq));
CREATE INDEX IF NOT EXISTS requests_exec ON requests(run_id, exec_order);
CREATE INDEX IF NOT EXISTS requests_status ON requests(status);
CREATE TABLE IF NOT EXISTS clients (
  run_id TEXT NOT NULL, client_id TEXT NOT NULL, next_seq INTEGER NOT NULL, PRIMARY KEY (run_id, client_id));
-- clients.next_seq records skipped numbers only; queued requests say the rest (Store.next_seq)
"""
FINAL = ("done", "failed")
_REQ_COLS = ("request_id", "run_id", "key_id", "client_id", "seq", "op", "payload_hash", "status", "exec_order",
             "error", "created_at", "finished_at", "delivered_at", "expired_at", "content_type")


class Store:
    def __init__(self, path: str):
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _x(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _tx(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            if len(statements) == 1:  # one statement is its own transaction (autocommit): no BEGIN / COMMIT calls
                self._db.execute(*statements[0])
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ keys
    def add_key(self, key_id: str, name: str | None, salt: bytes, digest: bytes) -> None:
        self._x("INSERT INTO keys VALUES (?, ?, ?, ?, ?, NULL)", (key_id, name, salt, digest, time.time()))

    def get_key(self, key_id: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM keys WHERE key_id = ?", (key_id,))

    def list_keys(self) -> list[dict[str, Any]]:
        return [{"key_id": r["key_id"], "name": r["name"], "created_at": r["created_at"], "revoked_at": r["revoked_at"]}
                for r in self._all("SELECT * FROM keys ORDER BY created_at")]

    def revoke_key(self, key_id: str) -> bool:
        cur = self._x("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (time.time(), key_id))
        return cur.rowcount == 1

    # ------------------------------------------------------------------ runs
    def add_run(self, run_id: str, key_id: str, config: dict, request: dict) -> None:
        """A run being created, and its ``create_run`` request (``queued``), in one transaction."""
        now = time.time()
        self._tx([("INSERT INTO runs (run_id, key_id, config, status, created_at) VALUES (?, ?, ?, 'creating', ?)",
                   (run_id, key_id, json.dumps(config), now)),
                  ("INSERT INTO requests (request_id, run_id, key_id, client_id, seq, op, payload_hash, status, "
                   "exec_order, created_at) VALUES (?, ?, ?, ?, 0, 'create_run', ?, 'queued', 0, ?)",
                   (request["request_id"], run_id, key_id, request["client_id"], request["payload_hash"], now))])

    def run(self, run_id: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM runs WHERE run_id = ?", (run_id,))

    def runs(self, key_id: str | None = None) -> list[sqlite3.Row]:
        if key_id is None:
            return self._all("SELECT * FROM runs ORDER BY created_at")
        return self._all("SELECT * FROM runs WHERE key_id = ? ORDER BY created_at", (key_id,))

    def set_run_status(self, run_id: str, status: str) -> None:
        self._x("UPDATE runs SET status = ? WHERE run_id = ?", (status, run_id))

    def set_checkpoint(self, run_id: str, name: str, exec_order: int, keep_from: int) -> None:
        """Checkpoint ``name`` covers ``exec_order``; payloads covered by the oldest kept one (``keep_from``) go."""
        self._tx([("UPDATE runs SET checkpoint = ?, checkpoint_exec = ? WHERE run_id = ?", (name, exec_order, run_id)),
                  ("UPDATE requests SET payload = NULL WHERE run_id = ? AND exec_order <= ? AND status IN "
                   "('done', 'failed')", (run_id, keep_from))])

    # ------------------------------------------------------------------ requests
    def request(self, request_id: str) -> sqlite3.Row | None:
        return self._one(f"SELECT {', '.join(_REQ_COLS)} FROM requests WHERE request_id = ?", (request_id,))

    def result_of(self, request_id: str) -> bytes | None:
        row = self._one("SELECT result FROM requests WHERE request_id = ?", (request_id,))
        return None if row is None else row["result"]

    def find(self, run_id: str, client_id: str, seq: int) -> sqlite3.Row | None:
        return self._one(f"SELECT {', '.join(_REQ_COLS)} FROM requests WHERE run_id = ? AND client_id = ? AND seq = ?",
                         (run_id, client_id, seq))

    def find_create(self, key_id: str, client_id: str) -> sqlite3.Row | None:
        return self._one(f"SELECT {', '.join(_REQ_COLS)} FROM requests WHERE key_id = ? AND client_id = ? AND "
                         "op = 'create_run'", (key_id, client_id))

    def add_request(self, row: dict[str, Any], payload: bytes | None, queued: int | None = None) -> None:
        """Insert a ``waiting`` (or, with ``row["error"]``, a ``failed``) request; ``sqlite3.IntegrityError`` if its
        (run, client, seq) exists. ``queued``: the request is its client's next number and is handed to the engine
        now with this execution order — inserted ``queued`` at once (one statement, one commit: its client's next
        number follows from it, see :meth:`next_seq`)."""
        status = "failed" if row.get("error") else "waiting" if queued is None else "queued"
        now = time.time()
        insert = ("INSERT INTO requests (request_id, run_id, key_id, client_id, seq, op, payload_hash, payload, "
                  "content_type, status, exec_order, error, created_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                  "?, ?, ?, ?, ?)",
                  (row["request_id"], row["run_id"], row["key_id"], row["client_id"], row["seq"], row["op"],
                   row.get("payload_hash"), payload, row.get("content_type"), status, queued, row.get("error"), now,
                   now if status == "failed" else None))
        self._x(*insert)

    def payload(self, request_id: str) -> tuple[bytes | None, str | None]:
        row = self._one("SELECT payload, content_type FROM requests WHERE request_id = ?", (request_id,))
        return (None, None) if row is None else (row["payload"], row["content_type"])

    def mark_queued(self, request_id: str, exec_order: int) -> None:
        self._x("UPDATE requests SET status = 'queued', exec_order = ? WHERE request_id = ?", (exec_order, request_id))

    def skip_seqs(self, run_id: str, client_id: str, next_seq: int) -> None:
        """The client's order moved past numbers that will not run (refused, or given up after a gap)."""
        self._x("INSERT INTO clients VALUES (?, ?, ?) ON CONFLICT (run_id, client_id) DO UPDATE SET next_seq = "
                "excluded.next_seq", (run_id, client_id, next_seq))

    def next_seq(self, run_id: str, client_id: str) -> int:
        """The number the client's order waits for: past its last queued request (a request is queued only when its
        number is the next one) or past its last skip (``clients``), whichever is later."""
        row = self._one("SELECT next_seq FROM clients WHERE run_id = ? AND client_id = ?", (run_id, client_id))
        top = self._one("SELECT seq FROM requests WHERE run_id = ? AND client_id = ? AND exec_order IS NOT NULL "
                        "ORDER BY seq DESC LIMIT 1", (run_id, client_id))
        return max(1 if row is None else int(row["next_seq"]), 1 if top is None else int(top["seq"]) + 1)

    def max_exec(self, run_id: str) -> int:
        row = self._one("SELECT MAX(exec_order) AS m FROM requests WHERE run_id = ?", (run_id,))
        return int(row["m"] or 0)

    def finish(self, request_id: str, *, result: bytes | None = None, error: str | None = None,
               keep_payload: bool = False, run_step: tuple[str, int] | None = None) -> None:
        stmts = [("UPDATE requests SET status = ?, result = ?, error = ?, finished_at = ?" +
                  ("" if keep_payload else ", payload = NULL") + " WHERE request_id = ?",
                  ("failed" if error is not None else "done", result, error, time.time(), request_id))]
        if run_step is not None:
            stmts.append(("UPDATE runs SET step = ? WHERE run_id = ?", (run_step[1], run_step[0])))
        self._tx(stmts)

    def mark_delivered(self, request_ids) -> None:
        now = time.time()
        self._tx([("UPDATE requests SET delivered_at = ? WHERE request_id = ? AND delivered_at IS NULL", (now, rid))
                  for rid in request_ids])

    def in_state(self, run_id: str, status: str) -> list[sqlite3.Row]:
        return self._all(f"SELECT {', '.join(_REQ_COLS)} FROM requests WHERE run_id = ? AND status = ? "
                         "ORDER BY exec_order, seq", (run_id, status))

    def replayable(self, run_id: str, after_exec: int, ops: tuple[str, ...]) -> Iterator[sqlite3.Row]:
        marks = ", ".join("?" * len(ops))
        rows = self._all(f"SELECT request_id, op, exec_order FROM requests WHERE run_id = ? AND status = 'done' AND "
                         f"payload IS NOT NULL AND exec_order > ? AND op IN ({marks}) ORDER BY exec_order", (run_id, after_exec, *ops))
        return iter(rows)

    def expire(self, delivered_before: float, finished_before: float) -> int:
        """Drop results delivered before ``delivered_before`` or never delivered and finished before
        ``finished_before``; the rows stay (a retried number still finds its request)."""
        cur = self._x("UPDATE requests SET result = NULL, error = NULL, expired_at = ? WHERE expired_at IS NULL "
                      "AND status IN ('done', 'failed') AND ((delivered_at IS NOT NULL AND delivered_at < ?) OR "
                      "(delivered_at IS NULL AND finished_at < ?))", (time.time(), delivered_before, finished_before))
        return cur.rowcount
