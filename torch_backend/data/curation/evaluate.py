"""How well a curation run found what `product_sources.py` planted: the demo report's numbers.

Shot boundaries: a detected transition matches a true one when their centres are within
`tolerance_s` (one-to-one, nearest first); recall per true kind (cut, fade, dissolve; "gradual" =
fade + dissolve), precision over all detections.

Filters: each clip is labelled with the defect of the true shot it overlaps most (more than half
of the clip), and each filter is judged against the defect it exists for: sharpness <- blur,
motion <- static and shake, frozen/black never planted (their false rejections show up as the
clean clips they reject, "clean_rejected"). Dedup: a planted duplicate is found when its clip
and its original's clip land in one near-duplicate group; precision counts groups whose members
all descend from one original.

    python -m mugv.torch_backend.data.curation.evaluate OUT_DIR --sources 8 --seed 0
generates sources, curates them with `embedded_curate_config` and prints the numbers.
"""
from __future__ import annotations

import json
import pathlib

FILTER_DEFECTS = {"sharpness": ("blur",), "motion": ("static", "shake")}


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pr(tp: int, predicted: int, actual: int) -> dict:
    return {"precision": tp / predicted if predicted else None, "recall": tp / actual if actual else None,
            "tp": tp, "predicted": predicted, "actual": actual}


def shot_scores(truth: dict, source_records: list[dict], tolerance_s: float = 0.3) -> dict:
    found = {"cut": 0, "fade": 0, "dissolve": 0}
    total = {"cut": 0, "fade": 0, "dissolve": 0}
    detected = matched = kind_right = 0
    for name, t in truth["sources"].items():
        rec = next((r for r in source_records if r["source"] == name and r["status"] == "ok"), None)
        dets = [(d["start_s"] + d["end_s"]) / 2 for d in (rec or {}).get("transitions", [])]
        kinds = [d["kind"] for d in (rec or {}).get("transitions", [])]
        detected += len(dets)
        pairs = sorted((abs(d - tr["time"]), i, j) for i, d in enumerate(dets)
                       for j, tr in enumerate(t["transitions"]) if abs(d - tr["time"]) <= tolerance_s)
        used_d, used_t = set(), set()
        for _, i, j in pairs:
            if i in used_d or j in used_t:
                continue
            used_d.add(i), used_t.add(j)
            found[t["transitions"][j]["kind"]] += 1
            kind_right += kinds[i] == t["transitions"][j]["kind"] or (
                kinds[i] != "cut" and t["transitions"][j]["kind"] != "cut")
        matched += len(used_d)
        for tr in t["transitions"]:
            total[tr["kind"]] += 1
    out = {k: {"recall": found[k] / total[k] if total[k] else None, "found": found[k], "total": total[k]}
           for k in total}
    g_found, g_total = found["fade"] + found["dissolve"], total["fade"] + total["dissolve"]
    out["gradual"] = {"recall": g_found / g_total if g_total else None, "found": g_found, "total": g_total}
    out["all"] = {"precision": matched / detected if detected else None,
                  "recall": matched / sum(total.values()) if sum(total.values()) else None,
                  "detected": detected, "matched": matched,
                  "cut_vs_gradual_right": kind_right / matched if matched else None}
    return out


def label_clips(truth: dict, clips: list[dict]) -> dict[str, dict]:
    """clip key -> the true shot it overlaps most (with "source" and "shot" index), or absent."""
    out = {}
    for c in clips:
        shots = truth["sources"].get(c["source"], {}).get("shots", [])
        best, overlap = None, 0.0
        for k, s in enumerate(shots):
            o = min(s["end"], c["end_s"]) - max(s["start"], c["start_s"])
            if o > overlap:
                best, overlap = {**s, "source": c["source"], "shot": k}, o
        if best is not None and overlap > 0.5 * (c["end_s"] - c["start_s"]):
            out[c["key"]] = best
    return out


def filter_scores(truth: dict, clips: list[dict]) -> dict:
    labels = label_clips(truth, clips)
    out = {}
    for name, defects in FILTER_DEFECTS.items():
        judged = [c for c in clips if c["key"] in labels and labels[c["key"]]["defect"] != "duplicate"]
        predicted = [c for c in judged if name in c["reasons"]]
        actual = [c for c in judged if labels[c["key"]]["defect"] in defects]
        tp = sum(1 for c in predicted if labels[c["key"]]["defect"] in defects)
        out[name] = _pr(tp, len(predicted), len(actual))
    # dedup: the copy and its original in one group
    by_shot = {(lab["source"], lab["shot"]): key for key, lab in labels.items()}
    group_of = {c["key"]: c.get("dup_group") for c in clips}
    dup_clips = [k for k, lab in labels.items() if lab["defect"] in ("exact_dup", "near_dup")]
    found = 0
    for key in dup_clips:
        orig = labels[key]["original"]
        okey = by_shot.get((orig["source"], orig["shot"]))
        if okey and group_of.get(key) and group_of.get(key) == group_of.get(okey):
            found += 1
    groups: dict[str, list[str]] = {}
    for c in clips:
        if c.get("dup_group"):
            groups.setdefault(c["dup_group"], []).append(c["key"])

    def root(key):
        lab = labels.get(key)
        if lab is None:
            return None
        return (lab["original"]["source"], lab["original"]["shot"]) if lab.get("original") else (lab["source"], lab["shot"])

    pure = sum(1 for members in groups.values() if len({root(k) for k in members}) == 1 and root(members[0]))
    out["dedup"] = {"recall": found / len(dup_clips) if dup_clips else None, "found": found,
                    "planted": len(dup_clips), "groups": len(groups),
                    "precision": pure / len(groups) if groups else None}
    clean = [c for c in clips if c["key"] in labels and labels[c["key"]]["defect"] is None]
    out["clean_rejected"] = {"clean": len(clean), "rejected": sum(1 for c in clean if c["decision"] != "kept"),
                             "by": {r: sum(1 for c in clean if r in c["reasons"]) for r in
                                    sorted({r for c in clean for r in c["reasons"]})}}
    return out


