"""Does the demo VAE keep every colour? Per-colour analyzer reads of its reconstructions (issue 24).

For each `--variants` entry the demo's VAE (experiments/demo.py::DemoVAE with that colour weight
for the product's mean-colour term, core/vae.py::foreground_colour_error, or other fields) is trained on the demo's
training clips of data seed `--seed`, then the clips of the VALIDATION splits (val_new + val_seen;
the evaluation splits are never looked at here) are reconstructed (posterior mean) through the
2D path alone (encode_spatial -> decode_spatial, what stage A trains) and through the whole VAE,
and the analyzer (data/analyzer.py) reads their colour (per colour), shape and motion. Prints a table and writes
OUT/vae_colour.json.

    python -P benchmarks/vae_colour.py --out runs/vae_colour --variants 0 3
    # two variants at once on two cores: one weight per process into the same --out, then the
    # command above reuses both (OUT/<variant>/result.json) and prints the table

Read: "hits / clips" per colour, and the circular mean hue (degrees) the analyzer measured on
the reconstructions of that colour (palette: red 0, orange 26, yellow 52, green 128, blue 227 =
-133). A variant that keeps red has red's hue near 0 and most red clips read red.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import time

import numpy as np


def parse_variant(text: str) -> tuple[str, dict]:
    """"name:key=value,key=value" (DemoVAE fields, numbers) or a bare colour weight "3"."""
    if ":" not in text:
        return f"cw{float(text):g}", {"colour_weight": float(text)}
    name, _, fields = text.partition(":")
    out = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return name, out


def run_variant(out: pathlib.Path, data_dir: pathlib.Path, seed: int, name: str, fields: dict) -> dict:
    import torch

    from mugv.torch_backend.data import analyzer, media
    from mugv.torch_backend.data.decode import decode_clip
    from mugv.torch_backend.data.manifest import read_manifest
    from mugv.torch_backend.experiments import demo
    from mugv.torch_backend.jobs.generate_data import DemoData

    result_path = out / name / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    d = DemoData(seed=seed)
    cfg = demo.DemoConfig(out=str(out / name), data=d, vae=dataclasses.replace(demo.DemoVAE(), **fields))
    t0 = time.monotonic()
    model, _, _ = demo.train_vae(cfg, data_dir / "train.jsonl", log=lambda s: None)
    seconds = time.monotonic() - t0
    model.eval()
    reads: dict[str, dict[str, list]] = {"2d": {}, "vae": {}}
    other = {path: {"shape": [], "motion": []} for path in reads}
    for split in ("val_new", "val_seen"):
        attrs = [json.loads(x) for x in (data_dir / f"{split}_attributes.jsonl").read_text().splitlines()]
        for entry, attr in zip(read_manifest(data_dir / f"{split}.jsonl"), attrs):
            clip = decode_clip(entry.path, d.frames, d.size, d.size, d.fps)
            x = media.to_video_tensor(clip)
            with torch.no_grad():
                recon = {"2d": model.decode_spatial(model.encode_spatial(x.transpose(0, 1))).transpose(0, 1),
                         "vae": model.decode(model.encode(x[None], sample=False), d.frames)[0]}
            for path, r in recon.items():
                analysis = analyzer.analyze(media.to_uint8(r).astype(np.float64))
                reads[path].setdefault(attr["colour"], []).append(
                    [analysis.best("colour") == attr["colour"], analysis.features["hue"]])
                for a in ("shape", "motion"):
                    other[path][a].append(analysis.best(a) == attr[a])
    result = {"variant": name, "fields": fields, "colour_weight": cfg.vae.colour_weight, "seed": seed, "train_seconds": round(seconds, 1), "per_colour": {
        path: {c: {"hits": int(sum(h for h, _ in rows)), "clips": len(rows),
                   "mean_hue": float(np.degrees(np.angle(np.mean([np.exp(1j * np.radians(u)) for _, u in rows]))))}
               for c, rows in per.items()} for path, per in reads.items()}}
    for path, per in result["per_colour"].items():
        result[f"{path}_accuracy"] = {"colour": sum(x["hits"] for x in per.values()) / sum(x["clips"] for x in per.values()),
                                      **{a: float(np.mean(hits)) for a, hits in other[path].items()}}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    import torch

    from mugv.torch_backend.jobs.generate_data import DemoData, generate
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0, help="data seed (DemoData.seed; the VAE's seed too)")
    ap.add_argument("--variants", nargs="+", default=["0", "3"],
                    help='colour weights ("3") or "name:field=value,..." over DemoVAE (e.g. "a1200:spatial_steps=1200")')
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = pathlib.Path(a.out)
    data_dir = out / f"data_seed{a.seed}"
    if not (data_dir / "val_seen.jsonl").is_file():
        generate(DemoData(seed=a.seed), data_dir, log=lambda s: None)
    results = [run_variant(out, data_dir, a.seed, *parse_variant(x)) for x in a.variants]
    colours = DemoData().colours
    print(f"demo VAE, data seed {a.seed}: validation clips (val_new + val_seen) read by the analyzer; hits / clips (mean hue)")
    print("variant        path  " + "  ".join(f"{c:>16}" for c in colours) + "  colour   shape  motion")
    for r in results:
        for path in ("2d", "vae"):
            cells = [f"{r['per_colour'][path][c]['hits']:>3}/{r['per_colour'][path][c]['clips']:<3} ({r['per_colour'][path][c]['mean_hue']:5.0f})"
                     if c in r["per_colour"][path] else " " * 16 for c in colours]
            print(f"{r['variant']:<13}  {path:<4}  " + "  ".join(f"{x:>16}" for x in cells) + "  " + "  ".join(f"{r[path + '_accuracy'][a]:6.1%}" for a in ("colour", "shape", "motion")))
    (out / "vae_colour.json").write_text(json.dumps({"command": "python -P benchmarks/vae_colour.py " + " ".join(argv or []),
                                                      "machine": platform.platform(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1:]))
