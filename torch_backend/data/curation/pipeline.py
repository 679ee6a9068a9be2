"""`mugv curate`: run the per-source stage over a folder, resumably, then dedup, decide, write.

    report = run(CurateConfig(input_dir="raw/", out_dir="curated/"))

Phase 1 (parallel, resumable): `stages.process_source` over every source not yet done, by the
chosen executor; each batch's records are appended to `out_dir/results.jsonl` and fsynced. A
source is done when its source record is in the file (written after its clips), so a rerun skips
finished sources and a SIGKILL loses at most the batches in flight; a torn last line is cut off.
Phase 2 (one process, from results.jsonl only): near-duplicate groups across all sources,
captions, the keep/reject decision with every reason, balance weights, re-encoded clips, and the
outputs (`outputs.py`, `report.py`).

Executors run the same stage function:
  local  in-process (workers=1) or a process pool (workers>1). The default: measured Ray start-up
         here is seconds (docs/curation.md), longer than a small folder takes.
  ray    Ray Data: sources -> flat_map(process_source) streamed back in batches; `ray_address`
         selects a cluster ("" starts a local Ray). Needs `pip install 'mugv[ray]'`.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import time
from typing import Iterable, Iterator

from mugv.core.curation import CurateConfig
from mugv.torch_backend.data.curation import media
from mugv.torch_backend.data.curation.stages import process_source

RESULTS = "results.jsonl"


class ResultsLog:
    """Append-only JSONL of stage records; reading tolerates (and repairs) a torn last line."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):   # killed mid-write: drop the partial line
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line))
        return out

    def append(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        if not text:
            return
        with open(self.path, "a") as f:
            f.write(text)   # one write per batch
            f.flush()
            os.fsync(f.fileno())


# Bump when a stage record's fields change: records of another format are never mixed in a resume.
RECORD_FORMAT = 1


def _check_resume_state(out: pathlib.Path, cfg: CurateConfig) -> None:
    """results.jsonl is resumed only with the record format and stage settings that wrote it (the
    shot and filter settings decide the stage records); anything else is an error naming what
    changed, instead of records of two settings mixed in one manifest."""
    from mugv.core.validate import to_dict
    state = {"record_format": RECORD_FORMAT, "shots": to_dict(cfg.shots), "filters": to_dict(cfg.filters),
             "captioner_dir": cfg.captioner_dir}
    path = out / "results.meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(state)):
            diff = sorted(k for k in state if old.get(k) != json.loads(json.dumps(state[k])))
            raise ValueError(f"{out}: its results.jsonl was written with other {diff} (this run: "
                             f"{ {k: state[k] for k in diff} }); use a new --out_dir or the same settings")
    elif (out / RESULTS).exists():
        raise ValueError(f"{out / RESULTS}: written by an older mugv curate (no results.meta.json); "
                         "use a new --out_dir")
    else:
        path.write_text(json.dumps(state, indent=1))


def done_sources(records: list[dict]) -> set[str]:
    return {r["source"] for r in records if r.get("kind") == "source"}


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _job(args):
    source, input_dir, cfg = args
    return process_source(source, input_dir, cfg)


def run_local(sources: list[str], cfg: CurateConfig, log: ResultsLog) -> None:
    """Process `sources` in batches of cfg.batch_size, in-process or with a pool of cfg.workers."""
    jobs = [(s, cfg.input_dir, cfg) for s in sources]
    if cfg.workers == 1:
        for batch in _batches(jobs, cfg.batch_size):
            log.append([r for job in batch for r in _job(job)])
        return
    # spawn: a forked child would inherit OpenMP/FFmpeg thread state of the parent
    with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
        for batch in _batches(jobs, cfg.batch_size):
            log.append([r for records in pool.map(_job, batch) for r in records])


def run_ray(sources: list[str], cfg: CurateConfig, log: ResultsLog) -> dict:
    """Ray Data: a streaming flat_map of the stage over sources; batches appended as they come.
    Returns {"ray_init_s": start-up seconds}."""
    import ray  # optional dependency: pip install 'mugv[ray]'
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    init_s = time.perf_counter() - t0
    input_dir = cfg.input_dir

    def stage(row: dict) -> list[dict]:
        # records as JSON strings: their nested, per-kind fields do not make one Arrow schema
        return [{"record": json.dumps(r)} for r in process_source(row["source"], input_dir, cfg)]

    ds = ray.data.from_items([{"source": s} for s in sources]).flat_map(stage)
    for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        log.append(json.loads(str(x)) for x in batch["record"])
    return {"ray_init_s": init_s}


def run(cfg: CurateConfig) -> dict:
    """Curate cfg.input_dir into cfg.out_dir; returns the report dict (also report.json).

    Outputs: results.jsonl (stage records, the resume state), curation.jsonl (every clip and bad
    source with scores, decision and reasons), manifest.jsonl (kept clips, the format
    `mugv cache` / `mugv train` read), weights.jsonl (balance weights by manifest id),
    report.md with histograms and contact sheets.
    """
    from mugv.torch_backend.data.curation import outputs   # phase 2 (matplotlib) only here
    if not cfg.input_dir or not cfg.out_dir:
        raise ValueError("CurateConfig.input_dir and .out_dir must be set")
    out = pathlib.Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = pathlib.Path(cfg.input_dir)
    sources = [str(p.relative_to(root)) for p in media.find_sources(root)]
    _check_resume_state(out, cfg)
    log = ResultsLog(out / RESULTS)
    finished = done_sources(log.records())
    pending = [s for s in sources if s not in finished]
    t0 = time.perf_counter()
    extra = {}
    if cfg.executor == "ray":
        extra = run_ray(pending, cfg, log)
    else:
        run_local(pending, cfg, log)
    stage_wall = time.perf_counter() - t0
    report = outputs.finalize(cfg, sources, log.records())
    report["timing"] = {"stage_wall_s": stage_wall, "sources_processed_now": len(pending),
                        "sources_resumed": len(sources) - len(pending), **extra, **report["timing"]}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
