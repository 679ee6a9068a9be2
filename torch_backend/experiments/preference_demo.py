"""The preference experiment on the demo: does DPO (or KTO) on analyzer-ranked samples of TRAINING
prompts raise caption following on HELD-OUT prompts, by more than the seed-to-seed spread?

    run_preference_demo("runs/demo", "runs/preference_demo")     (after `mugv demo --out runs/demo`)

For each seed s: preference data from the pretrained checkpoint (K candidates per distinct
training caption, candidate noise seeded by s; `jobs/preference_data.py`), a preference stage started
from the pretrained checkpoint (training seed s; `jobs/preference.py`), then the analyzer's
caption-following accuracy of text-to-video samples of the held-out prompts (`draws` noise draws
per prompt, sampling seed 10_000 + s), for the pretrained checkpoint ("before") and the tuned one
("after") with the SAME sampling noise. Reported: per seed, the mean over seeds and their sample
standard deviation, and the paired difference after - before.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

ATTRIBUTES = ("colour", "shape", "motion")


def demo_paths(base: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """The pieces of a finished `mugv demo --out base` run this experiment needs."""
    from mugv.checkpoints.format import latest_checkpoint
    from mugv.core.recipe import PretrainConfig

    base = pathlib.Path(base)
    stage = PretrainConfig().stages[-1].name
    paths = {"train": base / "data" / "train.jsonl", "held_out": base / "data" / "eval_new.jsonl",
             "vae": latest_checkpoint(base / "vae" / "ckpt"),
             "checkpoint": latest_checkpoint(base / "pretrain" / "stages" / stage / "checkpoints")}
    missing = [k for k, p in paths.items() if p is None or not pathlib.Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"demo run {base}: missing {missing} (run `mugv demo --out {base}` first)")
    return paths


def held_out_accuracy(checkpoint, vae, captions: list[str], seed: int, draws: int, dit=None, frames: int = 17,
                      size: int = 32, fps: float = 16.0, sampler=None) -> dict[str, float]:
    """Analyzer accuracy per attribute (and their mean, "all") of t2v samples: every caption
    sampled `draws` times, noise seeded by (seed, draw)."""
    import torch

    from mugv.core.sampler import FlowSamplerConfig
    from mugv.core.vae import latent_shape
    from mugv.torch_backend.parallel import megatron_compat
    from mugv.core.recipe import demo_dit
    from mugv.torch_backend.jobs.evaluate import analyzer_accuracy
    from mugv.torch_backend.jobs.loaders import load_dit, text_encoder
    from mugv.torch_backend.data.media import to_uint8
    from mugv.torch_backend.jobs.sample import sample_latents

    dit = dit or demo_dit()
    sampler = sampler or FlowSamplerConfig(num_steps=20, guidance_scale=3.0)
    text, mask = text_encoder("embedded", dit)(captions)
    thw = latent_shape(frames, size, size)
    videos, caps = [], []
    megatron_compat.initialize_parallel(tp=1, pp=1, cp=1, seed=seed)
    try:
        _, model = load_dit(dit, str(checkpoint))
        for d in range(draws):
            z = sample_latents(model, dit, text, mask, thw, fps, sampler, seed=seed * 1000 + d)
            with torch.no_grad():
                videos += [to_uint8(x) for x in vae.decode(z, frames)]
            caps += captions
    finally:
        megatron_compat.destroy_parallel()
    acc, _ = analyzer_accuracy(videos, caps)
    acc["all"] = float(np.mean([acc[a] for a in ATTRIBUTES if a in acc]))
    return acc


def _spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def run_preference_demo(base: str | pathlib.Path, out: str | pathlib.Path, objectives: tuple[str, ...] = ("dpo",),
                        seeds: tuple[int, ...] = (0, 1, 2), candidates: int = 8, draws: int = 4,
                        steps: int = 150, beta: float = 500.0, lr: float = 2e-4, batch_size: int = 8,
                        shared_data: bool = True, kto_balance: bool = True, log=print) -> dict:
    """The experiment (module docstring) on a finished demo run `base`; writes out/results.json
    and out/report.md and returns the results. KTO is run with objectives=("dpo", "kto").
    shared_data: make the preference data once (candidate seed 0) and train every seed on it
    (the spread then covers training and evaluation noise, not the data draw). kto_balance: KTO's
    desirable_weight = #undesirable / #desirable, so both labels weigh equally in total (KTO,
    Ethayarajh et al. 2024 sec. 4, recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3]; with few
    correct samples the unbalanced loss mostly pushes away from everything)."""
    import torch

    from mugv.torch_backend.jobs.loaders import load_vae
    from mugv.torch_backend.data.manifest import read_manifest
    from mugv.torch_backend.jobs.preference_data import PreferenceDataConfig, make_preferences
    from mugv.torch_backend.jobs.preference import PreferenceRunConfig, train_preference

    torch.set_num_threads(1)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = demo_paths(base)
    vae = load_vae("tiny", str(paths["vae"]))
    held = [e.caption for e in read_manifest(paths["held_out"])]
    train_captions = {e.caption for e in read_manifest(paths["train"])}
    results = {"config": dict(base=str(base), objectives=list(objectives), seeds=list(seeds), candidates=candidates,
                              draws=draws, steps=steps, beta=beta, lr=lr, batch_size=batch_size,
                              shared_data=shared_data, kto_balance=kto_balance),
               "held_out_prompts": len(held), "held_out_captions_seen_in_training": sum(c in train_captions for c in held),
               "runs": []}
    t_all = time.monotonic()
    for seed in seeds:
        t0 = time.monotonic()
        data_dir = out / ("preferences" if shared_data else f"seed{seed}/preferences")
        summary_path = data_dir / "summary.json"
        if summary_path.is_file():   # a re-run reuses finished preference data
            summary = json.loads(summary_path.read_text())
        else:
            summary = make_preferences(PreferenceDataConfig(
                checkpoint=str(paths["checkpoint"]), vae_checkpoint=str(paths["vae"]), prompts=str(paths["train"]),
                out=str(data_dir), candidates=candidates, seed=0 if shared_data else seed), log=log)
        before = held_out_accuracy(paths["checkpoint"], vae, held, 10_000 + seed, draws)
        log(f"[mugv] seed {seed}: before {before}")
        for objective in objectives:
            manifest = summary["dpo"] if objective == "dpo" else summary["kto"]
            run_dir = out / f"seed{seed}" / objective
            weight = summary["undesirable"] / max(1, summary["desirable"]) if objective == "kto" and kto_balance else 1.0
            train_preference(PreferenceRunConfig(
                manifest=manifest, reference=str(paths["checkpoint"]), out=str(run_dir), objective=objective,
                beta=beta, steps=steps, lr=lr, batch_size=batch_size, desirable_weight=weight,
                train=dataclasses.replace(PreferenceRunConfig().train, seed=seed)), log=log)
            after = held_out_accuracy(run_dir / "checkpoints", vae, held, 10_000 + seed, draws)
            log(f"[mugv] seed {seed} {objective}: after {after}")
            results["runs"].append({"seed": seed, "objective": objective, "before": before, "after": after,
                                    "data": summary, "seconds": time.monotonic() - t0})
        (out / "results.json").write_text(json.dumps(results, indent=1))
    results["summary"] = summarize(results)
    results["seconds"] = time.monotonic() - t_all
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report(results))
    log(report(results))
    return results


def summarize(results: dict) -> dict:
    """Per objective and attribute: before, after and after - before over seeds (mean, std)."""
    out = {}
    for objective in results["config"]["objectives"]:
        runs = [r for r in results["runs"] if r["objective"] == objective]
        out[objective] = {a: {"before": _spread([r["before"][a] for r in runs]),
                              "after": _spread([r["after"][a] for r in runs]),
                              "gain": _spread([r["after"][a] - r["before"][a] for r in runs])}
                          for a in (*ATTRIBUTES, "all") if all(a in r["before"] for r in runs)}
    return out


def report(results: dict) -> str:
    c = results["config"]
    lines = [f"# Preference stage on the demo ({', '.join(o.upper() for o in c['objectives'])})", "",
             f"Seeds {c['seeds']}; {c['candidates']} candidates per training prompt; {c['steps']} steps, "
             f"batch {c['batch_size']}, lr {c['lr']:g}, beta {c['beta']:g}; held-out accuracy over "
             f"{results['held_out_prompts']} prompts x {c['draws']} draws "
             f"({results['held_out_captions_seen_in_training']} of the held-out captions also occur in training).", ""]
    for objective, table in results.get("summary", {}).items():
        lines += [f"## {objective.upper()}", "", "| attribute | before (mean ± sd) | after (mean ± sd) | gain (mean ± sd) |",
                  "|---|---|---|---|"]
        for a, s in table.items():
            f = lambda x: f"{100 * x['mean']:.1f} ± {100 * x['std']:.1f} %"  # noqa: E731
            lines.append(f"| {a} | {f(s['before'])} | {f(s['after'])} | {f(s['gain'])} |")
        lines.append("")
    lines += ["## Runs", "", "| seed | objective | pairs | desirable | before all | after all |", "|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['seed']} | {r['objective']} | {r['data']['pairs']} | {r['data']['desirable']} | "
                     f"{100 * r['before']['all']:.1f} % | {100 * r['after']['all']:.1f} % |")
    return "\n".join(lines) + "\n"
