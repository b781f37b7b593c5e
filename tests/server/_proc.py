"""A ``signal serve`` subprocess on 127.0.0.1 (tests): start, wait until healthy, kill -9."""
import os
import queue
import re
import subprocess
import sys
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def server_env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               SIGNAL_BACKEND="reference", **extra)
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for kernel tests; a real server has none
    env.pop("SIGNAL_BASE_URL", None)
    return env


class ServerProcess:
    def __init__(self, root, port=0, args=(), timeout=120):
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "signalrl.cli", "serve", "--root", str(root), "--port", str(port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(), cwd=str(root))
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        self.url = None
        while self.url is None:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise RuntimeError("signal serve printed no URL in time:\n" + "".join(self.output)) from None
            m = re.search(r"Signal server on (http://\S+)", line)
            if m:
                self.url = m.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError("signal serve did not become healthy:\n" + "".join(self.output))
            time.sleep(0.1)

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def children(self):
        """Pids of the server's child processes (its engine process), from /proc (Linux)."""
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    out.append(int(d))
        return out

    def kill(self):
        """``kill -9``: no shutdown code runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def alive(pid):
    """Whether ``pid`` runs (a zombie, dead and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False
