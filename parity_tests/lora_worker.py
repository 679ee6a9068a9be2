"""Worker processes of parity_tests/test_lora.py, apart from its tests, and the model helpers both
use (adapters, models with LoRA attached, an output + gradients run).

    torchrun --nproc_per_node 2 parity_tests/lora_worker.py OUT          TP=2 outputs, grads, a Trainer run
    python parity_tests/lora_worker.py finetune OUT OFFICIAL              jobs/finetune.py end to end
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict:
    """This process's environment without the distributed variables a Megatron world of one set."""
    env = {k: val for k, val in os.environ.items() if k not in _DIST_VARS}
    return dict(env, OMP_NUM_THREADS="1", MKL_CBWR="COMPATIBLE")


RANK, ALPHA = 3, 5.0  # odd rank, scale 5/3


def _lora_cfg(**kw):
    from mugv.core.lora import LoRAConfig
    return LoRAConfig(rank=RANK, alpha=ALPHA, **kw)


def random_adapters(cfg, lora, seed: int = 11) -> dict[str, np.ndarray]:
    """Global adapter arrays, all random and nonzero (B = 0 would hide every mistake in B's path)."""
    from mugv.core.lora import lora_schema
    rng = np.random.default_rng(seed)
    return {s.name: (rng.standard_normal(s.shape) / np.sqrt(s.shape[1])).astype(np.float32)
            for s in lora_schema(cfg, lora)}


def set_adapters(model, arrays) -> None:
    """Copy global adapter arrays into the model, this rank's slice of each."""
    import torch
    from mugv.torch_backend.models.lora import _tp
    rank, tp = _tp()
    params = dict(model.named_parameters())
    from mugv.core.lora import lora_schema
    specs = lora_schema(model.cfg, model.lora_config).as_dict()
    with torch.no_grad():
        for name, arr in arrays.items():
            params[name].copy_(torch.from_numpy(arr[specs[name].shard_index(rank, tp)]))


def adapted_model(params, lora=None, adapters=None, **overrides):
    from mugv.checkpoints.torch_dit import load_canonical
    from mugv.parity_tests.test_dit import CFG
    from mugv.torch_backend.models.lora import apply_lora
    from mugv.torch_backend.models.dit import build_dit, transformer_config
    model = build_dit(CFG, transformer_config(CFG, **overrides), seed=None)
    load_canonical(model, CFG, params)
    if lora is not None:
        apply_lora(model, CFG, lora, seed=0)
    if adapters is not None:
        set_adapters(model, adapters)
    return model


def run_model(model, inputs, weights, grads_of=("lora",)):
    """Output and the gradients of sum(out * w) w.r.t. x and the parameters whose names contain
    one of `grads_of`."""
    import torch
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    t["frame_indice"] = t["frame_indice"].long()
    t["x"].requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(**t)
    (out * torch.from_numpy(weights)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None and any(g in n for g in grads_of)}
    grads["input.x"] = t["x"].grad.detach().clone()
    return out.detach(), grads


# ---------------------------------------------------------------------------------------------
# The 2-process worker


def tp2_worker(out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from mugv.core.lora import lora_schema
    from mugv.parity_tests.test_dit import CFG, loss_weights, make_inputs, random_params
    from mugv.torch_backend.parallel import megatron_compat
    from mugv.torch_backend.models.lora import save_adapters

    torch.set_num_threads(1)
    out_dir = pathlib.Path(out_dir)
    megatron_compat.initialize_parallel(tp=2)
    from megatron.core import parallel_state
    group = parallel_state.get_tensor_model_parallel_group()
    lora = _lora_cfg()
    specs = lora_schema(CFG, lora).as_dict()
    params, adapters = random_params(CFG), random_adapters(CFG, lora)
    inputs, weights = make_inputs("i2v"), loss_weights()
    results = {}
    for tag, overrides in [("tp2", {}), ("tp2sp", dict(sequence_parallel=True))]:
        model = adapted_model(params, lora, adapters, **overrides)
        out, grads = run_model(model, inputs, weights)
        results[f"{tag}.out"] = out.numpy()
        tagged = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
        for name in specs:
            g = grads[name]
            if overrides.get("sequence_parallel") and name in tagged:  # partial over tokens
                dist.all_reduce(g, group=group)
            if specs[name].tp_axis is not None:
                parts = [torch.empty_like(g) for _ in range(2)]
                dist.all_gather(parts, g.contiguous(), group=group)
                g = torch.cat(parts, dim=specs[name].tp_axis)
            results[f"{tag}.{name}"] = g.numpy()
        if tag == "tp2":
            save_adapters(model, CFG, out_dir / "adapters_tp2", step=5)
    if dist.get_rank() == 0:
        np.savez(out_dir / "lora_results.npz", **results)
    _trainer_run(out_dir / "trainer", params, lora)


def _trainer_run(out, params, lora) -> None:
    """3 LoRA steps through the Trainer at TP=2; counts what receives gradients and optimizer state."""
    import torch.distributed as dist

    from mugv.core.flow import FlowConfig
    from mugv.core.parallel import ParallelConfig
    from mugv.core.train import OptimizerConfig, TrainConfig
    from mugv.parity_tests.test_dit import CFG
    from mugv.torch_backend.models.lora import lora_model_hook
    from mugv.torch_backend.training import optim_state
    from mugv.torch_backend.data.batch import SyntheticLatents
    from mugv.torch_backend.training.trainer import Trainer

    train = TrainConfig(steps=3, micro_batch=2, precision="fp32", ema_decay=0.5, checkpoint_every=3,
                        log_every=1, optimizer=OptimizerConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0))
    source = SyntheticLatents(2, (3, 4, 6), text_len=6, text_dim=CFG.text_dim, seed=3)
    trainer = Trainer(CFG, train, FlowConfig(), source, out, parallel=ParallelConfig(tensor_parallel=2),
                      model_hook=lora_model_hook(CFG, lora, seed=0, base=params), log=lambda m: None)
    rank = dist.get_rank()
    try:
        trainer.run()
        model = trainer.model
        counts = {
            "requires_grad": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "main_grad": sorted(n for n, p in model.named_parameters()
                                if getattr(p, "main_grad", None) is not None),
            "optimizer_tensors": sum(len(g["params"]) for inner in optim_state.inner_optimizers(trainer.optimizer)
                                     for g in inner.optimizer.param_groups),
            "optimizer_numel": sum(q.numel() for inner in optim_state.inner_optimizers(trainer.optimizer)
                                   for g in inner.optimizer.param_groups for q in g["params"]),
            "losses": [json.loads(x)["loss"] for x in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]
            if rank == 0 else [],
        }
    finally:
        trainer.close()
    (pathlib.Path(out) / f"counts_rank{rank}.json").write_text(json.dumps(counts))


