"""`mugv curate INPUT_DIR --out_dir DIR`: raw videos -> curated manifest, decisions and report
(torch_backend/data/curation; docs/curation.md). Prints what was kept and why the rest was not."""
from __future__ import annotations

import pathlib

from mugv.core.curation import CurateConfig


def curate(cfg: CurateConfig) -> int:
    import sys

    from mugv.torch_backend.data.curation import run
    try:
        report = run(cfg)
    except ValueError as err:   # a resume with other settings, a bad config: named, nothing lost
        sys.stderr.write(f"mugv curate: error: {err}\n")
        return 2
    out = pathlib.Path(cfg.out_dir)
    bad = ", ".join(f"{k} {v}" for k, v in sorted(report["bad_inputs"].items())) or "none"
    why = ", ".join(f"{k} {v}" for k, v in sorted(report["rejected_by_first_reason"].items())) or "none"
    t = report["timing"]
    print(f"[mugv] curate: {report['sources']} sources ({report['sources_ok']} readable; bad: {bad}), "
          f"{report['clips']} clips, {report['kept']} kept; rejected (first reason): {why}")
    print(f"[mugv] curate: {t.get('sources_processed_now', 0)} sources processed now, "
          f"{t.get('sources_resumed', 0)} from an earlier run; manifest {out / 'manifest.jsonl'} "
          f"({report['manifest_rows']} rows), decisions {out / 'curation.jsonl'}, report {out / 'report.md'}")
    return 0
