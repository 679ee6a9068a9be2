"""Verify the fused kernels on this GPU and record it where the registry reads it.

    mugv verify-kernels            (or: python -P -m mugv.kernels.verify [--only NAME,...])

Runs each kernel's parity test file (fp32, fp16 and bf16 forward and gradients against the
reference; `parity_tests/kernels`) with pytest on this device, then writes the record of the files
that passed, with each kernel's fingerprint, to the user record (`user_record_path()`:
$MUGV_VERIFIED_KERNELS, else $XDG_CACHE_HOME/mugv/verified_kernels.json, else
~/.cache/mugv/verified_kernels.json). The registry merges it over the record shipped in the
package (`kernels/verified.json`), so a user on a new GPU switches the fast paths on with one
command, and nothing inside the installed package is written. A kernel whose test fails stays on
its reference; editing a kernel changes its fingerprint and turns it off until verified again.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

TESTS_NOTE = ("parity_tests/kernels (fp32, fp16, bf16 within 2x torch bf16; forward and gradients) at the "
              "fixed launch config (MUGV_KERNEL_AUTOTUNE=0), fp32 at every autotune config, and the whole "
              "DiT / VAE with the kernels against float64")


def user_record_path() -> pathlib.Path:
    explicit = os.environ.get("MUGV_VERIFIED_KERNELS")
    if explicit:
        return pathlib.Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "mugv" / "verified_kernels.json"


def tests_dir() -> pathlib.Path:
    """The kernels' parity tests as installed (mugv.parity_tests ships with the package)."""
    import mugv.parity_tests
    return pathlib.Path(mugv.parity_tests.__file__).resolve().parent / "kernels"


