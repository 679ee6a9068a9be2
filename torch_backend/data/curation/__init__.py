"""`mugv curate`: raw videos -> shots -> quality scores and filters -> dedup -> captions and
balance -> a training manifest and a report (docs/curation.md).

Entry point for the CLI and the demo: `run(CurateConfig(...)) -> report dict` (config in
`mugv.core.curation`). `evaluate.evaluate_on_truth` scores a run on generated sources.
"""
from mugv.core.curation import CurateConfig, DedupConfig, FilterConfig, ShotConfig, embedded_curate_config
from mugv.torch_backend.data.curation.pipeline import run

__all__ = ["CurateConfig", "DedupConfig", "FilterConfig", "ShotConfig", "embedded_curate_config", "run"]
