"""Phase 2 of `mugv curate`: from the stage records to decisions and files.

Decision order for a clip: the quality filters (each failed one is a reason), then near-duplicate
groups among the clips that passed them (a rejected blurry copy must not remove the good one),
then the caption (from captions.jsonl / <video>.txt, else the VLM of `captioner_dir` on the
clip's middle frame; a clip without one cannot be a manifest row). Kept clips become manifest rows:

- reencode=True: `clips/<id>.mp4` (H.264, constant rate), any time range.
- reencode=False: a clip that spans its whole source is the source itself; a clip that is part
  of a source is the source with its time range (`start_s`, `end_s`), which `decode.py` reads by
  seeking (no re-encode). Those rows are also written alone to `manifest_ranges.jsonl`, itself a
  manifest, and the report counts them.
Every row carries the clip's balance weight (`weight`, mean 1 over kept clips), which the
training sampler honours (`data/sampler.py`); `weights.jsonl` keeps the attributes behind it.
"""
from __future__ import annotations

import json
import os
import pathlib
import re

from mugv.core.curation import CurateConfig
from mugv.torch_backend.data.curation import captions as captions_mod
from mugv.torch_backend.data.curation import dedup, media, report, scorers


def _latest(records: list[dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(clips by key, sources by name): the last record of each wins (a redone source rewrites
    its clips); clips of sources without a source record (killed mid-batch) are ignored."""
    sources = {r["source"]: r for r in records if r.get("kind") == "source"}
    clips = {r["key"]: r for r in records if r.get("kind") == "clip" and r["source"] in sources}
    return clips, sources


def clip_id(source: str, start_s: float) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(pathlib.Path(source).with_suffix("")))
    return f"{stem}_{int(round(start_s * 1000)):07d}"


def finalize(cfg: CurateConfig, source_names: list[str], records: list[dict]) -> dict:
    out = pathlib.Path(cfg.out_dir)
    clips, sources = _latest(records)
    order = sorted(clips.values(), key=lambda c: (c["source"], c["start_s"]))
    for c in order:
        c["reasons"] = [f["filter"] for f in c["failed"]]
        c["id"] = clip_id(c["source"], c["start_s"])
    # near duplicates among the clips that passed every filter
    passed = [c for c in order if not c["reasons"]]
    groups: dict[str, str] = {}
    if cfg.dedup.enabled:
        sigs = {c["key"]: [int(h, 16) for h in c["phash"]] for c in passed}
        groups = dedup.group(sigs, cfg.dedup.max_distance, {c["key"]: c["chroma"] for c in passed},
                             cfg.dedup.max_chroma, cfg.dedup.bands)
        rank = {c["key"]: (c["scores"]["sharpness"] or 0.0, c["end_s"] - c["start_s"]) for c in passed}
        drop = dedup.keep_one(groups, rank)
        for c in passed:
            if c["key"] in groups:
                c["dup_group"] = clips[groups[c["key"]]]["id"]
            if c["key"] in drop:
                c["reasons"].append("duplicate")
    index = captions_mod.CaptionIndex(cfg.input_dir)
    for c in order:
        c["caption"] = index.caption(c["source"], c["start_s"], c["end_s"])
        c["caption_source"] = "file" if c["caption"] else ""
    missing = [c for c in order if not c["reasons"] and not c["caption"]]
    if missing and cfg.captioner_dir:
        from mugv.torch_backend.data.curation.captioner import VLMCaptioner, caption_clips
        captioner = VLMCaptioner(cfg.captioner_dir)
        made = caption_clips(missing, cfg.input_dir, captioner)
        for c in missing:
            c["caption"] = made.get(c["key"], "")
            c["caption_source"] = f"vlm:{captioner.name}" if c["caption"] else ""
    for c in order:
        if not c["reasons"] and not c["caption"]:
            c["reasons"].append("caption")
        c["decision"] = "rejected" if c["reasons"] else "kept"
    kept = [c for c in order if c["decision"] == "kept"]
    weights = captions_mod.balance_weights({c["id"]: c["caption"] for c in kept})
    for c in kept:
        c["weight"] = weights[c["id"]]["weight"]
    rows, ranged = _manifest_rows(cfg, kept, sources)
    _write_jsonl(out / "manifest.jsonl", rows)
    _write_jsonl(out / "manifest_ranges.jsonl", ranged)
    _write_jsonl(out / "weights.jsonl", [{"id": k, **v} for k, v in weights.items()])
    # sorted: executors finish sources in any order (Ray Data does not keep it)
    bad = sorted((s for s in sources.values() if s["status"] == "bad"), key=lambda s: s["source"])
    _write_jsonl(out / "curation.jsonl",
                 [{k: v for k, v in c.items() if k not in ("thumb", "kind", "chroma")} | {"weight": weights.get(c["id"], {}).get("weight")}
                  for c in order] +
                 [{"source": s["source"], "decision": "bad input", "reason": s["reason"], "detail": s["detail"]} for s in bad])
    summary = _summary(cfg, source_names, order, sources, rows, ranged, groups)
    summary["report"] = str(report.write(out, cfg, order, summary))
    return summary


def _manifest_rows(cfg: CurateConfig, kept: list[dict], sources: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    out = pathlib.Path(cfg.out_dir)
    rows, ranged = [], []
    if cfg.reencode:
        (out / "clips").mkdir(exist_ok=True)
    for c in kept:
        src = (pathlib.Path(cfg.input_dir) / c["source"]).resolve()
        whole = c["start_frame"] == 0 and c["end_frame"] == sources[c["source"]]["frames"]
        if cfg.reencode:
            target = out / "clips" / f"{c['id']}.mp4"
            if not target.exists():   # resumable: clips are renamed into place when complete
                media.write_clip(src, c["start_frame"], c["end_frame"], target, c["fps"])
            rows.append({"id": c["id"], "path": f"clips/{c['id']}.mp4", "caption": c["caption"],
                         "weight": c["weight"]})
        elif whole:
            rows.append({"id": c["id"], "path": os.path.relpath(src, out), "caption": c["caption"],
                         "weight": c["weight"]})
        else:
            rows.append({"id": c["id"], "path": os.path.relpath(src, out), "caption": c["caption"],
                         "start_s": c["start_s"], "end_s": c["end_s"], "weight": c["weight"]})
            ranged.append(rows[-1])
    return rows, ranged


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)


def _summary(cfg, source_names, order, sources, rows, ranged, groups) -> dict:
    per_filter: dict[str, int] = {}
    for c in order:
        for r in c["reasons"]:
            per_filter[r] = per_filter.get(r, 0) + 1
    first_reason: dict[str, int] = {}
    for c in order:
        if c["reasons"]:
            first_reason[c["reasons"][0]] = first_reason.get(c["reasons"][0], 0) + 1
    bad: dict[str, int] = {}
    for s in sources.values():
        if s["status"] == "bad":
            bad[s["reason"]] = bad.get(s["reason"], 0) + 1
    skipped: dict[str, str] = {}
    for c in order:
        skipped.update(c.get("skipped", {}))
    seconds = sum(s.get("cpu_seconds", 0.0) for s in sources.values())
    video_s = sum(s.get("duration", 0.0) for s in sources.values())
    return {
        "sources": len(source_names), "sources_ok": sum(s["status"] == "ok" for s in sources.values()),
        "bad_inputs": bad, "clips": len(order), "kept": sum(c["decision"] == "kept" for c in order),
        "rejected_by_filter": per_filter, "rejected_by_first_reason": first_reason,
        "duplicate_groups": len(set(groups.values())), "manifest_rows": len(rows),
        "range_rows": len(ranged), "skipped_scorers": skipped,
        "ranges": {k: list(v) for k, v in scorers.ranges(cfg.filters, cfg.shots.min_duration_s).items()},
        "timing": {"stage_cpu_s": seconds, "clips_per_core_s": len(order) / seconds if seconds else None,
                   "video_s": video_s, "video_s_per_core_s": video_s / seconds if seconds else None},
    }
