"""The end-to-end demo (`mugv demo`, torch_backend/experiments/demo.py).

- `test_demo_smoke_report_layout` (CI, ~1-2 min): a miniature run goes through every step and
  writes the documented layout: report.md whose tables show what results.json holds (new
  compositions with the three text-blind baselines, seen-caption recall), the media files, and
  sample grids / mp4s written DURING training. It claims nothing about learning.
- `test_held_out_compositions_*`, `test_generated_splits_*`: the evaluation prompts are
  compositions never trained (DemoData.compositions), made of trained parts, balanced; the
  "seen" prompts are training captions.
- The full demo (CI: the README's main job, run once for the three tests; about 8 min on an idle
  2-core box): the analyzer reads the real clips, the VAE and the DiT learn, t2v on new
  compositions beats the strongest text-blind baseline by GAIN on shape and motion (colour: a
  collapse guard only), seen captions are recalled (RECALL), and red prompts come out red as far
  as the VAE renders red (RED_SLACK). The margins are below what the seed runs of docs/cli.md
  measured, by about their spread (docs/cli.md, "What the numbers mean").
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mugv.torch_backend.experiments import demo, demo_report
from mugv.torch_backend.jobs import evaluate
from mugv.torch_backend.jobs.generate_data import DemoData, generate
from mugv.core.recipe import PretrainConfig, StageConfig

# Margins for the CI's one run (data seed 0), below the seed runs of docs/cli.md by about their
# spread. The run repeats exactly on one machine (lossless clips, session 10), but data seed 0 gave
# different numbers on session 10's and session 11's machines (same code, same lock; presumably
# the CPU's kernels), as different as two seeds.
# - new compositions: t2v >= the strongest text-blind baseline + GAIN. Session 11, seeds 0/1/2:
#   shape +48.1/+48.1/+51.9, motion +51.9/+66.7/+63.0 points (session 10's seed 0: +48.1, +66.7).
#   Colour: +25.9/+0.0/-3.7 (session 10's seed 0: +3.7), mean 7.4 +/- 16.1: colour on new
#   compositions is NOT shown to generalise (the VAE's temporal stage shifts hues, docs/vae.md
#   "Every colour"), so its margin is a collapse guard, one seed sd below the baseline (about the
#   no-caption level, 16.0 %), not a claim of learning.
# - seen captions: recall >= RECALL. Shape and motion measured 92.6-100 %; colour from 70.4 %
#   (session 11's seed 0) to a mean of 92.6 % (session 5), so its floor is the lowest less about
#   one seed sd (9.8 points).
# - red: the VAE's reconstructions of the same clips bound how red a sample can come out (seed 0 on
#   session 11's machine: reconstructions 1 of 15 red, t2v 2). t2v must make red at least as many
#   red prompts as the VAE reconstructs red, less RED_SLACK prompts (session 5's seed 0: t2v 10 of
#   15 against 12 reconstructed), so a text-blind DiT fails where the VAE renders red.
GAIN = {"colour": -0.15, "shape": 0.25, "motion": 0.35}
RECALL = {"colour": 0.60, "shape": 0.80, "motion": 0.80}
RED_SLACK = 2


def _tables(report: str) -> dict[str, dict[str, list[str]]]:
    """The report's markdown tables by section: {section: {first cell: other cells}}."""
    out = {}
    for section in re.split(r"^## ", report, flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        rows = [line.strip("|").split("|") for line in body.splitlines() if line.startswith("| ")]
        out[title.strip()] = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}
    return out


def _pct(cell: str) -> float:
    return float(cell.strip("*%")) / 100


def _check_layout(out, results, stages):
    report = (out / "report.md").read_text()
    tables = _tables(report)
    new, seen = tables["New compositions"], tables["Seen captions"]
    assert set(new) == set(seen) == {"colour", "shape", "motion"}, report[:3000]
    saved = json.loads((out / "results.json").read_text())
    for a in ("colour", "shape", "motion"):      # the report shows what results.json holds
        cells = new[a]
        assert [_pct(c) for c in cells[:5]] == pytest.approx(
            [saved["new"][k][a] for k in ("majority", "no_caption", "shuffled", "baseline", "t2v")], abs=1e-3)
        assert saved["new"]["baseline"][a] == max(saved["new"][k][a] for k in ("majority", "no_caption", "shuffled"))
        assert _pct(seen[a][0]) == pytest.approx(saved["seen"]["t2v"][a], abs=1e-3)
    for name in ("loss_curve.png", "vae_loss_curve.png", "t2v_grid.png", "i2v_grid.png", "no_caption_grid.png",
                 "seen_t2v_grid.png", "held_out_grid.png", "t2v_0.mp4"):
        assert (out / "media" / name).stat().st_size > 500, name
    for stage, steps in stages.items():
        written = saved["previews"][stage]
        assert [int(p.rsplit("step_", 1)[1][:-4]) for p in written] == steps, (stage, written)
        for png in written:
            assert (out / png).stat().st_size > 200 and (out / png[:-4]).with_suffix(".mp4").stat().st_size > 200
            assert f"]({png})" in report                               # the report shows each grid
    return saved, report


