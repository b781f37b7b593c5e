"""Outputs of a run: rows (JSONL, written as measured, and CSV), a markdown table, PNG plots.

Files in the output directory:
* ``rows.jsonl`` — one JSON object per row, appended as each is measured (so Ctrl-C or a crash
  keeps them), rewritten at the end with the ratio columns filled in;
* ``rows.csv`` — the same rows, flat;
* ``meta.json`` — device, versions, ceilings, preset, command, duration;
* ``results.md`` — a summary table of the headline shapes and one table per op;
* ``plots/<op>_vs_<axis>.png`` — time and peak memory against vocab (V), tokens (N) or sequence
  length (T), one line per provider, one column per mode.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Iterable

from .runner import ROW_FIELDS

SIGNAL = ("native", "triton")
PROVIDER_ORDER = ("reference", "compile", "native", "triton", "liger", "cce", "verl_loop")
MODE_ORDER = ("fwd", "bwd", "full")


class RowWriter:
    """Appends rows to ``rows.jsonl`` as they come, keeping them in memory too."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "rows.jsonl")
        self.rows: list[dict] = []
        self._f = open(self.path, "w")

    def __call__(self, row: dict) -> None:
        row = {k: row.get(k) for k in ROW_FIELDS}
        self.rows.append(row)
        self._f.write(json.dumps(row, default=_json_default) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("time_ms") is not None


def add_ratios(rows: list[dict]) -> None:
    """ratios[p] = time of provider p / time of this row, for the same op, mode, shape and dtype."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if _ok(r):
            groups[(r["op"], r["mode"], r["shape"], r["dtype"])].append(r)
    for rs in groups.values():
        for r in rs:
            ratios = {o["provider"]: o["time_ms"] / r["time_ms"] for o in rs
                      if o is not r and r["time_ms"] > 0}
            r["ratios"] = ratios
            r["speedup_vs_reference"] = ratios.get("reference")


def write_rows(out_dir: str, rows: list[dict]) -> None:
    tmp = os.path.join(out_dir, "rows.jsonl.tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps({k: r.get(k) for k in ROW_FIELDS}, default=_json_default) + "\n")
    os.replace(tmp, os.path.join(out_dir, "rows.jsonl"))
    with open(os.path.join(out_dir, "rows.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_FIELDS))
        w.writeheader()
        for r in rows:
            flat = {k: r.get(k) for k in ROW_FIELDS}
            if isinstance(flat.get("ratios"), dict):
                flat["ratios"] = ";".join(f"{k}={v:.3g}" for k, v in sorted(flat["ratios"].items()))
            if isinstance(flat.get("params"), dict):
                flat["params"] = json.dumps(flat["params"])
            w.writerow(flat)


def load_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -- markdown ---------------------------------------------------------------------------------

def _ms(r: dict | None) -> str:
    if r is None:
        return ""
    if not _ok(r):
        s = r.get("status") or ""
        return "n/i" if s == "not installed" else ("oom" if s == "oom" else ("—" if s.startswith(("skipped", "unavailable", "n/a")) else "err"))
    med, lo, hi = r["time_ms"], r.get("time_ms_p20"), r.get("time_ms_p80")
    cell = _num(med)
    if lo is not None and hi is not None and med > 0:
        cell += f" ±{100 * (hi - lo) / 2 / med:.0f}%"
    if r.get("check", "").startswith("FAIL"):
        cell += " ⚠"
    return cell


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return ""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _mib(r: dict | None) -> str:
    if r is None or not _ok(r) or r.get("peak_mem_bytes") is None:
        return ""
    return _num(r["peak_mem_bytes"] / 2**20)


def _order(providers: Iterable[str]) -> list[str]:
    ps = set(providers)
    return [p for p in PROVIDER_ORDER if p in ps] + sorted(ps - set(PROVIDER_ORDER))


def _shape_key(shape: str):
    parts = []
    for kv in shape.split(","):
        k, _, v = kv.partition("=")
        parts.append((k, int(v) if v.isdigit() else 0))
    return parts


def _best_signal(rs: dict[str, dict]) -> dict | None:
    cands = [rs[p] for p in SIGNAL if p in rs and _ok(rs[p]) and "interpreter" not in (rs[p].get("note") or "")]
    return min(cands, key=lambda r: r["time_ms"]) if cands else None


def headline_table(rows: list[dict], headline_keys: set | None = None) -> str:
    """One line per op × shape × dtype of the headline shapes, forward+backward (forward for GAE)."""
    by_key: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_key[(r["op"], r["shape"], r["dtype"], r["mode"])][r["provider"]] = r
    lines = ["| op | shape | dtype | mode | reference ms | compile ms | best Signal | Signal ms | × reference | "
             "× compile | × best peer | peak MiB ref → Signal | % of ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    first_seen = {}
    for r in rows:
        first_seen.setdefault(r["op"], len(first_seen))
    for (op, shape, dtype, mode), rs in sorted(by_key.items(),
                                               key=lambda kv: (first_seen[kv[0][0]], _shape_key(kv[0][1]), kv[0][2])):
        if headline_keys is not None and (op, shape, dtype) not in headline_keys:
            continue
        modes = {m for (o, s, d, m) in by_key if (o, s, d) == (op, shape, dtype)}
        want = "full" if "full" in modes else "fwd"
        if mode != want or (op, shape, dtype) in seen:
            continue
        seen.add((op, shape, dtype))
        best = _best_signal(rs)
        ref, comp = rs.get("reference"), rs.get("compile")
        peers = [rs[p] for p in ("liger", "cce", "verl_loop") if p in rs and _ok(rs[p])]
        bpeer = min(peers, key=lambda r: r["time_ms"]) if peers else None
        x_ref = _num(ref["time_ms"] / best["time_ms"]) + "×" if best and ref and _ok(ref) else ""
        x_comp = _num(comp["time_ms"] / best["time_ms"]) + "×" if best and comp and _ok(comp) else ""
        x_peer = (f"{_num(bpeer['time_ms'] / best['time_ms'])}× ({bpeer['provider']})" if best and bpeer else "")
        mem = f"{_mib(ref)} → {_mib(best)}" if best and ref and _ok(ref) else ""
        pct = _num(best.get("pct_of_ceiling"), 2) + "%" if best and best.get("pct_of_ceiling") is not None else ""
        if best and best.get("ceiling"):
            pct += " " + ("BW" if best["ceiling"] == "copy_gbps" else "MM")
        lines.append(f"| {op} | {shape} | {dtype} | {want} | {_ms(ref)} | {_ms(comp)} | "
                     f"{best['provider'] if best else '—'} | {_ms(best)} | {x_ref} | {x_comp} | {x_peer} | {mem} | {pct} |")
    return "\n".join(lines)


def op_tables(rows: list[dict]) -> str:
    out = []
    ops = []
    for r in rows:
        if r["op"] not in ops:
            ops.append(r["op"])
    for op in ops:
        rs_op = [r for r in rows if r["op"] == op]
        provs = _order({r["provider"] for r in rs_op})
        shown = [p for p in provs if any(_ok(r) for r in rs_op if r["provider"] == p)]
        out.append(f"### {op}\n")
        if shown:
            head = (["shape", "dtype", "mode"] + [f"{p} ms" for p in shown] + [f"{p} MiB" for p in shown]
                    + ["Signal × ref", "Signal % ceil"])
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            keys = sorted({(r["shape"], r["dtype"], r["mode"]) for r in rs_op},
                          key=lambda k: (_shape_key(k[0]), k[1], MODE_ORDER.index(k[2]) if k[2] in MODE_ORDER else 9))
            for shape, dtype, mode in keys:
                cell = {r["provider"]: r for r in rs_op if (r["shape"], r["dtype"], r["mode"]) == (shape, dtype, mode)}
                if not any(_ok(cell[p]) for p in shown if p in cell):
                    continue
                best = _best_signal(cell)
                ref = cell.get("reference")
                x = _num(ref["time_ms"] / best["time_ms"]) + "×" if best and ref and _ok(ref) else ""
                pct = _num(best.get("pct_of_ceiling"), 2) + "%" if best and best.get("pct_of_ceiling") is not None else ""
                vals = [shape, dtype, mode] + [_ms(cell.get(p)) for p in shown] + [_mib(cell.get(p)) for p in shown] + [x, pct]
                out.append("| " + " | ".join(vals) + " |")
            out.append("")
        notes = {}
        for r in rs_op:
            if not _ok(r):
                notes.setdefault((r["provider"], r["status"], r.get("note") or ""), []).append(r["shape"])
        if notes:
            for (p, status, note), shapes in notes.items():
                where = "all shapes" if len(set(shapes)) == len({r["shape"] for r in rs_op}) else ", ".join(sorted(set(shapes), key=_shape_key))
                extra = f" ({note})" if note and status == "not installed" else ""
                out.append(f"- **{p}**: {status}{extra} — {where}")
            out.append("")
        fails = [r for r in rs_op if (r.get("check") or "").startswith("FAIL")]
        for r in fails:
            out.append(f"- ⚠ **{r['provider']}** {r['shape']} {r['dtype']}: output differs from reference: {r['check']}")
        if fails:
            out.append("")
    return "\n".join(out)


def markdown(rows: list[dict], meta: dict) -> str:
    c = meta.get("ceilings", {})
    v = meta.get("versions", {})
    lines = [
        f"# Signal kernel benchmarks — {meta.get('device')}",
        "",
        f"- preset `{meta.get('preset')}`, {meta.get('date')}, {meta.get('duration_s', 0):.0f} s"
        + (" (**interrupted**)" if meta.get("interrupted") else ""),
        f"- versions: torch {v.get('torch')}, triton {v.get('triton')}, python {v.get('python')}"
        + "".join(f", {k} {v[k]}" for k in ("liger", "cce") if k in v),
        f"- ceilings measured in this run: copy {_num(c.get('copy_gbps'))} GB/s, "
        f"matmul {_num(c.get('matmul_tflops_fp32'))} TFLOP/s fp32 / {_num(c.get('matmul_tflops_bf16'))} TFLOP/s bf16",
        f"- command: `{meta.get('command')}`",
        "",
        "Times are medians (± half the p20–p80 spread) in ms; memory is the peak allocated above the inputs "
        "during one call, in MiB. \"Signal\" is the fastest of our native / Triton backends (interpreter "
        "runs excluded). % of ceiling: achieved GB/s over the measured copy bandwidth (BW), or achieved "
        "TFLOP/s over the measured matmul rate (MM) for the linear ops. `n/i` = peer not installed, "
        "`—` = not run (reason below each table), ⚠ = output differs from the reference.",
        "",
        "## Headline shapes",
        "",
        headline_table(rows, {tuple(k) for k in meta["headline_keys"]} if meta.get("headline_keys") else None),
        "",
        "## All cases",
        "",
        op_tables(rows),
    ]
    return "\n".join(lines)


# -- plots ------------------------------------------------------------------------------------

AXES = ("V", "N", "T", "H", "B")


def _human(x: int) -> str:
    return f"{x / 1000:.0f}k" if x >= 10000 else str(x)


def plots(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per op and sweep axis; returns the written paths (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plots are optional where matplotlib is missing
        return []
    pdir = os.path.join(out_dir, "plots")
    os.makedirs(pdir, exist_ok=True)
    written = []
    ok = [r for r in rows if _ok(r) and isinstance(r.get("params"), dict)
          and "interpreter" not in (r.get("note") or "")]  # interpreter runs are not performance figures
    for op in sorted({r["op"] for r in ok}):
        rs = [r for r in ok if r["op"] == op]
        for axis in AXES:
            groups: dict[tuple, list[dict]] = defaultdict(list)
            for r in rs:
                if axis not in r["params"]:
                    continue
                fixed = tuple(sorted((k, v) for k, v in r["params"].items() if k != axis))
                groups[(r["dtype"], fixed)].append(r)
            groups = {k: g for k, g in groups.items() if len({r["params"][axis] for r in g}) >= 2}
            if not groups:
                continue
            (dtype, fixed), g = max(groups.items(), key=lambda kv: len({r["params"][axis] for r in kv[1]}))
            modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in g)]
            fig, axs = plt.subplots(2, len(modes), figsize=(max(7.0, 4.2 * len(modes)), 6.4), squeeze=False)
            for j, mode in enumerate(modes):
                for p in _order({r["provider"] for r in g}):
                    pts = sorted((r["params"][axis], r) for r in g if r["mode"] == mode and r["provider"] == p)
                    if not pts:
                        continue
                    xs = [x for x, _ in pts]
                    axs[0][j].plot(xs, [r["time_ms"] for _, r in pts], marker="o", label=p)
                    mem = [(x, r["peak_mem_bytes"] / 2**20) for x, r in pts if r.get("peak_mem_bytes") is not None]
                    if mem:
                        axs[1][j].plot([x for x, _ in mem], [max(m, 1e-3) for _, m in mem], marker="o", label=p)
                axs[0][j].set_title(f"{mode}")
                ticks = sorted({r["params"][axis] for r in g})
                for i, ylabel in enumerate(("time (ms, median)", "peak memory above inputs (MiB)")):
                    ax = axs[i][j]
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(ticks, [_human(x) for x in ticks])
                    ax.minorticks_off()
                    ax.set_yscale("log")
                    ax.set_xlabel(axis)
                    ax.grid(True, which="both", alpha=0.3)
                    if j == 0:
                        ax.set_ylabel(ylabel)
            axs[0][0].legend(fontsize=8)
            fixed_s = ", ".join(f"{k}={v}" for k, v in fixed)
            fig.suptitle(f"{op} vs {axis} ({fixed_s}, {dtype}) — {g[0].get('device')}", fontsize=10)
            fig.tight_layout()
            path = os.path.join(pdir, f"{op.replace('+', '-')}_vs_{axis}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


def finalize(out_dir: str, rows: list[dict], meta: dict, *, with_plots: bool = True) -> dict:
    """Fill ratios, rewrite rows.jsonl / rows.csv, draw plots, write results.md and meta.json."""
    add_ratios(rows)
    write_rows(out_dir, rows)
    meta = dict(meta)
    meta["plots"] = [os.path.relpath(p, out_dir) for p in plots(rows, out_dir)] if with_plots else []
    text = markdown(rows, meta)
    if meta["plots"]:
        text += "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in meta["plots"]) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, default=_json_default)
    return meta
