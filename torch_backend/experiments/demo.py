"""The end-to-end demo: product clips -> VAE -> cached latents and text -> curriculum pre-training
(images, then short video; t2v + i2v) -> samples -> a report that says whether learning happened.

The vocabulary is cut down from the full product generator (`data/product_videos.py`) so that a
tiny DiT can learn it on a 2-core CPU in minutes: a few colours, shapes and motions, matte objects
on light backgrounds, 32x32 px, 17 frames. Captions are short ("a red sphere, the camera pans
left") so that the byte-level embedded text encoder keeps every word within its token budget.
The analyzer (`data/analyzer.py`) then reads the colour, shape and motion of each sample and the
report compares its accuracy with chance (1 / number of values of that attribute in the demo).

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
from mugv.torch_backend.jobs.generate_data import DemoData, generate


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
    foreground_weight: the product's pixels weigh 1 + this in the L1 terms of stages A and C
        (vae_train.foreground_mask): a 6-10 px object on a plain 32 px background is otherwise
        not worth reconstructing early on (30 kept red apart in scratch runs, but the whole demo
        with 30 read colour on 33 % of its reconstructions against 58 % with 9, docs/vae.md)
    minutes: safety cap on the whole VAE training
    """

    size: str = "tiny"
    spatial_steps: int = 700
    spatial_batch: int = 16
    temporal_steps: int = 1000
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

    @property
    def total_steps(self) -> int:
        return self.spatial_steps + self.temporal_steps + self.steps