def test_demo_smoke_report_layout(tmp_path):
    cfg = demo.DemoConfig(out=str(tmp_path), data=DemoData(count=12, held_out=3, val=2),
                          vae=demo.DemoVAE(spatial_steps=2, temporal_steps=2),
                          pretrain=PretrainConfig(sample_every=2, sample_prompts=2, stages=(
                              StageConfig("images", frames=1, steps=3, batch_size=4, warmup_steps=1),
                              StageConfig("short_video", frames=17, steps=2, batch_size=4, warmup_steps=1, i2v=0.5))),
                          samples=3)
    results = demo.run(cfg, log=lambda s: None)
    _check_layout(tmp_path, results, {"images": [2, 3], "short_video": [2]})


def _triples(path):
    return [(r["colour"], r["shape"], r["motion"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_compositions_are_balanced_and_made_of_trained_parts(seed):
    """DemoData.compositions: train / eval / val disjoint; the held-out pair has no triple in
    training; every value and every other pair does; each held-out attribute spread evenly."""
    cfg = DemoData(seed=seed)
    comps = cfg.compositions()
    train, held, val = (set(comps[k]) for k in ("train", "eval", "val"))
    assert len(train) + len(held) + len(val) == 36 and not (train & held or train & val or held & val)
    assert len(held) == 3 + cfg.held_out_triples and len(val) == cfg.val_triples
    assert {("green", "cone", m) for m in cfg.motions} <= held
    assert not any(t[:2] == ("green", "cone") for t in train)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        pairs = {(t[i], t[j]) for t in train}
        every = {(x, y) for x in (cfg.colours, cfg.shapes, cfg.motions)[i] for y in (cfg.colours, cfg.shapes, cfg.motions)[j]}
        assert every - pairs <= ({("green", "cone")} if (i, j) == (0, 1) else set())
    for group in (held, val):
        for i, values in enumerate((cfg.colours, cfg.shapes, cfg.motions)):
            counts = [sum(t[i] == x for t in group) for x in values]
            assert max(counts) <= -(-len(group) // len(values)), (i, counts)


def test_generated_splits_hold_out_what_they_say(tmp_path):
    """The manifests: no eval_new / val_new clip shows a trained composition, every eval_seen /
    val_seen caption occurs verbatim in train.jsonl, and the new splits go round their triples."""
    cfg = DemoData(count=40, held_out=9, val=6, frames=9)
    manifests = generate(cfg, tmp_path, log=lambda s: None)
    comps = {k: {tuple(t) for t in x} for k, x in json.loads((tmp_path / "compositions.json").read_text()).items()}
    trained = set(_triples(tmp_path / "train_attributes.jsonl"))
    assert trained <= comps["train"]
    for split, which in (("eval_new", "eval"), ("val_new", "val")):
        got = _triples(tmp_path / f"{split}_attributes.jsonl")
        assert set(got) <= comps[which] and not set(got) & trained
        assert len(set(got)) == min(len(got), len(comps[which]))
    train_captions = {json.loads(x)["caption"] for x in manifests["train"].read_text().splitlines()}
    for split in ("eval_seen", "val_seen"):
        captions = [json.loads(x)["caption"] for x in manifests[split].read_text().splitlines()]
        assert captions and set(captions) <= train_captions


def test_every_demo_caption_fits_the_text_encoder():
    """Issue 26: a caption longer than the embedded encoder's limit is cut (two motions then
    encode alike). Every caption the demo's vocabulary can make fits the demo DiT's limit."""
    import itertools

    from mugv.core.recipe import demo_dit
    from mugv.torch_backend.data.text import ByteTokenizer
    from mugv.torch_backend.jobs.generate_data import caption
    from mugv.torch_backend.data.product_videos import COLOURS, MOTIONS, SHAPES
    captions = [caption(c, s, m, k) for c, s, m, k in itertools.product(COLOURS, SHAPES, MOTIONS, (0, 1))]
    tokenizer = ByteTokenizer(demo_dit().text_max_len)
    tokenizer(captions)
    assert tokenizer.truncation.cut == 0, max(captions, key=len)
    longest = max(len(c.encode()) for c in captions)
    assert longest <= tokenizer.truncation.limit, longest


def test_baselines_and_seed_statistics():
    assert evaluate.majority_accuracy(["a red cone, slow pan left", "a red sphere, slow zoom in",
                                   "a blue sphere, the camera pans left", "a green cube, slow pan left"]) == \
        {"colour": 0.5, "shape": 0.5, "motion": 0.75}
    for n in (2, 3, 10):
        perm = demo._derangement(n, 0)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    attrs = ("colour", "shape", "motion")
    fake = lambda x: {a: x for a in attrs}  # noqa: E731
    runs = [{"new": {k: fake(x) for k in ("t2v", "baseline", "no_caption", "shuffled", "majority", "i2v", "vae_recon")},
             "seen": {k: fake(x) for k in ("t2v", "vae_recon")},
             "colours": {"t2v": {"red": [r, 4]}, "vae_recon": {"red": [4, 4]}}} for x, r in ((0.5, 1), (0.7, 3))]
    for r in runs:
        r["new"]["baseline"] = fake(0.3)
    stats = demo_report.seed_statistics(runs)
    assert stats["new.t2v"]["colour"]["mean"] == pytest.approx(0.6)
    assert stats["new.t2v"]["colour"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert stats["gain"]["motion"]["values"] == pytest.approx([0.2, 0.4])
    assert stats["red"]["t2v"]["mean"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = demo.run(demo.DemoConfig(out=str(out)), log=lambda s: None)
    return out, results


# The full demo runs in CI (about 8 of the CI's 45 minutes): the claim that learning happened is
# proven where every change lands, not only on demand.
def test_full_demo_learns(full_run):
    out, results = full_run
    steps = {s.name: [*range(150, s.steps, 150), s.steps] for s in demo.DemoConfig().pretrain.stages}
    saved, _ = _check_layout(out, results, steps)
    assert all(saved["new"]["real"][a] >= 0.9 and saved["seen"]["real"][a] >= 0.9 for a in saved["chance"])
    v = results["vae"]
    assert v["psnr"] > v["untrained_psnr"] + 5
    for stage in ("images", "short_video"):
        metrics = [json.loads(x) for x in (out / "pretrain" / "stages" / stage / "metrics.jsonl").read_text().splitlines()]
        mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)  # noqa: E731
        assert mean(metrics[-10:]) < mean(metrics[:10]), stage        # the DiT's loss goes down


def test_full_demo_follows_new_compositions(full_run):
    """t2v on compositions never trained beats the strongest text-blind baseline by GAIN (colour:
    does not collapse below it by more than a seed sd)."""
    _, results = full_run
    new = results["new"]
    for a, gain in GAIN.items():
        assert new["t2v"][a] >= new["baseline"][a] + gain, \
            f"{a}: t2v {new['t2v'][a]:.1%} vs baseline {new['baseline'][a]:.1%} ({gain:+.0%} wanted)"


def test_full_demo_recalls_seen_captions_and_makes_red(full_run):
    _, results = full_run
    assert set(results["seen"]["t2v"]) == set(RECALL)
    for a, x in results["seen"]["t2v"].items():
        assert x >= RECALL[a], f"seen-caption recall {a} {x:.1%} < {RECALL[a]:.0%}"
    hits, prompts = results["colours"]["t2v"]["red"]
    vae_hits, vae_prompts = results["colours"]["vae_recon"]["red"]
    assert prompts == vae_prompts > 0
    assert hits >= vae_hits - RED_SLACK, \
        f"red prompts made red: t2v {hits} of {prompts}, the VAE's reconstructions {vae_hits} (slack {RED_SLACK})"


def test_foreground_mask_marks_the_product_not_the_background():
    """The demo VAE's foreground weight (vae_train.foreground_mask): pixels away from the frame's
    border colour are the product; backgrounds of any plain colour (plus codec-sized noise) are not."""
    import torch

    from mugv.torch_backend.jobs.vae_train import foreground_mask
    g = torch.Generator().manual_seed(3)
    b, t, h, w = 3, 5, 24, 40
    background = torch.rand(b, 3, 1, 1, 1, generator=g) * 1.6 - 0.8
    video = background + 0.01 * torch.randn(b, 3, t, h, w, generator=g)
    truth = torch.zeros(b, 1, t, h, w)
    for i in range(b):                       # a box per clip and frame, moving, of a random colour
        colour = torch.rand(3, generator=g) * 2 - 1
        colour = torch.where((colour - background[i, :, 0, 0, 0]).abs() < 0.3, -colour.sign() * 0.9, colour)
        for k in range(t):
            y, x = 4 + k, 6 + 3 * k + i
            video[i, :, k, y:y + 7, x:x + 9] = colour[:, None, None]
            truth[i, 0, k, y:y + 7, x:x + 9] = 1
    mask = foreground_mask(video)
    assert mask.shape == truth.shape and mask.dtype == video.dtype
    assert torch.equal(mask, truth)
