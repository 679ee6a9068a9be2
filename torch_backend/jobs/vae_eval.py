"""VAE reconstruction quality over a folder (or manifest) of clips: PSNR and SSIM per clip and their
mean, plus side-by-side original/reconstruction images (PNG) and videos (mp4) (media helpers:
data/media.py).

PSNR is computed on [0, 1] pixels over the whole clip (one MSE per clip). SSIM is torchmetrics'
`structural_similarity_index_measure` (Gaussian 11x11, sigma 1.5), averaged over frames.

    python -m mugv.torch_backend.jobs.vae_eval --data ../shared/data/clips --size tiny \
        --checkpoint runs/vae/ckpt --height 32 --width 32 --frames 17 --out runs/vae/eval
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch

from mugv.core import vae as spec
from mugv.torch_backend.data.media import (decode_each, list_clips, load_clip, output_path, side_by_side, to_uint8, to_video_tensor,
                                           write_mp4, write_png)
from mugv.torch_backend.models.vae import VideoVAE

def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] videos, measured on [0, 1] pixels over the whole clip."""
    mse = float((((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-frame SSIM of two (3, T, H, W) [-1, 1] videos, on [0, 1] pixels (torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    a = ((x.clamp(-1, 1) + 1) / 2).transpose(0, 1)     # (T, 3, H, W)
    b = ((y.clamp(-1, 1) + 1) / 2).transpose(0, 1)
    return float(structural_similarity_index_measure(b, a, data_range=1.0))


@torch.no_grad()
def reconstruct(model: VideoVAE, video: torch.Tensor, frame_batch: int | None = 8, runtime=None) -> torch.Tensor:
    """Posterior mean -> decode: the deterministic reconstruction of one (3, T, H, W) clip, on the
    model's device under `runtime`'s precision (models/vae_runtime.py; None: as the model is);
    returned as fp32 on the CPU."""
    import contextlib
    device = next(model.parameters()).device
    with runtime.autocast() if runtime is not None else contextlib.nullcontext():
        latent = model.encode(video[None].to(device), sample=False, frame_batch=frame_batch)
        recon = model.decode(latent, video.shape[1], frame_batch=frame_batch)[0]
    return recon.float().cpu()


def evaluate(model: VideoVAE, data: str | pathlib.Path, height: int, width: int, num_frames: int,
             fps: float = 8.0, out_dir: str | pathlib.Path | None = None,
             clips: list[tuple[str, np.ndarray]] | None = None, runtime=None) -> dict:
    """PSNR/SSIM of the model's reconstructions of every clip's first `num_frames` frames.

    Returns {"clips": [{"clip", "frames", "psnr", "ssim"}...], "mean_psnr", "mean_ssim"}; with
    `out_dir`, also writes metrics.json, metrics.md, <clip>.png and <clip>.mp4 (original | recon).
    `clips` (name, uint8 array) skips decoding (the trainer passes its already-decoded clips).
    `runtime` (models/vae_runtime.py::place_vae's): the precision to run in; recorded in the result.
    """
    model.eval()
    if clips is None:
        decoded, _ = decode_each(list_clips(data), lambda s: load_clip(s, num_frames, height, width, fps),
                                 what=f"eval-vae --data {data}")
        clips = [(s.name, clip) for s, clip in decoded]
        if not clips:
            raise ValueError(f"--data {data}: no clip could be decoded")
    out = pathlib.Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, clip in clips:
        video = to_video_tensor(clip[:num_frames])
        recon = reconstruct(model, video, runtime=runtime)
        rows.append({"clip": name, "frames": int(video.shape[1]), "psnr": psnr(recon, video), "ssim": ssim(recon, video)})
        if out is not None:
            orig8, rec8 = clip[:num_frames], to_uint8(recon)
            write_png(output_path(out, name, ".png"), side_by_side(orig8, rec8))   # ids stay inside out
            write_mp4(output_path(out, name, ".mp4"), np.concatenate([orig8, rec8], axis=2), fps)
    result = {"clips": rows, "mean_psnr": float(np.mean([r["psnr"] for r in rows])),
              "mean_ssim": float(np.mean([r["ssim"] for r in rows])),
              "height": height, "width": width, "num_frames": num_frames, "fps": fps,
              **({"runtime": runtime.record()} if runtime is not None else {})}
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        (out / "metrics.md").write_text(format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = ["| clip | frames | PSNR (dB) | SSIM |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['clip']} | {r['frames']} | {r['psnr']:.2f} | {r['ssim']:.4f} |" for r in result["clips"]]
    lines.append(f"| **mean** | | **{result['mean_psnr']:.2f}** | **{result['mean_ssim']:.4f}** |")
    return "\n".join(lines) + "\n"


def eval_vae(ns) -> int:
    """`mugv eval-vae` (cli/commands.py builds `ns`): the table to stdout, media under `ns.out`."""
    from mugv.torch_backend.jobs import loaders, report
    report.one_thread_on_cpu()
    from mugv.torch_backend.models.vae_runtime import place_vae
    model = loaders.load_vae(ns.size, ns.checkpoint, ns.official)
    runtime = place_vae(model)
    print(f"[mugv] VAE on {runtime.record()}", file=sys.stderr)
    result = evaluate(model, ns.data, ns.height, ns.width, ns.frames, ns.fps, ns.out, runtime=runtime)
    sys.stdout.write(format_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mugv vae-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder of videos or a .jsonl/.csv manifest")
    ap.add_argument("--size", default="tiny", help=f"VAE size: {sorted(spec.VAE_SIZES)}")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="mugv checkpoint directory (step_*) with a 'model' group")
    src.add_argument("--official", help="official vae.pt (or goldens .safetensors)")
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--out", help="folder for metrics.{json,md} and side-by-side PNG/mp4")
    ap.add_argument("--seed", type=int, default=0, help="init seed when no weights are given")
    a = ap.parse_args(argv)
    from mugv.torch_backend.jobs.loaders import vae_model
    from mugv.torch_backend.models.vae_runtime import place_vae
    model = vae_model(a.size, a.checkpoint, a.official, a.seed)
    result = evaluate(model, a.data, a.height, a.width, a.frames, a.fps, a.out, runtime=place_vae(model))
    sys.stdout.write(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
