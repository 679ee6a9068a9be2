"""The end-to-end demo: product clips -> VAE -> cached latents and text -> curriculum pre-training
(images, then short video; t2v + i2v) -> samples -> a report that says whether learning happened.

The vocabulary is cut down from the full product generator (`data/product_videos.py`) so that a
tiny DiT can learn it on a 2-core CPU in minutes: a few colours, shapes and motions, matte objects
on light backgrounds, 32x32 px, 17 frames. Captions are short ("a red sphere, the camera pans
left") so that the byte-level embedded text encoder keeps every word within its token budget.
Some (colour, shape, motion) combinations never appear in training (`DemoData.compositions`):
the headline is how often t2v samples of those new compositions show the caption's colour, shape
and motion as the analyzer (`data/analyzer.py`) reads them, next to the strongest text-blind
baseline (the same model sampled without its caption, with a shuffled caption, and the
majority value). Recall of captions seen in training is reported apart. `--seeds N` repeats the
whole demo over N data/training seeds and reports mean and spread.

    mugv demo [--quick] [--out runs/demo]     (or: python -m mugv.torch_backend.experiments.demo)
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from mugv.core import validate as v
from mugv.core.sampler import FlowSamplerConfig
from mugv.core.recipe import PretrainConfig, StageConfig
from mugv.torch_backend.jobs.generate_data import DemoData, curate_train, generate


@dataclasses.dataclass(frozen=True)
class DemoVAE:
    """The demo VAE's training (vae_train.py; why staged: docs/vae.md, "Why the demo VAE
    collapses"): `size` from core/vae.py VAE_SIZES, stages A, B, C in order, stopped early only by
    the `minutes` safety cap (step counts, so the result does not depend on the machine's load).

    spatial_steps / spatial_batch: stage A, the 2D VAE alone on random single frames (Adam `lr`)
    temporal_steps / temporal_batch / temporal_lr: stage B, the temporal stage alone on the frozen
        2D features of `frames`-frame windows (MSE over each channel's variance); `frames` = the
        DiT's clip length (17 = 3 latents): trained on 9-frame windows (2 latents) the temporal
        decoder lost motion on 17-frame clips (67 % instead of 100 %)
    steps / batch_size: stage C, the whole VAE end to end on `frames`-frame windows (Adam `lr`,
        foreground-weighted L1 NLL); 0 by default: 200 steps after A and B lost colour (75 -> 50 %)
    sample_posterior: False trains a plain autoencoder on the posterior mean (what the DiT is
        trained on, PretrainConfig.sample_posterior): with the KL weight of 1e-6 the posterior std
        stays near 1 for the whole short run, so decoding samples teaches the decoder to ignore z
    lr / betas: Adam of stages A and C
    colour_weight: weight of the product's mean-colour error per frame in stages A and C
        (core/vae.py::foreground_colour_error): without it red products came out orange; the
        settings (1.0, 1200 + 1500 steps) were chosen on the validation splits by
        benchmarks/vae_colour.py (docs/vae.md "Every colour")
    foreground_weight: the product's pixels weigh 1 + this in the L1 terms of stages A and C
        (vae_train.foreground_mask): a 6-10 px object on a plain 32 px background is otherwise
        not worth reconstructing early on (30 kept red apart in scratch runs, but the whole demo
        with 30 read colour on 33 % of its reconstructions against 58 % with 9, docs/vae.md)
    minutes: safety cap on the whole VAE training
    """

    size: str = "tiny"
    spatial_steps: int = 1200
    spatial_batch: int = 16
    temporal_steps: int = 1500
    temporal_batch: int = 8
    temporal_lr: float = 1e-3
    steps: int = 0
    minutes: float = 10.0
    batch_size: int = 2
    frames: int = 17
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    sample_posterior: bool = False
    foreground_weight: float = 9.0
    colour_weight: float = 1.0

    def __post_init__(self) -> None:
        from mugv.core.vae import VAE_SIZES
        v.one_of(self, "size", tuple(VAE_SIZES))
        v.non_negative_int(self, "spatial_steps", "temporal_steps", "steps")
        v.positive_int(self, "spatial_batch", "temporal_batch", "batch_size", "frames")
        if self.spatial_steps + self.temporal_steps + self.steps == 0:
            v.fail(self, "steps", "> 0 when spatial_steps and temporal_steps are 0 (nothing would train)")
        v.in_range(self, "minutes", 0, None, lo_open=True)
        v.in_range(self, "lr", 0, 1, lo_open=True)
        v.in_range(self, "temporal_lr", 0, 1, lo_open=True)
        v.in_range(self, "foreground_weight", 0, None)
        v.in_range(self, "colour_weight", 0, None)

    @property
    def total_steps(self) -> int:
        return self.spatial_steps + self.temporal_steps + self.steps


PREFERENCE_CHOICES = ("none", "dpo", "kto", "dpo,kto")


SCORED_SPLITS = ("eval", "val")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The whole demo. `pretrain.manifest` / `pretrain.vae_checkpoint` are filled in by the demo
    (the generated data and the VAE it trains).

    score: which pair of splits the report scores: "eval" (eval_new + eval_seen, the default; look
        at it once, after settings are chosen) or "val" (val_new + val_seen: for choosing settings).
    samples: prompts sampled per scored split, the first of its clips (0 = all: DemoData.held_out
        or val); each is sampled t2v, i2v (new compositions), without its caption and with a
        shuffled one. Fewer than all leaves the held-out triples unbalanced.
    seeds: > 1 runs the whole demo for data seeds data.seed .. data.seed + seeds - 1 (the DiT's
        training seed follows) under out/seed_<k>/ and reports the mean and spread.
    preference: after pre-training, the preference stage (docs/preference.md): preferences made by
        the analyzer on training prompts, then DPO and/or KTO from the pretrained checkpoint, with
        held-out caption following before/after over `preference_seeds` seeds ("none": skipped;
        each seed adds a few minutes on 2 CPU cores).
    curated: train on curated data (issue 23): the training split becomes long multi-shot 64 px
        sources of the training compositions with planted defects, curated by `mugv curate`
        (jobs/generate_data.py::curate_train); the report gains a curation section. Evaluation
        and validation splits are the generated clips either way. False: the generated clips.
    curated_drop_transitions: with `curated`, a diagnostic: also leave out the kept clips that hold
        or touch a true transition, known from the generator's truth (real data has none), to
        measure what the shot detector's missed and misplaced boundaries cost the demo."""

    out: str = "runs/demo"
    data: DemoData = DemoData()
    vae: DemoVAE = DemoVAE()
    pretrain: PretrainConfig = PretrainConfig(sample_every=150, stages=(
        StageConfig("images", frames=1, steps=200, lr=1e-3),
        StageConfig("short_video", frames=17, steps=1000, lr=1e-3, i2v=0.3)))
    sampler: FlowSamplerConfig = FlowSamplerConfig(num_steps=20, guidance_scale=3.0)
    score: str = "eval"
    samples: int = 0
    sample_seed: int = 1234
    seeds: int = 1
    preference: str = "none"
    preference_seeds: int = 3
    curated: bool = False
    curated_drop_transitions: bool = False

    def __post_init__(self) -> None:
        v.one_of(self, "score", SCORED_SPLITS)
        v.non_negative_int(self, "samples")
        v.positive_int(self, "seeds")
        v.non_negative_int(self, "sample_seed")
        v.one_of(self, "preference", PREFERENCE_CHOICES)
        v.positive_int(self, "preference_seeds")


def quick_config(out: str = "runs/demo_quick") -> DemoConfig:
    """The CI variant: fewer clips, a shorter VAE and fewer DiT steps (about 3 minutes)."""
    return DemoConfig(out=out, data=DemoData(count=96, held_out=18, val=9), vae=DemoVAE(spatial_steps=250, temporal_steps=300, minutes=3.0),
                      pretrain=PretrainConfig(sample_every=110, stages=(
                          StageConfig("images", frames=1, steps=80, lr=1e-3),
                          StageConfig("short_video", frames=17, steps=220, lr=1e-3, i2v=0.3))))


# ---------------------------------------------------------------------------------------------
# Steps


VAE_STAGES = {"spatial": "A: 2D VAE, pixel L1", "temporal": "B: temporal stage, feature MSE / variance",
              "end_to_end": "C: end to end, pixel L1"}


def train_vae(cfg: DemoConfig, manifest: pathlib.Path, log=print):
    """Train the demo VAE on the training clips through the `mugv train-vae` job
    (jobs/vae_train.py::train: stages, latent normalisation, checkpoint) with the demo's settings.
    Returns (model, checkpoint path, per-step rows {"stage", "step", "loss"}; loss = pixel L1 for
    "spatial" and "end_to_end", feature MSE over variance for "temporal")."""
    from mugv.checkpoints.format import latest_checkpoint
    from mugv.torch_backend.jobs import vae_train
    from mugv.torch_backend.jobs.loaders import load_vae
    from mugv.torch_backend.jobs.report import Progress

    d = cfg.data
    root = pathlib.Path(cfg.out) / "vae"
    done = latest_checkpoint(root / "ckpt")
    if done is not None and (root / "steps.jsonl").is_file():   # a re-run keeps the trained VAE
        rows = [json.loads(x) for x in (root / "steps.jsonl").read_text().splitlines() if x]
        log(f"[mugv] VAE: reusing {done}")
        return load_vae(cfg.vae.size, str(done)), done, rows
    tcfg = vae_train.VAETrainConfig(data=str(manifest), size=cfg.vae.size, height=d.size, width=d.size,
                                    num_frames=cfg.vae.frames, fps=d.fps, batch_size=cfg.vae.batch_size,
                                    steps=cfg.vae.steps, spatial_steps=cfg.vae.spatial_steps,
                                    spatial_batch=cfg.vae.spatial_batch, temporal_steps=cfg.vae.temporal_steps,
                                    temporal_batch=cfg.vae.temporal_batch, temporal_lr=cfg.vae.temporal_lr,
                                    lr=cfg.vae.lr, betas=cfg.vae.betas, sample_posterior=cfg.vae.sample_posterior,
                                    foreground_weight=cfg.vae.foreground_weight,
                                    colour_weight=cfg.vae.colour_weight, seed=d.seed, eval_frames=d.frames,
                                    minutes=cfg.vae.minutes, evaluate=False, out=str(root))
    rows = []
    bar = Progress(cfg.vae.total_steps, "VAE")

    def on_step(stage: str, logs: dict) -> None:
        loss = float(logs["loss"] if stage == "temporal" else logs["l1"])
        rows.append({"stage": stage, "step": logs["step"], "loss": loss})
        bar({"step": len(rows), "loss": loss})

    result = vae_train.train(tcfg, log=lambda s: None, on_step=on_step)
    bar.close()
    model, path = result["model"].eval(), result["checkpoint"]
    (root / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {k: sum(r["stage"] == k for r in rows) for k in VAE_STAGES}
    log(f"[mugv] VAE: {counts} steps in {result['seconds']:.0f} s, final loss {rows[-1]['loss']:.4f} -> {path}")
    return model, path, rows


def generate_samples(cfg: DemoConfig, run_dir: pathlib.Path, vae, prompts: dict[str, tuple], frames: int,
                     group: str = "model") -> dict[str, list[np.ndarray]]:
    """Sample and decode every prompt set with the DiT checkpoint under run_dir, loaded once.

    prompts: name -> (captions, refs, text_blind). refs: None (t2v) or (B, 3, 1, H, W) first
    frames in [-1, 1] (i2v: latent frame 0 held at their latent). text_blind: every text token
    masked, the unconditional branch caption dropout trains (cond = uncond, so no guidance).
    The same sample_seed for every set: prompt i starts from the same noise in each.
    Returns name -> uint8 (T, H, W, 3) videos."""
    import torch

    from mugv.core.vae import latent_shape
    from mugv.torch_backend.parallel import megatron_compat
    from mugv.torch_backend.jobs.loaders import load_dit, text_encoder
    from mugv.torch_backend.data.media import to_uint8
    from mugv.torch_backend.jobs.sample import sample_latents

    d, p = cfg.data, cfg.pretrain
    thw = latent_shape(frames, d.size, d.size)
    encode_text = text_encoder(p.text_encoder, p.dit)
    megatron_compat.initialize_parallel(tp=1, pp=1, cp=1, seed=cfg.sample_seed)
    try:
        _, model = load_dit(p.dit, str(run_dir / "checkpoints"), group=group)
        out = {}
        for name, (captions, refs, blind) in prompts.items():
            text, mask = encode_text(captions)
            if blind:
                mask = torch.zeros_like(mask)
            cond = None
            if refs is not None:
                with torch.no_grad():
                    cond = vae.encode(torch.as_tensor(refs), sample=False)
            z = sample_latents(model, p.dit, text, mask, thw, d.fps, cfg.sampler, cfg.sample_seed, cond)
            with torch.no_grad():
                out[name] = [to_uint8(x) for x in vae.decode(z, frames)]
    finally:
        megatron_compat.destroy_parallel()
    return out


def _derangement(n: int, seed: int) -> list[int]:
    """A permutation of range(n) without fixed points (n >= 2): prompt i is sampled with the
    caption of prompt perm[i], never its own."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if n < 2 or not np.any(perm == np.arange(n)):
            return [int(i) for i in perm]


def run(cfg: DemoConfig, log=print) -> dict:
    """Every step of the demo; writes out/report.md and out/results.json, returns the results.
    With cfg.seeds > 1, every seed's demo under out/seed_<k>/, then the summary over seeds."""
    if cfg.seeds > 1:
        return run_seeds(cfg, log)
    import time

    import torch

    from mugv.torch_backend.jobs import report, vae_eval
    from mugv.torch_backend.experiments.demo_report import summary, write_report
    from mugv.torch_backend.jobs.evaluate import ATTRIBUTES, analyzer_accuracy, majority_accuracy, per_value
    from mugv.torch_backend.jobs.pretrain import train_stages
    from mugv.torch_backend.data import media
    from mugv.torch_backend.data.decode import decode_clip, to_model_range
    from mugv.torch_backend.data.manifest import read_manifest
    from mugv.torch_backend.data.media import to_uint8
    from mugv.torch_backend.models.vae import init_vae
    from mugv.core import vae as spec

    torch.set_num_threads(1)   # small matmuls on a shared 2-core box (brief: 40x slower with 2)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    d, times, t_all = cfg.data, {}, time.monotonic()

    t0 = time.monotonic()
    manifests = generate(d, out / "data", log)
    new_split, seen_split = f"{cfg.score}_new", f"{cfg.score}_seen"
    curation = None
    if cfg.curated:
        curation = curate_train(d, out / "data" / "curated_train", log,
                                drop_transitions=cfg.curated_drop_transitions)
        manifests = {**manifests, "train": curation.pop("manifest")}
        trained = {e.caption for e in read_manifest(manifests["train"])}
        seen_caps_all = [e.caption for e in read_manifest(manifests[seen_split])]
        curation["seen_in_train"] = [sum(c in trained for c in seen_caps_all), len(seen_caps_all)]
    times["data"] = time.monotonic() - t0

    t0 = time.monotonic()
    vae, vae_ckpt, vae_rows = train_vae(cfg, manifests["train"], log)
    psnr_init = vae_eval.evaluate(init_vae(spec.vae_config(cfg.vae.size), d.seed), manifests[new_split],
                                  d.size, d.size, d.frames, d.fps)["mean_psnr"]
    held = vae_eval.evaluate(vae, manifests[new_split], d.size, d.size, d.frames, d.fps,
                             out_dir=out / "vae" / new_split)
    times["vae"] = time.monotonic() - t0
    log(f"[mugv] VAE PSNR on {len(held['clips'])} {new_split} clips: {held['mean_psnr']:.2f} dB "
        f"(untrained {psnr_init:.2f} dB), SSIM {held['mean_ssim']:.3f}")

    t0 = time.monotonic()
    pre = dataclasses.replace(cfg.pretrain, manifest=str(manifests["train"]), vae_checkpoint=str(vae_ckpt),
                              out=str(out / "pretrain"), size=d.size, fps=d.fps, vae_size=cfg.vae.size)
    cfg = dataclasses.replace(cfg, pretrain=pre)
    bars = {}

    def progress(stage):
        bars[stage.name] = report.Progress(stage.steps, stage.name)
        return bars[stage.name]

    last = train_stages(pre, progress, log=lambda s: None)
    for bar in bars.values():
        bar.close()
    times["pretrain"] = time.monotonic() - t0

    t0 = time.monotonic()
    video_frames = max(s.frames for s in pre.stages)
    new = read_manifest(manifests[new_split])[:cfg.samples or None]
    seen = read_manifest(manifests[seen_split])[:cfg.samples or None]
    new_caps, seen_caps = [e.caption for e in new], [e.caption for e in seen]
    real = {k: [decode_clip(e.path, video_frames, d.size, d.size, d.fps) for e in entries]
            for k, entries in (("new", new), ("seen", seen))}
    refs = np.stack([to_model_range(c[:1]) for c in real["new"]])
    perm = _derangement(len(new_caps), cfg.sample_seed)
    samples = generate_samples(cfg, last, vae, {
        "t2v": (new_caps, None, False), "i2v": (new_caps, refs, False), "no_caption": (new_caps, None, True),
        "shuffled": ([new_caps[j] for j in perm], None, False), "seen_t2v": (seen_caps, None, False)}, video_frames)
    times["sample"] = time.monotonic() - t0

    t0 = time.monotonic()
    with torch.no_grad():
        recon = {k: [to_uint8(vae.decode(vae.encode(media.to_video_tensor(c)[None], sample=False), len(c))[0])
                     for c in clips] for k, clips in real.items()}
    comps = json.loads((out / "data" / "compositions.json").read_text())
    results = {"score": cfg.score, "chance": d.chance, "prompts": {"new": len(new_caps), "seen": len(seen_caps)},
               "compositions": {"train": len(comps["train"]), "new": comps["eval" if cfg.score == "eval" else "val"]},
               "vae": {"psnr": held["mean_psnr"], "untrained_psnr": psnr_init, "ssim": held["mean_ssim"],
                       "steps": len(vae_rows), "stage_steps": {k: sum(r.get("stage", "end_to_end") == k for r in vae_rows)
                                                               for k in VAE_STAGES}}}
    if curation is not None:
        results["curation"] = curation
    rows = {}
    scored = {"new": {"t2v": samples["t2v"], "i2v": samples["i2v"], "no_caption": samples["no_caption"],
                      "shuffled": samples["shuffled"], "vae_recon": recon["new"], "real": real["new"]},
              "seen": {"t2v": samples["seen_t2v"], "vae_recon": recon["seen"], "real": real["seen"]}}
    for group, sets in scored.items():
        caps = new_caps if group == "new" else seen_caps
        results[group] = {}
        for name, videos in sets.items():
            results[group][name], rows[(group, name)] = analyzer_accuracy(videos, caps)
        results[group + "_rows"] = {"t2v": rows[(group, "t2v")]}
    results["new"]["majority"] = majority_accuracy(new_caps)
    results["new"]["baseline"] = {a: max(results["new"][k][a] for k in ("no_caption", "shuffled", "majority"))
                                  for a in ATTRIBUTES}
    both = new_caps + seen_caps
    results["colours"] = {name: per_value(rows[("new", name)] + rows[("seen", name)], both)
                          for name in ("t2v", "vae_recon", "real")}
    times["evaluate"] = time.monotonic() - t0
    times["total"] = time.monotonic() - t_all
    results["seconds"] = times

    # what a user looks at
    media_dir = out / "media"
    n = min(8, len(new_caps))
    for name in ("t2v", "i2v", "no_caption", "seen_t2v"):
        media.write_png(media_dir / f"{name}_grid.png", media.frame_grid(samples[name][:n]))
    media.write_png(media_dir / "held_out_grid.png", media.frame_grid(real["new"][:n]))
    for i in range(min(4, n)):
        media.write_mp4(media_dir / f"t2v_{i}.mp4", np.concatenate([real["new"][i], samples["t2v"][i], samples["i2v"][i]],
                                                                   axis=2), d.fps)
    runs = {s.name: report.read_metrics(pathlib.Path(pre.out) / "stages" / s.name / "metrics.jsonl") for s in pre.stages}
    previews = {s.name: sorted((pathlib.Path(pre.out) / "stages" / s.name / "samples").glob("step_*.png"))
                for s in pre.stages}
    report.loss_curve(runs, media_dir / "loss_curve.png", marks={k: [int(p.stem[5:]) for p in x] for k, x in previews.items()})
    report.loss_curve({label: [r for r in vae_rows if r.get("stage", "end_to_end") == stage]
                       for stage, label in VAE_STAGES.items()}, media_dir / "vae_loss_curve.png",
                      ylabel="loss (pixels in [-1, 1] / relative)")
    results["previews"] = {k: [str(p.relative_to(out)) for p in x] for k, x in previews.items()}
    if cfg.preference != "none":
        from mugv.torch_backend.experiments.preference_demo import run_preference_demo
        t0 = time.monotonic()
        pref = run_preference_demo(out, out / "preference", objectives=tuple(cfg.preference.split(",")),
                                   seeds=tuple(range(cfg.preference_seeds)), log=log)
        results["preference"] = pref["summary"]
        results["seconds"]["preference"] = time.monotonic() - t0
        results["seconds"]["total"] = time.monotonic() - t_all
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(cfg, results, new_caps, n, out)
    log(summary(results))
    log(f"[mugv] report: {out / 'report.md'}")
    return results


def run_seeds(cfg: DemoConfig, log=print) -> dict:
    """The demo for data seeds data.seed + k, k < cfg.seeds (the DiT's training seed = k), each
    under out/seed_<k>/ (a finished seed is reused: its results.json), then out/results.json with
    every seed's results and out/report.md with the mean and sample standard deviation."""
    from mugv.torch_backend.experiments.demo_report import seed_statistics, write_seeds_report
    out = pathlib.Path(cfg.out)
    per_seed = []
    for k in range(cfg.seeds):
        seed_dir = out / f"seed_{k}"
        if (seed_dir / "results.json").is_file():
            log(f"[mugv] seed {k}: reusing {seed_dir / 'results.json'}")
            per_seed.append(json.loads((seed_dir / "results.json").read_text()))
            continue
        log(f"[mugv] seed {k} of {cfg.seeds}")
        one = dataclasses.replace(cfg, out=str(seed_dir), seeds=1,
                                  data=dataclasses.replace(cfg.data, seed=cfg.data.seed + k),
                                  pretrain=dataclasses.replace(cfg.pretrain, train=dataclasses.replace(
                                      cfg.pretrain.train, seed=cfg.pretrain.train.seed + k)))
        per_seed.append(run(one, log))
    stats = seed_statistics(per_seed)
    results = {"seeds": cfg.seeds, "score": cfg.score, "statistics": stats, "per_seed": per_seed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_seeds_report(cfg, stats, out)
    log(f"[mugv] report over {cfg.seeds} seeds: {out / 'report.md'}")
    return results


def demo(cfg: DemoConfig) -> int:
    """`mugv demo` (cli/commands.py builds the config, `--quick` included)."""
    run(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="mugv end-to-end demo (see `mugv demo --help` for every option)")
    ap.add_argument("--quick", action="store_true", help="the short CI variant")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = quick_config() if a.quick else DemoConfig()
    if a.out:
        cfg = dataclasses.replace(cfg, out=a.out)
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
