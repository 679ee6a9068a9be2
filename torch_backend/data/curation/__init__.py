"""`mugv curate`: raw videos -> shots -> quality scores and filters -> dedup -> captions and
balance -> a training manifest and a report (docs/curation.md).

Entry point for the CLI and the demo: `run(CurateConfig(...)) -> report dict` (config in
`mugv.core.curation`). For the demo: `evaluate.curate_generated(out_dir, sources, seed)` generates
sources with planted defects, curates them and returns shot and filter precision/recall.
"""
from mugv.core.curation import CurateConfig, DedupConfig, FilterConfig, ShotConfig, embedded_curate_config
from mugv.torch_backend.data.curation.pipeline import run

__all__ = ["CurateConfig", "DedupConfig", "FilterConfig", "ShotConfig", "embedded_curate_config", "run"]
