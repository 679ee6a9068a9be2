"""Which recorded fast paths this checkout's code would still use, per GPU of a verification record.

A record (`kernels/verified.json`, or a user's `mugv verify-kernels` output) binds each fast path
to fingerprints of its code: the Triton kernels (`registry.fingerprint`), the compiled layers
(`dit_layers.compiled_fingerprint`, whose torch version is the device's) and FA4
(`attention.fa4_fingerprint`, whose flash-attn-4 version is the device's). Run it on a branch
before merging: a path marked "edited" runs its reference on that GPU until `mugv verify-kernels`
runs there. Versions belong to the device, so they are printed from the record, not compared with
this machine's. Runs on the CPU, reads JSON only.

    python -P benchmarks/record_status.py [--record kernels/verified.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from mugv.kernels import registry
from mugv.torch_backend.models import attention, dit_layers


def _code_part(fingerprint: str | None) -> str | None:
    """The part of a 'version|code' fingerprint that this checkout decides."""
    return None if fingerprint is None else fingerprint.split("|", 1)[-1]


def rows(record: dict) -> list[tuple[str, str, str, str]]:
    """(device, fast path, state, recorded on) for every device entry of `record`."""
    out = []
    compiled_code = _code_part(dit_layers.compiled_fingerprint())
    for device, entry in sorted(record.items()):
        date = entry.get("date", "?")
        for name in registry.KERNELS:
            if name not in entry.get("kernels", []):
                state = "not passed there"
            elif entry.get("fingerprints", {}).get(name) == registry.fingerprint(name):
                state = "current"
            else:
                state = "edited since"
            out.append((device, name, state, f"{date}, Triton {entry.get('triton', '?')}"))
        compiled = entry.get("compiled_layers")
        state = ("not recorded" if compiled is None else
                 "current" if _code_part(compiled.get("fingerprint")) == compiled_code else "edited since")
        out.append((device, "compiled_layers", state,
                    f"{(compiled or {}).get('date', date)}, torch {entry.get('torch', '?')}"))
        for backend, fa in sorted(entry.get("attention", {}).items()):
            recorded = fa.get("fingerprint")
            ours = attention.fa4_fingerprint(fa.get("version"))
            state = "current" if recorded == ours else "edited since"
            out.append((device, f"{backend} {fa.get('version', '?')}", state, fa.get("date", "?")))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", default=str(registry.VERIFIED_FILE),
                    help="verification record (default: the one this checkout ships)")
    args = ap.parse_args(argv)
    path = pathlib.Path(args.record)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"{path}: cannot read a verification record ({e})", file=sys.stderr)
        return 2
    if not isinstance(record, dict):
        print(f"{path}: expected a JSON object of device entries", file=sys.stderr)
        return 2
    print(f"record: {path}\n")
    print("| GPU | fast path | this checkout's code | verified |")
    print("|---|---|---|---|")
    for device, name, state, when in rows(record):
        print(f"| {device} | {name} | {state} | {when} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
