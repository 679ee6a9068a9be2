"""The end-to-end demo's short variant (`mugv demo --quick`): every step runs (data, VAE, cache,
two-stage curriculum, t2v and i2v samples, report) and the report holds the numbers; the VAE
improves on its untrained self and the analyzer reads the held-out clips.

Caption following above chance is NOT reached by the quick run: in its 45 s the tiny VAE
(core/vae.py "tiny") reconstructs every product clip as the same blurred blob (73 steps, 17.5 dB;
its reconstructions of the real clips score 0 % colour, 12.5 % motion), so no DiT can show an
attribute through it. The full demo (VAE 4 min) gets motion through: t2v motion 50 % vs chance
33 % (every pan direction right, docs/cli.md). `test_caption_following_beats_chance` states that
target for the quick run and is marked xfail until the VAE learns faster; XPASS shows when it does.
"""
from __future__ import annotations

import json
import re

import pytest

from mugv.torch_backend import demo

MOTION_MARGIN = 0.10     # target: t2v motion accuracy >= chance (33 %) + this (full demo: +16.7 points)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = demo.run(demo.quick_config(out=str(out)), log=lambda s: None)
    return out, results


def _accuracy_rows(report: str) -> dict[str, list[float]]:
    """The report's table: | attribute | chance | **t2v** | i2v | VAE recon | held-out clips |."""
    return {m.group(1): [float(x) / 100 for x in m.groups()[1:]]
            for m in re.finditer(r"^\| (colour|shape|motion) \| ([\d.]+)% \| \*\*([\d.]+)%\*\* \| ([\d.]+)% \| "
                                 r"([\d.]+)% \| ([\d.]+)% \|$", report, re.M)}


@pytest.mark.slow  # about 4-5 minutes on a loaded 2-core box: beyond the CI budget
def test_quick_demo_runs_and_reports(quick_run):
    out, results = quick_run
    report = (out / "report.md").read_text()
    rows = _accuracy_rows(report)
    assert set(rows) == {"colour", "shape", "motion"}, report[:2000]
    assert [rows[a][0] for a in ("colour", "shape", "motion")] == pytest.approx([1 / 4, 1 / 3, 1 / 3], abs=1e-3)
    saved = json.loads((out / "results.json").read_text())
    assert saved["t2v"]["colour"] == pytest.approx(rows["colour"][1], abs=1e-3)
    assert all(r[4] >= 0.9 for r in rows.values()), rows      # the analyzer reads the real clips
    v = results["vae"]
    assert v["held_out_psnr"] > v["untrained_psnr"] + 5
    for name in ("loss_curve.png", "vae_loss_curve.png", "t2v_grid.png", "i2v_grid.png", "held_out_grid.png",
                 "t2v_0.mp4"):
        assert (out / "media" / name).stat().st_size > 500, name
    for stage in ("images", "short_video"):
        metrics = [json.loads(x) for x in (out / "pretrain" / "stages" / stage / "metrics.jsonl").read_text().splitlines()]
        first, last = metrics[:10], metrics[-10:]
        mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)  # noqa: E731
        assert mean(last) < mean(first), stage                        # the DiT's loss goes down


@pytest.mark.slow
@pytest.mark.xfail(reason="the tiny VAE collapses to one reconstruction within the demo budget "
                          "(docs/cli.md); caption following cannot show through it yet", strict=False)
def test_caption_following_beats_chance(quick_run):
    out, _ = quick_run
    rows = _accuracy_rows((out / "report.md").read_text())
    chance, t2v = rows["motion"][0], rows["motion"][1]
    assert t2v >= chance + MOTION_MARGIN, f"t2v motion accuracy {t2v:.1%} vs chance {chance:.1%}"
