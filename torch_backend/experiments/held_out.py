"""The held-out-attribute experiment (docs/finetune.md): pretrain the demo's DiT on clips without
one attribute value, then fine-tune LoRA on the clips with it, and read caption following before
and after with the analyzer.

    python -m mugv.torch_backend.experiments.held_out --out runs/held_out --held_out colour=blue
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from mugv.core import validate as v
from mugv.core.lora import LoRAConfig
from mugv.torch_backend.jobs.finetune import FinetuneConfig, finetune, finetuned_model, prepare_data
from mugv.torch_backend.jobs.loaders import text_identity, weights_identity



def held_out_experiment(out_dir: str | os.PathLike, attribute: str = "colour", value: str = "blue",
                        vae_checkpoint: Optional[str] = None, pretrain=None, steps: int = 300,
                        lora: LoRAConfig = LoRAConfig(rank=8, alpha=8.0), lr: float = 1e-3,
                        seeds: tuple[int, ...] = (1234, 4321), replay: bool = True,
                        log: Callable[[str], None] = print) -> dict:
    """Does LoRA teach a pretrained DiT an attribute value it never saw?

    1. The demo's clips (`demo.generate`, all values) are split: clips WITHOUT `value` of
       `attribute` pretrain the DiT (the demo's curriculum, `pretrain` or the demo default);
       the clips WITH it are the fine-tuning set, with `replay` together with the pretraining
       clips (without replay LoRA learns "always `value`": measured, docs/finetune.md).
    2. Before: text-to-video samples of every caption naming `value` (each colour/shape/motion
       combination with it, both caption variants, one sample per seed) are scored by the analyzer.
    3. LoRA (`lora`, base frozen) trains on the fine-tuning set for `steps` steps; the same
       prompts and noise are sampled again with the adapters merged.
    `vae_checkpoint`: a trained demo VAE (e.g. runs/demo/vae/ckpt/step_N); None trains one as
    the demo does. Writes out_dir/held_out.json and before/after PNG grids; returns the numbers.
    """
    from mugv.core.data import BucketSpec
    from mugv.core.sampler import FlowSamplerConfig
    from mugv.core.train import OptimizerConfig
    from mugv.core.vae import latent_shape
    from mugv.torch_backend.experiments import demo
    from mugv.torch_backend.jobs.generate_data import DemoData, caption, generate
    from mugv.torch_backend.data import media
    from mugv.torch_backend.parallel import megatron_compat
    from mugv.torch_backend.jobs.evaluate import analyzer_accuracy
    from mugv.torch_backend.jobs.loaders import load_vae, text_encoder
    from mugv.torch_backend.jobs.pretrain import train_stages
    from mugv.torch_backend.data.media import to_uint8
    from mugv.torch_backend.jobs.sample import sample_latents
    from mugv.torch_backend.data.cache import vae_encoder

    torch.set_num_threads(1)
    out = Path(out_dir)
    d = DemoData()
    values = {"colour": d.colours, "shape": d.shapes, "motion": d.motions}
    if attribute not in values or value not in values[attribute]:
        raise ValueError(f"held-out {attribute}={value!r}: expected one of {values.get(attribute, values)}")
    manifests = generate(d, out / "data", log)
    rows = [json.loads(x) for x in manifests["train"].read_text().splitlines()]
    attrs = [json.loads(x) for x in (out / "data" / "train_attributes.jsonl").read_text().splitlines()]
    split = {"pretrain": [r for r, a in zip(rows, attrs) if a[attribute] != value],
             "finetune": [r for r, a in zip(rows, attrs) if a[attribute] == value or replay]}
    tag = "_replay" if replay else ""
    for name, part in split.items():
        (out / "data" / f"{name}{tag if name == 'finetune' else ''}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    log(f"[mugv] held-out {attribute}={value}: {len(split['pretrain'])} pretraining clips without it, "
        f"{len(split['finetune'])} fine-tuning clips ({'all' if replay else 'only those with it'})")

    cfg = demo.DemoConfig(out=str(out / "demo_vae"))
    if vae_checkpoint is None:
        _, vae_checkpoint, _ = demo.train_vae(cfg, manifests["train"], log)
    vae = load_vae(cfg.vae.size, str(vae_checkpoint))
    pre = dataclasses.replace(pretrain or cfg.pretrain, manifest=str(out / "data" / "pretrain.jsonl"),
                              vae_checkpoint=str(vae_checkpoint), out=str(out / "pretrain"), sample_every=0)
    base_run = train_stages(pre, log=log)
    base = base_run / "checkpoints"

    others = [dict(zip([k for k in values if k != attribute], combo)) for combo in
              __import__("itertools").product(*[values[k] for k in values if k != attribute])]
    def captions_for(val):
        out = []
        for o in others:
            pick = {**o, attribute: val}
            out += [caption(pick["colour"], pick["shape"], pick["motion"], variant) for variant in (0, 1)]
        return out

    prompts = captions_for(value)
    # control: the values pretraining did see; LoRA on `value` alone must not turn them into it
    controls = [c for other in values[attribute] if other != value for c in captions_for(other)]
    text_enc = text_encoder(pre.text_encoder, pre.dit)
    frames = max(s.frames for s in pre.stages)
    thw = latent_shape(frames, d.size, d.size)
    sampler_cfg = FlowSamplerConfig(num_steps=20, guidance_scale=3.0)

    def score(adapters, name_):
        megatron_compat.initialize_parallel(tp=1, pp=1, cp=1, seed=0)
        try:
            _, model = finetuned_model(base, adapters)
            videos = {}
            for name, caps in (("held_out", prompts), ("control", controls)):
                text, mask = text_enc(caps)
                videos[name] = []
                for seed in seeds:
                    z = sample_latents(model, pre.dit, text, mask, thw, d.fps, sampler_cfg, seed)
                    with torch.no_grad():
                        videos[name] += [to_uint8(x) for x in vae.decode(z, frames)]
        finally:
            megatron_compat.destroy_parallel()
        acc, per = analyzer_accuracy(videos["held_out"], prompts * len(seeds))
        control, _ = analyzer_accuracy(videos["control"], controls * len(seeds))
        media.write_png(out / f"{name_}_grid.png", media.frame_grid(videos["held_out"][:8]))
        got = [r.get(attribute) for r in per]
        log(f"[mugv] {name_}: {attribute} accuracy on '{value}' prompts {acc[attribute]:.1%} (read "
            f"{ {g: got.count(g) for g in sorted(set(map(str, got)))} }); on the other {attribute} prompts "
            f"{control[attribute]:.1%}")
        return {**acc, "control": control}, got

    before, got_before = score(None, "before")
    bucket = BucketSpec(d.size, d.size, frames, batch_size=16, fps=d.fps)
    source = prepare_data(out / "data" / f"finetune{tag}.jsonl", (bucket,), vae_encoder(vae), text_enc,
                          video_name=f"vae:{weights_identity(vae_checkpoint)}",
                          text_name=text_identity(pre.text_encoder, pre.dit),
                          cache_dir=out / f"finetune_cache{tag}", log=log, sample_posterior=pre.sample_posterior)
    ft = FinetuneConfig(mode="lora", lora=lora, buckets=(bucket,), i2v=0.0)
    train = dataclasses.replace(pre.train, steps=steps, seed=0,
                                optimizer=OptimizerConfig(lr=lr, min_lr=lr, warmup_steps=10))
    result = finetune(base, source, out / f"lora{tag}", ft, train, flow=pre.flow, log=log)
    after, got_after = score(result["adapters"], f"after{tag}")
    numbers = {"attribute": attribute, "value": value, "prompts": len(prompts), "control_prompts": len(controls),
               "seeds": list(seeds),
               "samples": len(prompts) * len(seeds), "chance": 1 / len(values[attribute]),
               "before": before, "after": after, "read_before": got_before, "read_after": got_after,
               "lora": v.to_dict(lora), "steps": steps, "lr": lr,
               "trainable_params": result["trainable_params"], "total_params": result["total_params"],
               "pretrain_clips": len(split["pretrain"]), "finetune_clips": len(split["finetune"]), "replay": replay}
    (out / f"held_out{tag}.json").write_text(json.dumps(numbers, indent=1))
    return numbers


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mugv.torch_backend.experiments.held_out",
                                 description="held-out-attribute LoRA experiment (docs/finetune.md)")
    ap.add_argument("--out", default="runs/held_out")
    ap.add_argument("--held_out", default="colour=blue", help="attribute=value kept out of pretraining")
    ap.add_argument("--vae_checkpoint", default=None, help="a trained demo VAE (default: train one)")
    ap.add_argument("--steps", type=int, default=300, help="LoRA steps")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 4321], help="sampling seeds")
    ap.add_argument("--no_replay", action="store_true", help="fine-tune on the held-out value's clips only")
    a = ap.parse_args(argv)
    attribute, _, value = a.held_out.partition("=")
    numbers = held_out_experiment(a.out, attribute, value.replace("_", " "), a.vae_checkpoint, steps=a.steps,
                                  lora=LoRAConfig(rank=a.rank, alpha=float(a.rank)), lr=a.lr, seeds=tuple(a.seeds),
                                  replay=not a.no_replay)
    print(json.dumps({k: numbers[k] for k in ("attribute", "value", "samples", "chance", "before", "after")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
