"""VAE throughput and peak memory (issue 6): the official-size VAE (core/vae.py, 411.8 M
parameters, random weights) in bf16 on one GPU.

    # device machine, repo root, after `source scripts/install_gpu_offline.sh`:
    python benchmarks/vae_throughput.py --out $OUT/vae
    # here (CPU, tiny VAE, fp32, tiny frames; checks the script, numbers mean nothing):
    python benchmarks/vae_throughput.py --tiny --out /tmp/vae_bench

What it measures (writes OUT/vae_throughput.json, prints a table):
- throughput: `posterior` (encode, chunked: 6 latents = 48 frames at a time, the 2D encoder
  `--frame-batch` frames at a time) and `decode` (6-latent chunks, 2D decoder `--frame-batch`
  frames at a time) of a 49-frame clip at 256p (256x448) and of the 5 s clip at 720p
  (105 x 720 x 1280), frames/s = input (encode) or output (decode) frames over the median of
  `--repeats` timed runs after one warm-up (CUDA-synchronised wall time).
- memory: 720p 5 s (105 frames) and 20 s (417 frames), the same chunking: peak
  `torch.cuda.max_memory_allocated` during each call. `peak` is the raw peak; `working` is the
  peak minus what was allocated before the call (weights + the input clip) minus the returned
  tensor (the decoded video is the caller's and grows with the clip by definition). The claim of
  issue 6 is that `working` does not grow with clip length: compare the 5 s and 20 s rows
  (`working_growth` in the JSON: 20 s / 5 s).
- bf16 vs fp32: a short clip (17 frames, 256p) through the same weights in fp32 (TF32 off) and
  bf16; the posterior mean and the decoded video (of the fp32 latent), each as max|bf16 - fp32|
  / max|fp32| and the relative L2 error.

- paths (issue 25): encode through the cache job's encoder (`data/cache.py::vae_encoder`: host
  pixels -> device -> moments back as numpy) and decode through `mugv sample`'s
  (`jobs/sample.py::decode_videos`: latent -> device -> uint8 clips on the host), under the
  runtime `models/vae_runtime.py::place_vae` gives (fp32; bf16 autocast too on a GPU), with the
  GroupNorm + SiLU slot on its reference and, on a GPU, on the Triton kernel: frames/s and peak
  memory per (precision, kernel).
- cache job (`--cache-job`, any number of processes, e.g. under
  `torchrun --nproc-per-node N benchmarks/vae_throughput.py --cache-job --out DIR`): the real
  `mugv cache` stage (`jobs/pretrain.py::cache_stage`: decode, encode, tensorstore rows) over
  `--cache-clips` generated clips, clips/s = clips / the slowest rank's wall time; writes
  DIR/vae_cache_job_world<N>.json.

How to read it: 720p decode dominates (the 2D decoder runs ~6 TFLOP per 720p frame at 128-512
channels on full-resolution maps); a `working` that is the same for 105 and 417 frames means the
chunking bounds the activation memory, so any clip length fits the GPU that fits the 5 s clip
(plus its input and output pixels). Each case that fails (e.g. out of memory) records its error
and the script continues.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _timed(fn, device, repeats: int) -> tuple[object, list[float]]:
    fn()  # warm-up (cuDNN algorithm choice, allocator)
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, times


def _clip(frames: int, h: int, w: int, device, dtype, seed: int = 0):
    """A smooth random clip in [-1, 1]: low-resolution noise upsampled (natural-ish statistics),
    built on `device` (a 20 s 720p clip is 1.2 G values: too slow to draw on the host)."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(1, frames // 4 + 1), max(1, h // 16), max(1, w // 16), generator=g) * 2 - 1
    video = F.interpolate(low.to(device), size=(frames, h, w), mode="trilinear", align_corners=False).to(dtype)
    noise = torch.randn(video.shape, generator=torch.Generator(device=device).manual_seed(seed),
                        device=device, dtype=dtype)
    return video.add_(noise, alpha=0.05).clamp_(-1, 1)


def throughput(model, frames, h, w, device, dtype, frame_batch, repeats) -> dict:
    import torch
    video = _clip(frames, h, w, device, dtype)
    with torch.no_grad():
        (mean, _), enc_t = _timed(lambda: model.posterior(video, frame_batch=frame_batch), device, repeats)
        _, dec_t = _timed(lambda: model.decode(mean, frames, frame_batch=frame_batch, normalized=False),
                          device, repeats)
    enc, dec = statistics.median(enc_t), statistics.median(dec_t)
    return {"frames": frames, "height": h, "width": w, "latent": list(mean.shape[2:]),
            "encode_s": enc, "decode_s": dec, "encode_fps": frames / enc, "decode_fps": frames / dec,
            "encode_times": enc_t, "decode_times": dec_t}


