"""How repeatable x264 is on the demo's clip sizes: one rendered clip written N times in one
process, lossy (crf 18, the generated datasets' old setting) and lossless (qp 0, what
`media.write_mp4(lossless=True)` writes), counting distinct files and distinct decoded frames.
Prints a table and writes JSON.

    python -P benchmarks/x264_repeatability.py [--runs 8] [--json benchmarks/results/x264_repeatability_cpu.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import tempfile

import av
import numpy as np

from mugv.torch_backend.data.decode import read_frames
from mugv.torch_backend.data.media import write_mp4
from mugv.torch_backend.data.product_videos import Scene, render


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    scene = Scene(shape="cube", colour="red", material="matte", background="white studio", motion="pan right")
    rows = []
    for size in a.sizes:
        video = render(scene, 123, size, 17)
        for mode, kw in [("crf 18", {"crf": 18}), ("lossless", {"lossless": True})]:
            files, decodes = set(), set()
            for _ in range(a.runs):
                with tempfile.TemporaryDirectory() as tmp:
                    path = write_mp4(pathlib.Path(tmp) / "clip.mp4", video, 8, **kw)
                    files.add(hashlib.md5(path.read_bytes()).hexdigest())
                    decodes.add(hashlib.md5(read_frames(path).tobytes()).hexdigest())
            rows.append({"size": size, "mode": mode, "runs": a.runs, "distinct_files": len(files),
                         "distinct_decodes": len(decodes)})
    print(f"PyAV {av.__version__}, libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}")
    print("| size | mode | runs | distinct files | distinct decoded clips |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['mode']} | {r['runs']} | {r['distinct_files']} | {r['distinct_decodes']} |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"pyav": av.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
