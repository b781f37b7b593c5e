"""Spike client: local vs thread-mode server (A) vs process-mode server (B), pipelined and awaited loops.

  python benchmarks/results/engine_process_spike/bench.py [--rounds 6] [--block 10] [--warmup 5]   (from the repo root)
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["OMP_NUM_THREADS"] = "1"
import httpx  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid):
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / TICK  # utime, stime


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Server:
    def __init__(self, mode, root):
        self.mode, self.port = mode, free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        os.makedirs(root, exist_ok=True)
        self.log = open(os.path.join(root, f"{mode}.log"), "w")
        self.proc = subprocess.Popen([PY, os.path.join(HERE, "server.py"), mode, str(self.port), root],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60.0)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{mode} server died; see {self.log.name}")
            try:
                info = self.client.get("/info").json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{mode} server not up in 180 s")
                time.sleep(0.2)
        self.pid, self.child_pid = info["pid"], info["child_pid"]
        assert self.pid == self.proc.pid, (self.pid, self.proc.pid)

    def submit(self, op, batch=None):
        r = self.client.post("/submit", content=json.dumps({"op": op, "batch": batch}),
                             headers={"content-type": "application/json"})
        r.raise_for_status()
        return r.json()["id"]

    def get(self, k):
        while True:
            r = self.client.get(f"/result/{k}", params={"wait": 30})
            if r.status_code == 200:
                out = r.json()
                if "error" in out:
                    raise RuntimeError(out["error"])
                return out
            if r.status_code != 202:
                r.raise_for_status()

    def cpu(self):
        return cpu_ms(self.pid), cpu_ms(self.child_pid)

    def stop(self):
        self.client.close()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(20)
        except ProcessLookupError:
            pass
        self.log.close()


def pipelined_block(srv, batches, losses):
    prev = None
    for b in batches:
        cur = (srv.submit("fb", b), srv.submit("opt"))
        if prev is not None:
            losses.append(srv.get(prev[0])["loss"])
            srv.get(prev[1])
        prev = cur
    losses.append(srv.get(prev[0])["loss"])
    srv.get(prev[1])


def awaited_block(srv, batches, losses):
    for b in batches:
        losses.append(srv.get(srv.submit("fb", b))["loss"])
        srv.get(srv.submit("opt"))


class Local:
    def __init__(self, root):
        from signalrl.engine import Engine
        self.eng = Engine(root)
        self.rid = self.eng.create_run(base_model="signal-tiny", lora_r=0, learning_rate=3e-3, max_grad_norm=1.0,
                                       seed=0).result()["run_id"]

    def block(self, batches, losses):
        for b in batches:
            losses.append(float(self.eng.request(self.rid, "forward_backward", b, "causal_lm").result().loss))
            self.eng.request(self.rid, "optim_step").result()

    def cpu(self):
        return 0.0, 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    sys.path.insert(0, REPO)
    from benchmarks.remote_overhead import _batches

    n = a.warmup + a.rounds * a.block
    batches = _batches(n, 32)
    root = tempfile.mkdtemp(prefix="signal-engine-spike-")
    servers = {}
    try:
        servers["A"] = Server("thread", os.path.join(root, "A"))
        servers["B"] = Server("process", os.path.join(root, "B"))
        servers["A2"] = Server("thread", os.path.join(root, "A2"))
        servers["B2"] = Server("process", os.path.join(root, "B2"))
        local = Local(os.path.join(root, "local"))
        configs = {
            "local": (local, lambda bs, ls: local.block(bs, ls)),
            "A pipelined": (servers["A"], lambda bs, ls: pipelined_block(servers["A"], bs, ls)),
            "B pipelined": (servers["B"], lambda bs, ls: pipelined_block(servers["B"], bs, ls)),
            "A awaited": (servers["A2"], lambda bs, ls: awaited_block(servers["A2"], bs, ls)),
            "B awaited": (servers["B2"], lambda bs, ls: awaited_block(servers["B2"], bs, ls)),
        }
        names = list(configs)
        losses = {k: [] for k in names}
        times = {k: [] for k in names}
        cpu = {k: [0.0, 0.0] for k in names}
        ccpu = {k: 0.0 for k in names}
        # warm-up: the first `warmup` batches for every config
        for k in names:
            configs[k][1](batches[:a.warmup], losses[k])
        for r in range(a.rounds):
            bs = batches[a.warmup + r * a.block: a.warmup + (r + 1) * a.block]
            order = names if r % 2 == 0 else names[::-1]  # A, B, ..., then reversed: cancels drift
            for k in order:
                obj, fn = configs[k]
                c0 = obj.cpu()
                p0 = time.process_time()
                t0 = time.perf_counter()
                fn(bs, losses[k])
                dt = time.perf_counter() - t0
                ccpu[k] += time.process_time() - p0
                c1 = obj.cpu()
                times[k].append(dt * 1000 / len(bs))
                cpu[k][0] += c1[0] - c0[0]
                cpu[k][1] += c1[1] - c0[1]
        measured = a.rounds * a.block
        ref = losses["local"]
        out = {"steps_measured": measured, "block": a.block, "rounds": a.rounds, "results": {}}
        for k in names:
            same = losses[k] == ref
            maxdiff = max(abs(x - y) for x, y in zip(losses[k], ref))
            out["results"][k] = {
                "median_ms_per_step": statistics.median(times[k]),
                "min_block_ms": min(times[k]), "max_block_ms": max(times[k]),
                "blocks_ms": [round(x, 2) for x in times[k]],
                "server_cpu_ms_per_step": cpu[k][0] / measured if k != "local" else None,
                "child_cpu_ms_per_step": cpu[k][1] / measured if k.startswith("B") else None,
                "client_cpu_ms_per_step": ccpu[k] * 1000 / measured,
                "losses_identical_to_local": same, "max_abs_loss_diff": maxdiff, "n_losses": len(losses[k]),
            }
        out["first_losses"] = ref[:3]
        print(json.dumps(out, indent=1))
        local.eng.close()
    finally:
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()