# ---------------------------------------------------------------------------------------------
# jobs/finetune.py end to end


def _pool24(pixels):
    """Test stand-in for the VAE: pool moments (3 channels, the real latent shape) tiled to the
    DiT's 24 latent channels."""
    from mugv.torch_backend.data.cache import pool_encoder
    mean, std = pool_encoder(pixels)
    return np.tile(mean, (1, 8, 1, 1, 1)), np.tile(std, (1, 8, 1, 1, 1)) + 0.05


def finetune_worker(out: str, official: str) -> None:
    import dataclasses

    import torch
    from mugv.core.data import BucketSpec
    from mugv.core.train import OptimizerConfig, TrainConfig
    from mugv.torch_backend.data.product_videos import generate_dataset
    from mugv.torch_backend.data.text import EmbeddedTextEncoder
    from mugv.torch_backend.jobs.finetune import FinetuneConfig, finetune, prepare_data

    torch.set_num_threads(1)
    out = pathlib.Path(out)
    manifest = generate_dataset(out / "clips", count=4, seed=7, size=32, frames=9, fps=16.0)
    bucket = BucketSpec(32, 32, 9, batch_size=2, fps=16.0)
    text = EmbeddedTextEncoder(dim=32, max_len=24, seed=0)
    encode_text = lambda captions: text(captions)  # noqa: E731
    train = TrainConfig(steps=3, micro_batch=2, precision="fp32", ema_decay=0.5, checkpoint_every=3,
                        log_every=1, optimizer=OptimizerConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0))
    reports = {}
    # "resumed": the LoRA run stopped after 2 steps, then restarted to 3 (steps may change on resume)
    for run, mode, steps in (("lora", "lora", 3), ("full", "full", 3), ("resumed", "lora", 2), ("resumed", "lora", 3)):
        for k in _DIST_VARS:  # each Trainer starts its own world of one, on a fresh port
            os.environ.pop(k, None)
        source = prepare_data(manifest, (bucket,), _pool24, encode_text, "pool24", "embedded32",
                              cache_dir=out / "cache", log=lambda m: None)
        ft = FinetuneConfig(mode=mode, lora=_lora_cfg(base_dtype="bfloat16"), buckets=(bucket,), i2v=0.5)
        reports[run] = finetune(official, source, out / run, ft, dataclasses.replace(train, steps=steps),
                                log=lambda m: None)
    # resuming the LoRA run on another base file: its checkpoints do not hold the frozen weights
    import shutil

    from mugv.checkpoints.format import CheckpointError
    other = shutil.copy(official, out / "other_base.safetensors")
    for k in _DIST_VARS:
        os.environ.pop(k, None)
    try:
        finetune(other, source, out / "resumed", ft, dataclasses.replace(train, steps=4), log=lambda m: None)
        reports["other_base_error"] = None
    except CheckpointError as e:
        reports["other_base_error"] = str(e)
    (out / "reports.json").write_text(json.dumps(reports))
    # the models before and after, as sampling would build them
    from mugv.torch_backend.parallel import megatron_compat
    from mugv.torch_backend.jobs.finetune import finetuned_model
    for k in _DIST_VARS:
        os.environ.pop(k, None)
    megatron_compat.initialize_parallel(tp=1)
    rng = np.random.default_rng(5)
    x = {"x": rng.standard_normal((2, 24, 2, 4, 6)).astype(np.float32), "timestep": np.array([300.0, 700.0], np.float32),
         "text": rng.standard_normal((2, 5, 32)).astype(np.float32), "text_mask": np.ones((2, 5), bool),
         "x_mask": np.ones((2, 2), bool), "fps": np.array([16.0, 16.0], np.float32),
         "frame_indice": np.tile(np.arange(4), (2, 1))}
    t = {k: torch.from_numpy(val) for k, val in x.items()}
    outs = {}
    with torch.no_grad():
        for name, kw in (("before", {}), ("after", dict(adapters=reports["lora"]["adapters"])),
                         ("after_unmerged", dict(adapters=reports["lora"]["adapters"], merge=False))):
            outs[name] = finetuned_model(official, **kw)[1](**t).numpy()
    np.savez(out / "sampling_models.npz", **outs)


if __name__ == "__main__":
    if sys.argv[1] == "finetune":
        finetune_worker(sys.argv[2], sys.argv[3])
    else:
        tp2_worker(sys.argv[1])