def transition_in_row(truth: dict, row: dict) -> str | None:
    """Whether a clip (source path, start_s/end_s) of a generated source holds a true transition's
    centre ("centre": a missed boundary, two scenes under one caption), only some frames of one at
    an end ("edge": a boundary placed a few frames off, or a gradual one's tail), or none (None).
    Rows of other files: None."""
    src = truth["sources"].get(pathlib.Path(row["path"]).name)
    if src is None:
        return None
    s0 = row.get("start_s") or 0.0
    s1 = row["end_s"] if row.get("end_s") is not None else src["duration"]
    if any(s0 < tr["time"] < s1 for tr in src["transitions"]):
        return "centre"
    if any(tr["end"] > s0 + 1e-6 and tr["start"] < s1 - 1e-6 for tr in src["transitions"]):
        return "edge"
    return None


def edge_depth(truth: dict, row: dict) -> float:
    """Seconds of true transitions inside a clip at its ends (0 when none reaches in)."""
    src = truth["sources"][pathlib.Path(row["path"]).name]
    s0 = row.get("start_s") or 0.0
    s1 = row["end_s"] if row.get("end_s") is not None else src["duration"]
    return max([min(tr["end"], s1) - max(tr["start"], s0) for tr in src["transitions"]
                if tr["end"] > s0 + 1e-6 and tr["start"] < s1 - 1e-6] or [0.0])


def rows_spanning_transitions(truth: dict, rows: list[dict]) -> dict:
    """Of kept clips (source path, start_s/end_s), how many hold a true transition's centre and
    how many only some frames of one at an end (`transition_in_row`), with how deep those reach
    in (seconds, each such clip's deepest)."""
    rows = [r for r in rows if pathlib.Path(r["path"]).name in truth["sources"]]   # generated sources only
    found = [transition_in_row(truth, r) for r in rows]
    depths = sorted(round(edge_depth(truth, r), 4) for r, f in zip(rows, found) if f == "edge")
    return {"rows": len(rows), "transition_centre": found.count("centre"), "transition_edge": found.count("edge"),
            "edge_depth_s": depths}


def evaluate_on_truth(out_dir: str | pathlib.Path, truth_path: str | pathlib.Path) -> dict:
    """Shot and filter precision/recall of the run in `out_dir` against the generator's truth."""
    out_dir = pathlib.Path(out_dir)
    truth = json.loads(pathlib.Path(truth_path).read_text())
    records = _read_jsonl(out_dir / "results.jsonl")
    sources = {r["source"]: r for r in records if r.get("kind") == "source"}
    clips = [c for c in _read_jsonl(out_dir / "curation.jsonl") if "key" in c]
    kept = [{"path": c["source"], "start_s": c["start_s"], "end_s": c["end_s"]}   # re-encoded or ranged alike
            for c in clips if c["decision"] == "kept"]
    return {"shots": shot_scores(truth, list(sources.values())), "filters": filter_scores(truth, clips),
            "manifest": rows_spanning_transitions(truth, kept)}


def curate_generated(out_dir: str | pathlib.Path, sources: int = 8, seed: int = 0, workers: int = 1,
                     executor: str = "local") -> dict:
    """The demo's curation step: generate `sources` sources (+ the five bad inputs) under
    out_dir/sources, curate them with `embedded_curate_config` into out_dir/curated and score the
    run against the truth. Returns {"shots", "filters", "run"} (run: the report's counts and
    timing, plus generate_s)."""
    import time

    from mugv.core.curation import embedded_curate_config
    from mugv.torch_backend.data.curation.pipeline import run
    from mugv.torch_backend.data.product_sources import SourcesSpec, generate_sources, write_bad_inputs
    root = pathlib.Path(out_dir)
    t0 = time.perf_counter()
    generate_sources(root / "sources", SourcesSpec(sources=sources, seed=seed))
    write_bad_inputs(root / "sources" / "bad")
    t1 = time.perf_counter()
    report = run(embedded_curate_config(str(root / "sources"), str(root / "curated"),
                                        workers=workers, executor=executor))
    result = evaluate_on_truth(root / "curated", root / "sources" / "truth.json")
    result["run"] = {k: report[k] for k in ("sources", "sources_ok", "bad_inputs", "clips", "kept",
                                            "rejected_by_filter", "duplicate_groups", "timing", "report")}
    result["run"]["generate_s"] = t1 - t0
    return result


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Curate generated sources and score the result")
    parser.add_argument("out_dir")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--executor", default="local")
    a = parser.parse_args()
    print(json.dumps(curate_generated(a.out_dir, a.sources, a.seed, a.workers, a.executor), indent=1))