def memory(model, frames, h, w, device, dtype, frame_batch) -> dict:
    """Peak CUDA memory of one chunked encode and one chunked decode (on the CPU: the same calls,
    shapes only)."""
    import torch
    cuda = device.type == "cuda"

    def mark() -> int:
        if not cuda:
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak() -> int:
        if not cuda:
            return 0
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    video = _clip(frames, h, w, device, dtype)
    with torch.no_grad():
        before = mark()
        mean, logvar = model.posterior(video, frame_batch=frame_batch)
        enc_peak = peak()
        del logvar
        before_dec = mark()
        recon = model.decode(mean, frames, frame_batch=frame_batch, normalized=False)
        dec_peak = peak()
    out = {"frames": frames, "height": h, "width": w, "latent": list(mean.shape[2:]),
           "output": list(recon.shape)}
    if tuple(recon.shape) != tuple(video.shape):
        raise AssertionError(f"decode returned {tuple(recon.shape)} for a {tuple(video.shape)} clip")
    gib = 2 ** 30
    if cuda:
        out.update(input_gib=_nbytes(video) / gib, output_gib=_nbytes(recon) / gib,
                   encode_peak_gib=enc_peak / gib, encode_working_gib=(enc_peak - before) / gib,
                   decode_peak_gib=dec_peak / gib,
                   decode_working_gib=(dec_peak - before_dec - _nbytes(recon)) / gib)
    else:
        out["note"] = "peak memory is measured on CUDA only"
    del video, mean, recon
    return out


def precision_error(fp32_model, bf16_model, frames, h, w, device) -> dict:
    """bf16 vs fp32 on the same weights: posterior mean, and decode of the fp32 mean."""
    import torch
    video = _clip(frames, h, w, device, torch.float32, seed=1)
    with torch.no_grad():
        m32, _ = fp32_model.posterior(video)
        m16, _ = bf16_model.posterior(video.bfloat16())
        d32 = fp32_model.decode(m32, frames, normalized=False)
        d16 = bf16_model.decode(m32.bfloat16(), frames, normalized=False)

    def rel(a, b) -> dict:
        a, b = a.double(), b.double()
        return {"max_rel": ((a - b).abs().max() / b.abs().max()).item(),
                "l2_rel": ((a - b).norm() / b.norm()).item()}
    return {"frames": frames, "height": h, "width": w,
            "posterior_mean": rel(m16.float(), m32), "decode": rel(d16.float(), d32)}


def paths(model, frames, h, w, device, repeats, kernel_ops: dict) -> dict:
    """Frames/s and peak memory of the cache job's encode and `mugv sample`'s decode, per
    precision and GroupNorm + SiLU implementation (see the module doc)."""
    import numpy as np
    import torch

    from mugv.torch_backend.data.cache import vae_encoder
    from mugv.torch_backend.jobs.sample import decode_videos
    from mugv.torch_backend.models.vae import use_kernels
    from mugv.torch_backend.models.vae_runtime import VAERuntime
    pixels = _clip(frames, h, w, torch.device("cpu"), torch.float32).numpy()
    out = {"frames": frames, "height": h, "width": w}
    for kernel, op in kernel_ops.items():
        use_kernels(model, device, op=op)
        for precision in (("fp32", "bf16") if device.type == "cuda" else ("fp32",)):
            runtime = VAERuntime(device, precision)
            encode = vae_encoder(model, runtime.autocast)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            (mean, _), enc_t = _timed(lambda: encode(pixels), device, repeats)
            enc_peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
            z = torch.from_numpy(np.ascontiguousarray(mean))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _, dec_t = _timed(lambda: decode_videos(model, z, frames, runtime), device, repeats)
            dec_peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
            enc, dec = statistics.median(enc_t), statistics.median(dec_t)
            out[f"{precision}_{kernel}"] = {"encode_fps": frames / enc, "decode_fps": frames / dec,
                                            "encode_peak_gib": enc_peak, "decode_peak_gib": dec_peak,
                                            "encode_times": enc_t, "decode_times": dec_t}
    use_kernels(model, device, op=kernel_ops["reference"])
    return out


