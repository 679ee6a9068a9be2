"""The curation report: report.md, a histogram PNG per score with its thresholds, contact sheets.

Histograms show every clip's score (log-x for sharpness and motion when they span decades) with the kept
range's ends as red lines, so a threshold that cuts through the middle of a mode is visible. A
contact sheet per filter shows up to `contact_examples` clips it rejected next to kept clips,
each titled with its score: the quickest check that a filter rejects what its name says.
"""
from __future__ import annotations

import base64
import pathlib

import cv2
import numpy as np

from mugv.torch_backend.data.curation import scorers


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _thumb(c: dict) -> np.ndarray:
    data = np.frombuffer(base64.b64decode(c.get("thumb", "")), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return np.zeros((54, 96, 3), np.uint8) if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def histogram(path: pathlib.Path, name: str, values: list[float], lo, hi) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    v = np.asarray(values, dtype=np.float64)
    log = name in ("sharpness", "motion") and (v > 0).all() and v.max() / max(v.min(), 1e-9) > 50
    bins = np.geomspace(v.min(), v.max() * 1.0001, 30) if log else 30
    ax.hist(v, bins=bins, color="#4c72b0")
    if log:
        ax.set_xscale("log")
    for t, label in ((lo, "min"), (hi, "max")):
        if t is not None:
            ax.axvline(t, color="red", lw=2)
            ax.text(t, ax.get_ylim()[1] * 0.92, f" {label} {t:g}", color="red", fontsize=8)
    ax.set_title(f"{name} ({len(v)} clips)")
    ax.set_xlabel(name)
    ax.set_ylabel("clips")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def contact_sheet(path: pathlib.Path, name: str, rejected: list[dict], kept: list[dict]) -> None:
    plt = _plt()
    cols = max(len(rejected), len(kept), 1)
    fig, axes = plt.subplots(2, cols, figsize=(1.7 * cols, 3.6), dpi=100, squeeze=False)
    for row, (label, items) in enumerate((("rejected", rejected), ("kept", kept))):
        for col in range(cols):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(items):
                c = items[col]
                ax.imshow(_thumb(c))
                v = c["scores"].get(name)
                text = "group " + c.get("dup_group", "?")[-12:] if name == "duplicate" else \
                    (f"{v:.3g}" if v is not None else "-")
                ax.set_title(f"{label}: {text}", fontsize=7, color="red" if row == 0 else "green")
    fig.suptitle(f"filter: {name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(out: pathlib.Path, cfg, clips: list[dict], summary: dict) -> pathlib.Path:
    """Write report.md and its PNGs under out/report/; returns report.md's path."""
    folder = out / "report"
    folder.mkdir(exist_ok=True)
    ranges = scorers.ranges(cfg.filters, cfg.shots.min_duration_s)
    lines = ["# Curation report", "", f"Input: `{cfg.input_dir}`", "",
             f"Sources: {summary['sources']} ({summary['sources_ok']} readable); clips: "
             f"{summary['clips']}; kept: {summary['kept']}; manifest rows: {summary['manifest_rows']}"
             + (f" ({summary['range_rows']} of them time ranges of a source, decoded by seeking)" if summary["range_rows"] else ""),
             "", "## Bad inputs", ""]
    lines += [f"- {reason}: {n}" for reason, n in sorted(summary["bad_inputs"].items())] or ["- none"]
    lines += ["", "## Filters", "", "| filter | kept range | rejected (any reason) | rejected (first reason) |",
              "|---|---|---|---|"]
    for name in list(ranges) + ["duplicate", "caption"]:
        lo, hi = ranges.get(name, (None, None))
        rng = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]" if name in ranges else "-"
        if name in ranges and lo is None and hi is None:
            rng = "off"
        lines.append(f"| {name} | {rng} | {summary['rejected_by_filter'].get(name, 0)} | "
                     f"{summary['rejected_by_first_reason'].get(name, 0)} |")
    if summary["skipped_scorers"]:
        lines += ["", "Scorers not run:"] + [f"- {k}: {v}" for k, v in summary["skipped_scorers"].items()]
    lines += ["", "## Score histograms (red: kept range)", ""]
    for name, (lo, hi) in ranges.items():
        values = [c["scores"][name] for c in clips if c["scores"].get(name) is not None]
        if values:
            histogram(folder / f"hist_{name}.png", name, values, lo, hi)
            lines.append(f"![{name}](report/hist_{name}.png)")
    lines += ["", "## Contact sheets (top: rejected by the filter, bottom: kept)", ""]
    kept = [c for c in clips if c["decision"] == "kept"]
    n = cfg.contact_examples
    for name in list(ranges) + ["duplicate"]:
        rejected = [c for c in clips if name in c["reasons"]]
        if not rejected or n == 0:
            continue
        shown = kept[:n]
        if name == "duplicate":   # below each dropped copy, the member its group kept
            shown = [next((k for k in kept if k.get("dup_group") == c.get("dup_group")), None) for c in rejected[:n]]
            shown = [k for k in shown if k is not None]
        contact_sheet(folder / f"contact_{name}.png", name, rejected[:n], shown)
        lines.append(f"![{name}](report/contact_{name}.png)")
    t = summary["timing"]
    lines += ["", "## Timing", "", f"Stage CPU time {t['stage_cpu_s']:.1f} s over {summary['clips']} clips "
              f"and {t['video_s']:.1f} s of video"
              + (f" ({t['clips_per_core_s']:.2f} clips/s per core, {t['video_s_per_core_s']:.1f} s of video "
                 f"per CPU second)" if t["clips_per_core_s"] else "")]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
