"""What a user sees: a progress bar over the trainer's metrics, a loss-curve PNG and a markdown
report linking it with the config and the numbers (PNG/mp4 writing and frame grids: data/media.py)."""
from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np

from mugv.core import provenance


def one_thread_on_cpu() -> None:
    """Small models on a shared CPU: one intra-op thread is faster (spinning OpenMP threads made
    tiny matmuls 40x slower on a loaded 2-core machine)."""
    import torch
    if not torch.cuda.is_available():
        torch.set_num_threads(1)


class Progress:
    """A tqdm bar fed by the trainer's `on_metrics(metrics)` callback: step, loss, it/s,
    tokens/s, MFU (on a GPU, where the trainer reports it) and ETA (tqdm's remaining time)."""

    def __init__(self, total: int, desc: str, start: int = 0, disable: bool = False):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                        disable=disable, mininterval=1.0)
        self.t0 = time.perf_counter()
        self.tokens = 0.0

    def __call__(self, m: dict) -> None:
        shown = {}
        if isinstance(m.get("loss"), float) and math.isfinite(m["loss"]):
            shown["loss"] = f"{m['loss']:.4f}"
        if m.get("tokens_per_s"):
            shown["tok/s"] = f"{m['tokens_per_s']:.3g}"
        if m.get("mfu") is not None:
            shown["MFU"] = f"{100 * m['mfu']:.1f}%"
        if m.get("skipped"):
            shown["skipped"] = m.get("nonfinite_total", 1)
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(m["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    p = pathlib.Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def loss_curve(runs: dict[str, list[dict]], out: str | pathlib.Path, smooth: int = 20,
               marks: dict[str, list[int]] | None = None, ylabel: str = "rectified-flow loss") -> pathlib.Path:
    """One PNG: the training loss of each stage (raw, faint; moving average, solid) against the
    global step, stages laid end to end. `marks[stage]` = steps where samples were written: a
    dotted line labelled with the stage step, so the curve points at the sample grids."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    offset = 0
    for name, rows in runs.items():
        rows = [r for r in rows if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
        if not rows:
            continue
        x = np.array([r["step"] for r in rows]) + offset
        y = np.array([r["loss"] for r in rows])
        line, = ax.plot(x, y, alpha=0.25, lw=0.8)
        k = max(1, min(smooth, len(y) // 4))
        avg = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1:], avg, color=line.get_color(), lw=1.8, label=f"{name} (avg of {k})")
        for step in (marks or {}).get(name, []):
            ax.axvline(step + offset, color=line.get_color(), ls=":", lw=0.8)
            ax.annotate(f"{name[:1]}{step}", (step + offset, 1.0), xycoords=("data", "axes fraction"),
                        fontsize=6, rotation=90, va="top", ha="right", color=line.get_color())
        offset = int(x[-1])
    ax.set_xlabel("step (dotted: samples written, stages/<stage>/samples/step_<N>.png)" if marks else "step")
    ax.set_ylabel(ylabel)
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def markdown_report(path: str | pathlib.Path, title: str, sections: list[tuple[str, str]],
                    config: dict | None = None) -> pathlib.Path:
    """Write `title`, each (heading, markdown body) section, then the config as JSON."""
    lines = [f"# {title}", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.rstrip(), ""]
    if config is not None:
        lines += ["## Config", "", "```json", json.dumps(config, indent=1, default=str), "```", ""]
    env = provenance.environment()   # what produced these numbers (a rerun elsewhere may differ)
    lines += ["## Environment", "", table(["package", "version"], list(env["versions"].items())), "",
              f"Python {env['python']} on {env['platform']}; dispatch settings {env['dispatch'] or 'default'}.", ""]
    path = pathlib.Path(path)
    path.write_text("\n".join(lines))
    return path


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(out)
