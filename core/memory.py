"""Memory arithmetic of MUG-DiT training per GPU under a parallel layout: parameters, gradients,
optimizer state, EMA and activations (with and without recomputation).

An estimate from first principles, for planning (which layouts fit, how many GPUs a case needs);
measured peaks belong in benchmarks. Conventions (mugv's trainer on Megatron-Core):
- bf16 model parameters (2 B), fp32 gradient buffer (4 B, `grad_reduce_in_fp32`), Adam's fp32 main
  parameters + two moments (12 B, sharded over data x context parallel ranks by the distributed
  optimizer), fp32 EMA (4 B, sharded like the optimizer state).
- Parameters divide over tensor parallel (the schema's `tp_axis` tensors; replicated ones stay
  whole) and pipeline stages (blocks split evenly; embedders on the first stage, final layer on
  the last: the estimate charges both to one stage).
- Activations (bf16) saved per block, in units of s*b*h elements (s tokens on this rank, b micro-
  batch, h hidden): self-attention 11 (block input, modulated input, qkv 3, normalised and rotated
  q and k 4, attention output, projection output), cross-attention 4 (input, normalised input,
  query, output; the text's k/v are s_text*b*2h), MLP 11 (input, modulated input, fc1 output 4,
  GELU output 4, fc2 output): 26 s b h elements = 52 s b h bytes, plus flash attention's fp32
  log-sum-exp (b * heads * s). Sequence parallel shards all of it over TP; Ulysses CP divides s.
  Selective recompute re-runs the cheap elementwise parts (modulation, GELU, RoPE, the cross-
  attention norm): 17 s b h elements kept. Full recompute keeps only each block's input (1 s b h)
  plus one block's working set at a time.
- 1F1B pipelining keeps up to `pipeline_parallel` micro-batches of activations in flight on the
  first stage.
"""
from __future__ import annotations

import dataclasses

from mugv.core.dit import DiTConfig, dit_schema, sequence_length
from mugv.core.parallel import ParallelConfig

GIB = 1024 ** 3
ACT_ELEMENTS = {"none": 26, "selective": 17, "full": 1}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    parameters: float
    gradients: float
    optimizer: float
    ema: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.ema + self.activations

    def gib(self) -> dict[str, float]:
        d = {k: v / GIB for k, v in dataclasses.asdict(self).items()}
        d["total"] = self.total / GIB
        return d


def params_per_rank(cfg: DiTConfig, par: ParallelConfig) -> float:
    """Parameters held by the busiest rank (first pipeline stage, which also holds embedders)."""
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    per_layer = 0.0
    other = 0.0
    for p in dit_schema(cfg):
        n = p.numel / (tp if p.tp_axis is not None else 1)
        if p.layer is None:
            other += n
        else:
            per_layer += n
    return per_layer / pp + other


def estimate(cfg: DiTConfig, par: ParallelConfig, world_size: int, latent_thw: tuple[int, int, int],
             text_tokens: int = 300, micro_batch: int = 1, recompute: str = "full") -> MemoryEstimate:
    """Bytes per GPU for one training step of `micro_batch` samples of latent size `latent_thw`."""
    if recompute not in ACT_ELEMENTS:
        raise ValueError(f"recompute = {recompute!r}: expected one of {tuple(ACT_ELEMENTS)}")
    tp, pp, cp = par.tensor_parallel, par.pipeline_parallel, par.context_parallel
    dp = world_size // (tp * pp * cp)
    n = params_per_rank(cfg, par)
    shard = dp * cp if par.distributed_optimizer else 1
    s = sequence_length(cfg, latent_thw) / cp
    h, b = cfg.hidden_size, micro_batch
    sp = tp if par.sequence_parallel else 1
    layers = cfg.depth / pp
    per_block = ACT_ELEMENTS[recompute] * s * b * h * 2 / sp
    text_kv = text_tokens * b * 2 * h * 2 / tp
    lse = 4 * b * (cfg.num_heads / (tp * cp)) * s * cp   # Ulysses: all tokens, heads/(TP*CP)
    stored = layers * (per_block + (text_kv + lse if recompute != "full" else 0))
    working = 0.0 if recompute == "none" else ACT_ELEMENTS["none"] * s * b * h * 2 / sp + text_kv + lse
    activations = stored * pp + working   # 1F1B: pp micro-batches in flight on stage 0
    # The EMA is kept per shard of the fp32 main values, like the optimizer state (the trainer).
    return MemoryEstimate(parameters=2 * n, gradients=4 * n, optimizer=12 * n / shard, ema=4 * n / shard,
                          activations=activations)


