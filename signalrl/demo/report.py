"""What the demo writes and prints: ``metrics.jsonl`` (:class:`Recorder`), ``curves.png``, the before / after
table."""
from __future__ import annotations

import json
from typing import Any


class Recorder:
    """Appends demo-level metrics to ``metrics.jsonl`` and keeps curves for the plot."""

    def __init__(self, path: str):
        self.path = path
        self.curves: dict[str, list[tuple[int, float]]] = {}
        open(path, "w").close()

    def log(self, stage: str, step: int, **values: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.curves.setdefault(f"{stage}/{k}", []).append((step, float(v)))


def plot_curves(rec: Recorder, path: str, algo: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rl = {"ppo": "ppo", "grpo": "grpo", "dpo": "dpo"}[algo]
    panels = [
        ("SFT loss", ["sft/loss"]),
        ("reward model" if algo != "dpo" else "DPO preference accuracy",
         ["reward_model/loss", "reward_model/accuracy"] if algo != "dpo" else ["dpo/accuracy"]),
        (f"{algo.upper()} reward", [f"{rl}/reward", f"{rl}/task_score"] if algo != "dpo" else ["dpo/task_score"]),
        (f"{algo.upper()} KL and loss", [f"{rl}/kl", f"{rl}/loss"] if algo != "dpo" else ["dpo/loss", "dpo/margin"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = rec.curves.get(key)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key.split("/", 1)[1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"signal demo ({algo})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def print_table(rows: list[tuple[str, str, str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in ("metric", "before", "after"):
            table.add_column(col, justify="right" if col != "metric" else "left")
        for r in rows:
            table.add_row(*r)
        Console().print(table)
    except ImportError:
        print(title)
        for r in rows:
            print(f"  {r[0]:<34} {r[1]:>12} {r[2]:>12}")
