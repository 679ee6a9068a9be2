"""bf16 against fp32 for the VAE on real clips: the measurement behind the GPU default precision
(`torch_backend/models/vae_runtime.py::GPU_DEFAULT`, docs/vae.md "Device and precision").

    python -P benchmarks/vae_bf16_error.py --out /tmp/vae_bf16            # CPU, ../shared clips
    python -P benchmarks/vae_bf16_error.py --device cuda --out $OUT/vae_bf16   # the GPU re-measurement

For every clip of `--data` (decoded at --size x --size, --frames frames at --fps) and every VAE
(`tiny` and `golden` sizes with seeded init, and `official` with seeded init at its real widths)
it runs encode (posterior mean) and decode in three precisions through `place_vae`'s runtime:
fp32 (the reference), `bf16` autocast (fp32 weights and GroupNorms, bf16 convolutions and
matmuls: the runtime's "bf16"), and bf16 weights (`model.bfloat16()`, the official inference
cast). Reported per (size, precision), worst clip and mean over clips:
- latent: relative L2 error of the posterior mean, ||z - z32|| / ||z32||;
- decode: the decode of the fp32 latent, PSNR of it against the fp32 decode on [0, 1] pixels,
  and the share of uint8 pixels that differ after rounding (what a written sample shows);
- roundtrip: encode + decode in that precision, the same two numbers.
Sizes are seeded random weights (rounding through the architecture) unless given as `ckpt:DIR`,
a trained mugv VAE checkpoint (e.g. the demo's `runs/demo/vae/ckpt`: trained weights, but a tiny
VAE trained on the generated product clips, at its own 32 px resolution via --size 32).
Prints a table and writes OUT/vae_bf16_error.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time


def psnr01(a, b) -> float:
    import math
    mse = float((((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def uint8_changed(a, b) -> float:
    import torch
    q = lambda x: torch.round((x.clamp(-1, 1) + 1) * 127.5)   # noqa: E731 (media.to_uint8's rounding)
    return float((q(a) != q(b)).float().mean())


def build(size: str, seed: int = 0):
    """A VAE in fp32 eval mode: a core/vae.py size with seeded init, or `ckpt:DIR`, a trained mugv
    VAE checkpoint (the size its training recorded, loaded by the jobs' own `vae_model`)."""
    from mugv.torch_backend.jobs.loaders import vae_model
    if not size.startswith("ckpt:"):
        return vae_model(size, seed=seed).eval()
    from mugv.checkpoints.format import latest_checkpoint
    root = pathlib.Path(size[5:])
    step = root if (root / "manifest.json").is_file() else latest_checkpoint(root)
    if step is None:
        raise SystemExit(f"--sizes {size}: no committed checkpoint (step_*/manifest.json) under {root}")
    trained = json.loads((step / "manifest.json").read_text())["config"]["train"]["size"]
    return vae_model(trained, str(step)).eval()


def measure(size: str, clips, device, seed: int = 0) -> dict:
    import torch

    from mugv.torch_backend.models.vae_runtime import VAERuntime

    model = build(size, seed).to(device)
    runs = {"fp32": (model, VAERuntime(device, "fp32")), "bf16_autocast": (model, VAERuntime(device, "bf16"))}
    runs["bf16_weights"] = (build(size, seed).to(device).bfloat16(), VAERuntime(device, "fp32"))
    out = {name: [] for name in runs}
    t0 = time.perf_counter()
    with torch.no_grad():
        for clip_name, video in clips:
            video = video.to(device)[None]
            ref = {}
            for name, (m, rt) in runs.items():
                dtype = next(m.parameters()).dtype
                with rt.autocast():
                    z = m.encode(video.to(dtype), sample=False).float()
                    z32 = ref.get("z", z)
                    dec = m.decode(z32.to(dtype), video.shape[2]).float()
                    rt_dec = m.decode(z.to(dtype), video.shape[2]).float()
                if name == "fp32":
                    ref = {"z": z, "dec": dec}
                    continue
                out[name].append({
                    "clip": clip_name,
                    "latent_l2_rel": float((z - ref["z"]).norm() / ref["z"].norm()),
                    "decode_psnr_db": psnr01(dec, ref["dec"]), "decode_uint8_changed": uint8_changed(dec, ref["dec"]),
                    "roundtrip_psnr_db": psnr01(rt_dec, ref["dec"]),
                    "roundtrip_uint8_changed": uint8_changed(rt_dec, ref["dec"])})
    del out["fp32"]
    summary = {}
    for name, rows in out.items():
        summary[name] = {
            "worst_latent_l2_rel": max(r["latent_l2_rel"] for r in rows),
            "worst_decode_psnr_db": min(r["decode_psnr_db"] for r in rows),
            "mean_decode_uint8_changed": sum(r["decode_uint8_changed"] for r in rows) / len(rows),
            "worst_roundtrip_psnr_db": min(r["roundtrip_psnr_db"] for r in rows),
            "mean_roundtrip_uint8_changed": sum(r["roundtrip_uint8_changed"] for r in rows) / len(rows),
            "clips": rows}
    return {"size": size, "seconds": time.perf_counter() - t0, "precisions": summary}


def table(result: dict) -> str:
    lines = ["| VAE | precision | worst latent rel. L2 | worst decode PSNR vs fp32 | uint8 px changed (decode) "
             "| worst roundtrip PSNR vs fp32 | uint8 px changed (roundtrip) |", "|---" * 7 + "|"]
    for r in result["runs"]:
        for name, s in r["precisions"].items():
            lines.append(f"| {r['size']} | {name} | {s['worst_latent_l2_rel']:.2e} | {s['worst_decode_psnr_db']:.1f} dB | "
                         f"{100 * s['mean_decode_uint8_changed']:.2f} % | {s['worst_roundtrip_psnr_db']:.1f} dB | "
                         f"{100 * s['mean_roundtrip_uint8_changed']:.2f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "clips"))
    ap.add_argument("--sizes", default="tiny,golden,official",
                    help="core/vae.py sizes (seeded init) and/or ckpt:DIR (a trained mugv VAE checkpoint)")
    ap.add_argument("--size", type=int, default=64, help="frame height = width (multiple of 8)")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--official-frames", type=int, default=9, help="frames for the official-size VAE (CPU time)")
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--device", default=None, help="default: the runtime's choice (GPU if any)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import torch

    from mugv.torch_backend.data.media import decode_each, list_clips, load_clip, to_video_tensor
    from mugv.torch_backend.models.vae_runtime import vae_device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = vae_device(a.device)
    decoded, _ = decode_each(list_clips(a.data), lambda s: load_clip(s, a.frames, a.size, a.size, a.fps),
                             what=f"--data {a.data}")
    clips = [(s.name, to_video_tensor(c)) for s, c in decoded]
    runs = []
    for size in a.sizes.split(","):
        use = clips if size != "official" else [(n, v[:, :a.official_frames]) for n, v in clips]
        runs.append(measure(size, use, device))
        print(f"{size}: {runs[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    result = {"device": str(device), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "data": a.data, "clips": [n for n, _ in clips], "height": a.size, "width": a.size,
              "frames": a.frames, "official_frames": a.official_frames, "runs": runs}
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_bf16_error.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