def run_parity_tests(files: list[str] | None = None, log_dir: pathlib.Path | None = None) -> dict:
    """pytest on the kernel parity files in a child process (python -P: nothing in the working
    directory shadows an installed package); returns {"returncode", "files": {stem: passed}}."""
    log_dir = pathlib.Path(log_dir or tempfile.mkdtemp(prefix="mugv-verify-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    junit = log_dir / "parity_junit.xml"
    targets = [str(tests_dir() / pathlib.Path(f).name) for f in files] if files else [str(tests_dir())]
    proc = subprocess.run([sys.executable, "-P", "-m", "pytest", *targets, "-q", "-rfE",
                           "--import-mode=importlib", f"--rootdir={tests_dir().parent}",
                           f"--junitxml={junit}", "-p", "no:cacheprovider"],
                          capture_output=True, text=True,
                          env={**os.environ, "MUGV_KERNEL_AUTOTUNE": "0", "PYTHONSAFEPATH": "1"})
    (log_dir / "parity_tests.log").write_text(proc.stdout + proc.stderr)
    passed: dict[str, bool] = {}
    cases: dict[str, bool] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            stem = case.get("classname", "").split(".")[-1]
            bad = any(child.tag in ("failure", "error") for child in case)
            skipped = any(child.tag == "skipped" for child in case)
            passed[stem] = passed.get(stem, True) and not bad
            if not skipped:
                cases[f"{stem}::{case.get('name', '')}"] = not bad
    return {"returncode": proc.returncode, "files": passed, "cases": cases,
            "log": str(log_dir / "parity_tests.log"), "tail": proc.stdout[-3000:]}


def attention_record(parity: dict) -> dict:
    """{"fa4": {"version", "head_dims": {d: [run-at dims that passed]}, "tested": {d: [...]}}} from
    test_attention_fa4's cases: a (head dim, run-at dim) counts only when self- and
    cross-attention both passed (forward and dQ, dK, dV)."""
    results: dict[tuple[int, int], bool] = {}
    for name, ok in parity.get("cases", {}).items():
        m = re.search(r"test_attention_fa4::test_fa4_equals_float64_reference\[(.*)\]", name)
        if not m:
            continue
        d, p = (int(x) for x in re.findall(r"\d+", m.group(1))[:2])
        results[d, p] = results.get((d, p), True) and ok
    if not results:
        return {}
    head_dims: dict[str, list[int]] = {}
    tested: dict[str, list[int]] = {}
    for (d, p), ok in sorted(results.items()):
        tested.setdefault(str(d), []).append(p)
        if ok:
            head_dims.setdefault(str(d), []).append(p)
    try:
        version = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        version = None
    from mugv.torch_backend.models.attention import fa4_fingerprint
    return {"fa4": {"version": version, "fingerprint": fa4_fingerprint(version), "head_dims": head_dims,
                    "tested": tested, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}


def time_attention(record: dict, tokens: int = 16384, heads: int = 16, iters: int = 5) -> dict:
    """Add to an attention record the forward+backward time (ms, median of `iters`, bf16, one
    sample, self-attention over `tokens` tokens and `heads` heads, the zero-padding included) of
    each head dim a model head dim passed at: the registry runs the fastest. Needs the GPU."""
    import statistics

    import torch
    import torch.nn.functional as F

    from mugv.torch_backend.models.attention import fa4_attention
    from mugv.torch_backend.parallel.profiling import call_ms
    entry = record.get("fa4")
    if not entry:
        return record
    ms: dict[str, dict[str, float]] = {}
    for d, run_ats in entry["head_dims"].items():
        d = int(d)
        if len(run_ats) < 2:
            continue
        base = [torch.randn(1, tokens, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        for p in run_ats:
            def step():
                q, k, v = (F.pad(t, (0, p - d)).requires_grad_() for t in base)
                out = fa4_attention(q, k, v, scale=d ** -0.5)[..., :d]
                out.backward(torch.ones_like(out))
            times = call_ms(step, iters, warmup=1, device="cuda")  # the first call compiles
            ms.setdefault(str(d), {})[str(p)] = round(statistics.median(times), 3)
    entry["ms"] = ms
    entry["timing"] = f"fwd+bwd, bf16, 1 x {tokens} tokens x {heads} heads, median of {iters}"
    return record


def tests_passed(parity: dict, entry) -> bool:
    """Every parity file of a kernel entry passed (a file that did not run counts as failed)."""
    return all(parity["files"].get(pathlib.Path(t).stem) for t in entry.tests)


# fast paths besides the kernels that `--only` may name, with their parity files: FlashAttention-4,
# and the compiled transformer layers (KernelConfig.compile_layers)
FAST_PATH_TESTS = {"fa4": "parity_tests/kernels/test_attention_fa4.py",
                   "compiled_layers": "parity_tests/kernels/test_dit_compiled.py"}


def test_files(only: set[str] | None) -> list[str] | None:
    """The parity files of the kernels (or attention backends) in `only` (None: every file of the
    kernel test folder)."""
    from mugv.kernels.registry import KERNELS
    if not only:
        return None
    return sorted({t for k in only if k in KERNELS for t in KERNELS[k].tests}
                  | {FAST_PATH_TESTS[k] for k in only if k in FAST_PATH_TESTS})


def device_record(device: str, parity: dict, only: set[str] | None, previous: dict) -> dict:
    """This device's record: the kernels whose test file passed now, plus (with `only`) the
    previously verified others whose fingerprints still match."""
    import torch
    import triton

    from mugv.kernels.registry import KERNELS, fingerprint
    passed = [k for k, e in KERNELS.items() if tests_passed(parity, e) and (not only or k in only)]
    kept = [k for k in previous.get("kernels", []) if only and k not in only and k in KERNELS
            and previous.get("fingerprints", {}).get(k) == fingerprint(k)]
    names = kept + passed
    attention = attention_record(parity) or previous.get("attention", {})
    compiled = previous.get("compiled_layers")
    ran = parity["files"].get("test_dit_compiled")
    if ran is not None:   # the compiled DiT's file ran now: its result replaces the earlier one
        from mugv.torch_backend.models.dit_layers import compiled_fingerprint
        compiled = {"fingerprint": compiled_fingerprint(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} \
            if ran else None
    extra = {"compiled_layers": compiled} if compiled else {}
    return {"device": device, "attention": attention, **extra, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "mugv verify-kernels",
            "kernels": names, "fingerprints": {k: fingerprint(k) for k in names},
            "failed": sorted(k for k, e in KERNELS.items() if (not only or k in only)
                             and not tests_passed(parity, e)),
            "tests": TESTS_NOTE + (f"; tested {sorted(only)}, kept {kept} (fingerprints unchanged)" if only else "")}


def write_record(device: str, record: dict, path: pathlib.Path | None = None) -> pathlib.Path:
    """Merge this device's record into the JSON file at `path` (atomically)."""
    path = pathlib.Path(path or user_record_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(path.read_text()) if path.exists() else {}
    records[device] = record
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def verify(only: set[str] | None = None, record_path: pathlib.Path | None = None,
           log_dir: pathlib.Path | None = None) -> dict:
    """Run the parity tests on this GPU and record the result; returns the device's record."""
    import torch

    from mugv.kernels.registry import KERNELS, verified_devices
    if not torch.cuda.is_available():
        raise RuntimeError("verify-kernels needs a CUDA GPU: on the CPU the reference is always used")
    unknown = (only or set()) - set(KERNELS) - set(FAST_PATH_TESTS)
    if unknown:
        raise ValueError(f"--only: unknown kernels {sorted(unknown)}; expected names from "
                         f"{sorted(KERNELS) + sorted(FAST_PATH_TESTS)}")
    device = torch.cuda.get_device_name()
    parity = run_parity_tests(test_files(only), log_dir)
    record = device_record(device, parity, only, verified_devices().get(device, {}))
    if attention_record(parity):   # measured now: where several head dims passed, the fastest runs
        time_attention(record["attention"])
    path = write_record(device, record, record_path)
    verified_devices.cache_clear()
    record["record_path"], record["log"] = str(path), parity["log"]
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mugv verify-kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated kernel names or 'fa4' (default: all)")
    ap.add_argument("--record", default=None, help=f"record file (default: {user_record_path()})")
    ap.add_argument("--log-dir", default=None, help="where the pytest log and junit XML go")
    a = ap.parse_args(argv)
    try:
        rec = verify({k for k in a.only.split(",") if k} or None,
                     pathlib.Path(a.record) if a.record else None,
                     pathlib.Path(a.log_dir) if a.log_dir else None)
    except (RuntimeError, ValueError) as err:
        print(f"mugv verify-kernels: {err}", file=sys.stderr)
        return 2
    fa4 = rec["attention"].get("fa4", {})
    print(f"{rec['device']}: verified {rec['kernels'] or 'none'}; failed {rec['failed'] or 'none'}; "
          f"compiled layers {'verified' if rec.get('compiled_layers') else 'not verified'}\n"
          f"fa4 {fa4.get('version', 'not installed')}: passed at {fa4.get('head_dims', {})} "
          f"of {fa4.get('tested', {})} (head dim: run-at dims), code {fa4.get('fingerprint')}, "
          f"fwd+bwd ms {fa4.get('ms', {})}\n"
          f"record: {rec['record_path']}\nlog: {rec['log']}")
    return 0 if not rec["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