def cache_job(out_dir: str, clips: int, size: str, px: int, frames: int) -> dict:
    """The `mugv cache` stage on `clips` generated clips, this process doing its share (under
    torchrun every rank calls it); rank 0 returns the summary (clips/s over the slowest rank's
    wall time), the others None."""
    import dataclasses
    import pathlib

    import torch
    import torch.distributed as dist

    from mugv.checkpoints.torch_io import save_torch
    from mugv.core import vae as spec
    from mugv.core.recipe import PretrainConfig, StageConfig
    from mugv.torch_backend.data.product_videos import generate_dataset
    from mugv.torch_backend.jobs import pretrain
    from mugv.torch_backend.jobs.loaders import load_vae, text_encoder
    from mugv.torch_backend.models.vae import init_vae
    from mugv.torch_backend.models.vae_runtime import place_vae

    rank, world, barrier = pretrain.data_parallel_world()
    barrier = barrier or (lambda: None)
    root = pathlib.Path(out_dir) / f"cache_job_world{world}"
    if rank == 0:
        manifest = generate_dataset(root / "data", clips, seed=25, size=px, frames=frames)
        model = init_vae(spec.vae_config(size), seed=0)
        save_torch(root / "vae", 0, {"model": (spec.vae_schema(model.cfg), model.state_dict())},
                   config={"vae": dataclasses.asdict(model.cfg)}, schema_hash=spec.vae_schema(model.cfg).hash(),
                   rank=0, barrier=lambda: None)
    barrier()
    manifest = root / "data" / "manifest.jsonl"
    stage = StageConfig("clips", frames=frames, steps=1, batch_size=1)
    from mugv.checkpoints.format import latest_checkpoint
    recipe = PretrainConfig(manifest=str(manifest), vae_checkpoint=str(latest_checkpoint(root / "vae")),
                            out=str(root / "run"),
                            vae_size=size, size=px, stages=(stage,))
    vae = load_vae(size, recipe.vae_checkpoint)
    runtime = place_vae(vae)
    text = text_encoder(recipe.text_encoder, recipe.dit)
    barrier()
    t0 = time.perf_counter()
    pretrain.cache_stage(recipe, stage, vae, text, log=lambda s: None, runtime=runtime)
    wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64,
                        device=runtime.device if runtime.device.type == "cuda" else "cpu")
    if world > 1:
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    if rank != 0:
        return None
    return {"world_size": world, "clips": clips, "vae_size": size, "height": px, "width": px, "frames": frames,
            "runtime": runtime.record(), "wall_s": float(wall[0]), "clips_per_s": clips / float(wall[0])}


def _case(results: dict, key: str, fn) -> None:
    """Run one case; a failure (e.g. out of memory) is recorded and the script goes on."""
    try:
        results[key] = fn()
    except Exception as e:  # noqa: BLE001 (a benchmark records every failure and continues)
        results[key] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        print(f"[vae_throughput] {key} failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
    finally:
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="vae_bench", help="output directory (vae_throughput.json)")
    ap.add_argument("--tiny", "--cpu", dest="tiny", action="store_true",
                    help="tiny VAE, fp32, tiny frames, on the CPU: tests the script")
    ap.add_argument("--frame-batch", type=int, default=8, help="2D encoder/decoder frames per call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", default="throughput,memory,precision,paths")
    ap.add_argument("--cache-job", action="store_true",
                    help="time the `mugv cache` stage instead (run it under torchrun for N processes)")
    ap.add_argument("--cache-clips", type=int, default=0, help="clips for --cache-job (default: 64 GPU, 8 CPU)")
    a = ap.parse_args(argv)
    if a.cache_job:
        import torch
        cuda = torch.cuda.is_available() and not a.tiny
        if not cuda:
            torch.set_num_threads(1)
        r = cache_job(a.out, a.cache_clips or (64 if cuda else 8), "official" if cuda else "tiny",
                      256 if cuda else 32, 49 if cuda else 17)
        if r is not None:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, f"vae_cache_job_world{r['world_size']}.json"), "w") as f:
                json.dump(r, f, indent=1)
            print(f"cache job: {r['clips']} clips of {r['frames']}x{r['height']}x{r['width']}, VAE {r['vae_size']} on "
                  f"{r['runtime']['device_name']} ({r['runtime']['precision']}), {r['world_size']} process(es): "
                  f"{r['wall_s']:.1f} s, {r['clips_per_s']:.2f} clips/s")
        return r or {}

    import torch

    from mugv.core.vae import vae_config
    from mugv.torch_backend.models.vae import init_vae, num_params

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.cuda.is_available() and not a.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if cuda else torch.float32
    size = "official" if cuda else "tiny"
    cfg = vae_config(size)
    # (name, frames, height, width): 256p = the DiT's 256 x 448 bucket, 720p = 720 x 1280;
    # 5 s = 105 frames and 20 s = 417 frames (core/memory.py's cases).
    if cuda:
        thr = [("256p", 49, 256, 448), ("720p", 105, 720, 1280)]
        mem = [("720p_5s", 105, 720, 1280), ("720p_20s", 417, 720, 1280)]
        prec = (17, 256, 448)
    else:
        thr = [("256p", 17, 32, 56), ("720p", 25, 48, 80)]
        mem = [("720p_5s", 25, 48, 80), ("720p_20s", 97, 48, 80)]
        prec = (9, 32, 48)
    model32 = init_vae(cfg, seed=0).to(device).eval()
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "vae_size": size,
                     "parameters": num_params(model32), "dtype": str(dtype).replace("torch.", ""),
                     "frame_batch": a.frame_batch, "chunk_latents": 6, "torch": torch.__version__}
    cases = set(a.cases.split(","))
    t_start = time.perf_counter()
    if "paths" in cases:   # fp32 weights, the runtime's precision (before the bf16 cast below)
        from mugv.kernels.groupnorm_silu import groupnorm_silu, groupnorm_silu_reference
        ops = {"reference": groupnorm_silu_reference, **({"triton": groupnorm_silu} if cuda else {})}
        t, h, w = thr[0][1:]
        _case(results, "paths_256p", lambda: paths(model32, t, h, w, device, a.repeats, ops))
    if "precision" in cases:
        model16 = copy.deepcopy(model32).to(torch.bfloat16)  # the same weights, rounded to bf16
        _case(results, "bf16_vs_fp32", lambda: precision_error(model32, model16, *prec, device))
        del model16
    model = model32.to(dtype) if dtype != torch.float32 else model32
    if "throughput" in cases:
        for name, t, h, w in thr:
            _case(results, f"throughput_{name}",
                  lambda t=t, h=h, w=w: throughput(model, t, h, w, device, dtype, a.frame_batch, a.repeats))
    if "memory" in cases:
        for name, t, h, w in mem:
            _case(results, f"memory_{name}", lambda t=t, h=h, w=w: memory(model, t, h, w, device, dtype, a.frame_batch))
        m5, m20 = results.get("memory_720p_5s", {}), results.get("memory_720p_20s", {})
        if "decode_working_gib" in m5 and "decode_working_gib" in m20:
            results["working_growth"] = {k: m20[k] / m5[k] for k in ("encode_working_gib", "decode_working_gib")}
    results["wall_s"] = time.perf_counter() - t_start
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "vae_throughput.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    return results