def layouts_for(world_size: int, cfg: DiTConfig) -> list[ParallelConfig]:
    """Every TP x PP x CP layout (SP on with TP, distributed optimizer on) valid on `world_size`."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8):
            for cp in (1, 2, 4, 8):
                if world_size % (tp * pp * cp) or cfg.num_heads % (tp * cp) or cfg.depth % pp:
                    continue
                out.append(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp,
                                          sequence_parallel=tp > 1, distributed_optimizer=True))
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the table of docs/parallelism.md: 10B at 720p 5 s and 20 s on 8 x 80 GB."""
    import argparse

    from mugv.core.dit import dit_config
    from mugv.core.vae import latent_shape

    ap = argparse.ArgumentParser(description="MUG-DiT training memory per GPU by layout")
    ap.add_argument("--size", default="10B")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    a = ap.parse_args(argv)
    cfg = dit_config(a.size)
    cases = {"720p 5 s (105 frames)": latent_shape(105, 720, 1280),
             "720p 20 s (417 frames)": latent_shape(417, 720, 1280)}
    print(f"MUG-DiT {a.size}: {dit_schema(cfg).numel / 1e9:.2f}B parameters; GiB per GPU on {a.gpus} GPUs "
          f"(fits = under {a.gpu_gib:.0f} GB minus 10% for the allocator and buffers)")
    print(f"{'case':24} {'TPxPPxCP':9} {'recompute':10} {'params':>7} {'grads':>6} {'optim':>6} "
          f"{'ema':>5} {'acts':>7} {'total':>7}  fits")
    limit = a.gpu_gib * 1e9 / GIB * 0.9
    for name, thw in cases.items():
        for par in layouts_for(a.gpus, cfg):
            for rc in ("full", "selective", "none"):
                e = estimate(cfg, par, a.gpus, thw, recompute=rc).gib()
                if rc == "none" and e["total"] > 4 * limit:
                    continue
                lay = f"{par.tensor_parallel}x{par.pipeline_parallel}x{par.context_parallel}"
                print(f"{name:24} {lay:9} {rc:10} {e['parameters']:7.1f} {e['gradients']:6.1f} "
                      f"{e['optimizer']:6.1f} {e['ema']:5.1f} {e['activations']:7.1f} {e['total']:7.1f}  "
                      f"{'yes' if e['total'] <= limit else 'no'}")
    for name, thw in cases.items():
        need = min_gpus(cfg, thw, limit * GIB)
        print(f"smallest GPU count that fits {name} (any layout, full recompute): {need}")
    return 0


def min_gpus(cfg: DiTConfig, latent_thw, limit_bytes: float, max_gpus: int = 512) -> int | None:
    g = 1
    while g <= max_gpus:
        for par in layouts_for(g, cfg) if g <= 8 else _wide_layouts(g, cfg):
            if estimate(cfg, par, g, latent_thw, recompute="full").total <= limit_bytes:
                return g
        g *= 2
    return None


def _wide_layouts(world: int, cfg: DiTConfig) -> list[ParallelConfig]:
    out = []
    for tp in (1, 2, 4, 8):
        for cp in (1, 2, 3, 4, 6, 8, 12, 16):
            for pp in (1, 2, 4, 7, 8, 14):
                if world % (tp * pp * cp) or cfg.num_heads % (tp * cp) or cfg.depth % pp:
                    continue
                out.append(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp,
                                          sequence_parallel=tp > 1, distributed_optimizer=True))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
