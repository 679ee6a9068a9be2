"""`mugv verify-kernels`: the GPU parity of every Triton kernel and of FlashAttention-4 on this
device, recorded where the registry reads it (kernels/verify.py). Exit 0 when everything tested
passed, 1 when something failed (it stays on its reference), 2 without a GPU."""
from __future__ import annotations

import argparse
import pathlib


def verify_kernels(ns: argparse.Namespace) -> int:
    from mugv.kernels import verify
    argv = []
    if ns.only:
        argv += ["--only", ns.only]
    if ns.record:
        argv += ["--record", str(pathlib.Path(ns.record))]
    if ns.log_dir:
        argv += ["--log-dir", str(pathlib.Path(ns.log_dir))]
    return verify.main(argv)