def table(r: dict) -> str:
    lines = [f"VAE {r['vae_size']} ({r['parameters'] / 1e6:.1f} M numbers), {r['dtype']}, {r['device']}, "
             f"frame_batch {r['frame_batch']}",
             "| case | frames x H x W | encode frames/s | decode frames/s |", "|---|---|---|---|"]
    for k, v in r.items():
        if k.startswith("throughput_"):
            if "error" in v:
                lines.append(f"| {k} | - | error: {v['error'][:80]} | |")
            else:
                lines.append(f"| {k[11:]} | {v['frames']}x{v['height']}x{v['width']} | {v['encode_fps']:.2f} "
                             f"| {v['decode_fps']:.2f} |")
    lines += ["", "| memory case | input GiB | encode peak / working GiB | output GiB | decode peak / working GiB |",
              "|---|---|---|---|---|"]
    for k, v in r.items():
        if k.startswith("memory_"):
            if "error" in v:
                lines.append(f"| {k[7:]} | error: {v['error'][:80]} | | | |")
            elif "encode_peak_gib" in v:
                lines.append(f"| {k[7:]} ({v['frames']} frames) | {v['input_gib']:.2f} | {v['encode_peak_gib']:.2f} / "
                             f"{v['encode_working_gib']:.2f} | {v['output_gib']:.2f} | {v['decode_peak_gib']:.2f} / "
                             f"{v['decode_working_gib']:.2f} |")
            else:
                lines.append(f"| {k[7:]} | {v.get('note', '')} | | | |")
    if "working_growth" in r:
        g = r["working_growth"]
        lines.append(f"working set 20 s / 5 s: encode {g['encode_working_gib']:.3f}x, "
                     f"decode {g['decode_working_gib']:.3f}x")
    for k, v in r.items():
        if k.startswith("paths_") and "error" not in v:
            lines += ["", f"real paths ({k[6:]}: {v['frames']}x{v['height']}x{v['width']}): cache encode / sample decode",
                      "| precision_groupnorm | encode frames/s | decode frames/s | encode / decode peak GiB |",
                      "|---|---|---|---|"]
            for name, x in v.items():
                if isinstance(x, dict):
                    peaks = (f"{x['encode_peak_gib']:.2f} / {x['decode_peak_gib']:.2f}"
                             if x["encode_peak_gib"] is not None else "-")
                    lines.append(f"| {name} | {x['encode_fps']:.2f} | {x['decode_fps']:.2f} | {peaks} |")
    p = r.get("bf16_vs_fp32", {})
    if "posterior_mean" in p:
        lines.append(f"bf16 vs fp32 ({p['frames']}x{p['height']}x{p['width']}): posterior mean max_rel "
                     f"{p['posterior_mean']['max_rel']:.2e} l2_rel {p['posterior_mean']['l2_rel']:.2e}; decode "
                     f"max_rel {p['decode']['max_rel']:.2e} l2_rel {p['decode']['l2_rel']:.2e}")
    elif "error" in p:
        lines.append(f"bf16 vs fp32: error: {p['error'][:120]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