PREFERENCE_CHOICES = ("none", "dpo", "kto", "dpo,kto")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The whole demo. `pretrain.manifest` / `pretrain.vae_checkpoint` are filled in by the demo
    (the generated data and the VAE it trains); `samples` held-out prompts are sampled t2v and i2v.
    preference: after pre-training, the preference stage (docs/preference.md): preferences made by
    the analyzer on training prompts, then DPO and/or KTO from the pretrained checkpoint, with
    held-out caption following before/after over `preference_seeds` seeds ("none": skipped; each
    seed adds a few minutes on 2 CPU cores)."""

    out: str = "runs/demo"
    data: DemoData = DemoData()
    vae: DemoVAE = DemoVAE()
    pretrain: PretrainConfig = PretrainConfig(sample_every=150)
    sampler: FlowSamplerConfig = FlowSamplerConfig(num_steps=20, guidance_scale=3.0)
    samples: int = 24
    sample_seed: int = 1234
    preference: str = "none"
    preference_seeds: int = 3

    def __post_init__(self) -> None:
        v.positive_int(self, "samples")
        v.non_negative_int(self, "sample_seed")
        v.one_of(self, "preference", PREFERENCE_CHOICES)
        v.positive_int(self, "preference_seeds")


def quick_config(out: str = "runs/demo_quick") -> DemoConfig:
    """The CI variant: fewer clips, a shorter VAE and fewer DiT steps (about 3 minutes)."""
    return DemoConfig(out=out, data=DemoData(count=96, held_out=16), vae=DemoVAE(spatial_steps=250, temporal_steps=300, minutes=3.0),
                      pretrain=PretrainConfig(sample_every=110, stages=(
                          StageConfig("images", frames=1, steps=80, lr=1e-3),
                          StageConfig("short_video", frames=17, steps=220, lr=1e-3, i2v=0.3))),
                      samples=16)


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
                                    foreground_weight=cfg.vae.foreground_weight, seed=d.seed, eval_frames=d.frames,
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


def generate_samples(cfg: DemoConfig, run_dir: pathlib.Path, vae, held_out: pathlib.Path, frames: int,
                     group: str = "model") -> dict:
    """Sample t2v and i2v clips for the first `cfg.samples` held-out captions (i2v: the held-out
    clip's first frame as the reference), decode them, and return uint8 videos and captions."""
    import torch

    from mugv.core.vae import latent_shape
    from mugv.torch_backend.parallel import megatron_compat
    from mugv.torch_backend.jobs.loaders import load_dit, text_encoder
    from mugv.torch_backend.data.media import to_uint8
    from mugv.torch_backend.jobs.sample import sample_latents
    from mugv.torch_backend.data.decode import decode_clip, to_model_range
    from mugv.torch_backend.data.manifest import read_manifest

    d, p = cfg.data, cfg.pretrain
    entries = read_manifest(held_out)[:cfg.samples]
    captions = [e.caption for e in entries]
    text, mask = text_encoder(p.text_encoder, p.dit)(captions)
    thw = latent_shape(frames, d.size, d.size)
    refs = np.stack([to_model_range(decode_clip(e.path, 1, d.size, d.size, d.fps)) for e in entries])
    with torch.no_grad():
        cond = vae.encode(torch.from_numpy(refs), sample=False)
    megatron_compat.initialize_parallel(tp=1, pp=1, cp=1, seed=cfg.sample_seed)
    try:
        _, model = load_dit(p.dit, str(run_dir / "checkpoints"), group=group)
        out = {}
        for task, c in (("t2v", None), ("i2v", cond)):
            z = sample_latents(model, p.dit, text, mask, thw, d.fps, cfg.sampler, cfg.sample_seed, c)
            with torch.no_grad():
                video = vae.decode(z, frames)
            out[task] = [to_uint8(x) for x in video]
    finally:
        megatron_compat.destroy_parallel()
    return {"captions": captions, **out}


def run(cfg: DemoConfig, log=print) -> dict:
    """Every step of the demo; writes out/report.md and out/results.json, returns the results."""
    import time

    import torch

    from mugv.torch_backend.jobs import report, vae_eval
    from mugv.torch_backend.jobs.evaluate import analyzer_accuracy
    from mugv.torch_backend.jobs.pretrain import train_stages
    from mugv.torch_backend.data import media
    from mugv.torch_backend.data.media import to_uint8
    from mugv.torch_backend.models.vae import init_vae
    from mugv.core import vae as spec

    torch.set_num_threads(1)   # small matmuls on a shared 2-core box (brief: 40x slower with 2)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    d, times, t_all = cfg.data, {}, time.monotonic()

    t0 = time.monotonic()
    manifests = generate(d, out / "data", log)
    times["data"] = time.monotonic() - t0

    t0 = time.monotonic()
    vae, vae_ckpt, vae_rows = train_vae(cfg, manifests["train"], log)
    psnr_init = vae_eval.evaluate(init_vae(spec.vae_config(cfg.vae.size), d.seed), manifests["held_out"],
                                  d.size, d.size, d.frames, d.fps)["mean_psnr"]
    held = vae_eval.evaluate(vae, manifests["held_out"], d.size, d.size, d.frames, d.fps,
                             out_dir=out / "vae" / "held_out")
    times["vae"] = time.monotonic() - t0
    log(f"[mugv] VAE PSNR on {len(held['clips'])} held-out clips: {held['mean_psnr']:.2f} dB "
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
    samples = generate_samples(cfg, last, vae, manifests["held_out"], video_frames)
    times["sample"] = time.monotonic() - t0
    t0 = time.monotonic()
    results = {"chance": d.chance, "vae": {"held_out_psnr": held["mean_psnr"], "untrained_psnr": psnr_init,
                                           "held_out_ssim": held["mean_ssim"], "steps": len(vae_rows),
                                           "stage_steps": {k: sum(r.get("stage", "end_to_end") == k for r in vae_rows)
                                                           for k in VAE_STAGES}}}
    captions = samples["captions"]
    # the analyzer on the held-out clips themselves and on their VAE reconstructions: the ceilings
    from mugv.torch_backend.data.decode import decode_clip
    from mugv.torch_backend.data.manifest import read_manifest
    real = [decode_clip(e.path, video_frames, d.size, d.size, d.fps) for e in read_manifest(manifests["held_out"])[:cfg.samples]]
    with torch.no_grad():
        recon = [to_uint8(vae.decode(vae.encode(media.to_video_tensor(c)[None], sample=False), len(c))[0])
                 for c in real]
    for name, videos in (("real", real), ("vae_recon", recon), ("t2v", samples["t2v"]), ("i2v", samples["i2v"])):
        results[name], rows = analyzer_accuracy(videos, captions)
        if name in ("t2v", "i2v"):
            results[name + "_rows"] = rows
    times["evaluate"] = time.monotonic() - t0
    times["total"] = time.monotonic() - t_all
    results["seconds"] = times

    # what a user looks at
    media_dir = out / "media"
    n = min(8, len(captions))
    media.write_png(media_dir / "t2v_grid.png", media.frame_grid(samples["t2v"][:n]))
    media.write_png(media_dir / "i2v_grid.png", media.frame_grid(samples["i2v"][:n]))
    media.write_png(media_dir / "held_out_grid.png", media.frame_grid(real[:n]))
    for i in range(min(4, n)):
        media.write_mp4(media_dir / f"t2v_{i}.mp4", np.concatenate([real[i], samples["t2v"][i], samples["i2v"][i]], axis=2), d.fps)
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
    write_report(cfg, results, captions, n, out)
    log(summary(results))
    log(f"[mugv] report: {out / 'report.md'}")
    return results


def summary(results: dict) -> str:
    lines = ["attribute  chance   t2v     i2v     VAE recon  real clips"]
    for a, c in results["chance"].items():
        lines.append(f"{a:<10} {c:6.1%}  {results['t2v'].get(a, 0):6.1%}  {results['i2v'].get(a, 0):6.1%}  "
                     f"{results['vae_recon'].get(a, 0):8.1%}  {results['real'].get(a, 0):8.1%}")
    v_ = results["vae"]
    lines.append(f"VAE PSNR held-out {v_['held_out_psnr']:.2f} dB (untrained {v_['untrained_psnr']:.2f} dB); "
                 f"wall time {results['seconds']['total']:.0f} s")
    return "\n".join(lines)


def write_report(cfg: DemoConfig, results: dict, captions: list[str], n: int, out: pathlib.Path) -> None:
    from mugv.core.validate import to_dict
    from mugv.torch_backend.jobs import report

    rows = [[a, f"{c:.1%}", f"**{results['t2v'].get(a, 0):.1%}**", f"{results['i2v'].get(a, 0):.1%}",
             f"{results['vae_recon'].get(a, 0):.1%}", f"{results['real'].get(a, 0):.1%}"]
            for a, c in results["chance"].items()]
    acc = report.table(["attribute", "chance", "t2v samples", "i2v samples", "VAE reconstructions",
                        "held-out clips"], rows)
    verdict = []
    for a, c in results["chance"].items():
        gap = results["t2v"].get(a, 0) - c
        verdict.append(f"{a}: t2v {'above' if gap > 0 else 'not above'} chance ({100 * gap:+.1f} points)")
    ceiling = [a for a, c in results["chance"].items() if results["vae_recon"].get(a, 0) <= c + 0.1]
    if ceiling:
        verdict.append(f"the VAE's own reconstructions of the held-out clips fail the analyzer on {ceiling} "
                       "(at or near chance), so no sample can show these attributes through this VAE")
    acc += "\n\n" + "; ".join(verdict) + "."
    secs = results["seconds"]
    timing = report.table(["step", "seconds"], [[k, f"{x:.0f}"] for k, x in secs.items()])
    v_ = results["vae"]
    prompts = "\n".join(f"{i}. {c}" for i, c in enumerate(captions[:n]))
    sections = [
        ("Caption following", "The analyzer (`torch_backend/data/analyzer.py`) reads colour, shape and motion of "
         f"each generated clip; accuracy = share of the {len(captions)} held-out prompts whose caption value it finds. "
         "Chance = 1 / number of values in the demo's vocabulary. i2v samples start from the held-out clip's first "
         "frame, so their colour and shape are given; their motion is not.\n\n" + acc),
        ("VAE", f"PSNR on {cfg.data.held_out} held-out generated clips ({cfg.data.frames} frames, {cfg.data.size} px): "
         f"**{v_['held_out_psnr']:.2f} dB** (untrained: {v_['untrained_psnr']:.2f} dB), SSIM {v_['held_out_ssim']:.3f}, "
         f"after {v_['steps']} steps ({', '.join(f'{k} {n}' for k, n in v_['stage_steps'].items())}; "
         "docs/vae.md). Side-by-side originals/reconstructions: [vae/held_out/](vae/held_out/). "
         "Loss: ![VAE loss](media/vae_loss_curve.png)"),
        ("Training loss", "![loss curve](media/loss_curve.png)\n\nPer-step metrics: `pretrain/stages/*/metrics.jsonl` "
         "(TensorBoard events next to them). Dotted lines: steps where the samples below were written."),
        ("Samples during training", _previews_section(results.get("previews", {}), out)),
        ("Samples", f"Rows = prompts 0..{n - 1}, columns = frames evenly spaced over the clip.\n\n{prompts}\n\n"
         "Held-out clips: ![held-out](media/held_out_grid.png)\n\ntext-to-video: ![t2v](media/t2v_grid.png)\n\n"
         "image-to-video: ![i2v](media/i2v_grid.png)\n\nVideos (held-out | t2v | i2v): "
         + ", ".join(f"[t2v_{i}.mp4](media/t2v_{i}.mp4)" for i in range(min(4, n)))),
        ("Wall time", timing),
    ]
    if "preference" in results:
        sections.insert(4, ("Preference stage", _preference_section(results["preference"])))
    report.markdown_report(out / "report.md", "mugv demo report", sections, config=to_dict(cfg))


def _preference_section(summary: dict) -> str:
    """Held-out caption following of the pretrained checkpoint and after each preference
    objective, mean ± sd over seeds (details: preference/report.md)."""
    from mugv.torch_backend.jobs import report

    rows = []
    for objective, table in summary.items():
        for a, s in table.items():
            f = lambda x: f"{100 * x['mean']:.1f} ± {100 * x['std']:.1f} %"  # noqa: E731
            rows.append([objective.upper(), a, f(s["before"]), f(s["after"]), f(s["gain"])])
    return ("Preferences made by the analyzer on training prompts, then the stage from the pretrained "
            "checkpoint; accuracy on held-out prompts (mean ± sd over seeds). Runs, data and settings: "
            "[preference/report.md](preference/report.md).\n\n"
            + report.table(["objective", "attribute", "before", "after", "gain"], rows))


def _previews_section(previews: dict[str, list[str]], out: pathlib.Path) -> str:
    """Per stage, the sample grids written while it trained (PretrainConfig.sample_every), each
    with its mp4: the same prompts and noise every time, so the rows show what training changed."""
    if not any(previews.values()):
        return "None written (`pretrain.sample_every` = 0)."
    lines = []
    for stage, pngs in previews.items():
        if not pngs:
            continue
        prompts = pathlib.Path(pngs[0]).parent / "prompts.txt"
        lines.append(f"**{stage}** (prompts: [{prompts}]({prompts}); rows = prompts, columns = frames)\n")
        for png in pngs:
            step = int(pathlib.Path(png).stem[5:])
            lines.append(f"- step {step}: [mp4]({png[:-4]}.mp4)\n\n  ![{stage} step {step}]({png})")
    return "\n".join(lines)


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
