"""Which fused kernels exist, and whether the model may use one on a given device.

The DiT/VAE spec slots ask `select(name, device)` once, when the model is built, and get either the
Triton function or its plain-torch reference (same signature). The reference is the default: a
kernel is used only on a CUDA device whose name is recorded as having passed that kernel's parity
tests with the kernel's current `fingerprint` (so editing a kernel turns it off until the GPU run
is repeated), or when MUGV_KERNELS forces a choice. Records: the one shipped in the package
(`verified.json`, the project's own GPU runs) and the user's (`mugv verify-kernels` on their GPU,
`kernels/verify.py::user_record_path()`), which wins for its devices. `kernel_status` says which
applies and why; runs log it.

    MUGV_KERNELS=reference        always the reference (e.g. to bisect a numerical difference)
    MUGV_KERNELS=all              every kernel on any CUDA device (you ran the parity tests there)
    MUGV_KERNELS=adaln_modulate,qk_rmsnorm_rope    those kernels on any CUDA device

On the CPU the kernels only run in Triton's interpreter (for tests), so the reference is always
chosen there. Kernel modules are imported lazily: importing the registry defines no Triton kernel.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import pathlib

VERIFIED_FILE = pathlib.Path(__file__).with_name("verified.json")


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    name: str
    module: str  # under mugv.kernels
    function: str
    reference: str
    tests: tuple[str, ...]  # the parity tests that must all pass on a device before it is used there
    used_by: str


# The DiT's kernels are verified alone and together in the whole DiT (forward and every gradient);
# the VAE's kernel file has its whole-VAE test inside.
_WHOLE_DIT = "parity_tests/kernels/test_dit_kernels.py"
_LAUNCH = "parity_tests/kernels/test_launch.py"  # direct launches equal Triton's path, autotuned
KERNELS: dict[str, KernelEntry] = {e.name: e for e in [
    KernelEntry("adaln_modulate", "adaln_modulate", "adaln_modulate", "adaln_modulate_reference",
                ("parity_tests/kernels/test_adaln_modulate.py", _WHOLE_DIT, _LAUNCH), "DiT block AdaLN sites"),
    KernelEntry("gated_residual_modulate", "gated_residual_modulate", "gated_residual_modulate",
                "gated_residual_modulate_reference",
                ("parity_tests/kernels/test_gated_residual_modulate.py", _WHOLE_DIT, _LAUNCH),
                "DiT block: gated residual into the next AdaLN site"),
    KernelEntry("qk_rmsnorm_rope", "qk_rmsnorm_rope", "qk_rmsnorm_rope", "qk_rmsnorm_rope_reference",
                ("parity_tests/kernels/test_qk_rmsnorm_rope.py", _WHOLE_DIT, _LAUNCH),
                "DiT self-attention q and k (RMSNorm + RoPE); cross-attention q and k (RMSNorm, zero angles)"),
    KernelEntry("groupnorm_silu", "groupnorm_silu", "groupnorm_silu", "groupnorm_silu_reference",
                ("parity_tests/kernels/test_groupnorm_silu.py", _LAUNCH), "VAE ResBlocks"),
]}


def _entry(name: str) -> KernelEntry:
    if name not in KERNELS:
        raise KeyError(f"kernel {name!r}: expected one of {sorted(KERNELS)}")
    return KERNELS[name]


@functools.lru_cache(maxsize=None)
def verified_devices() -> dict:
    """{device name: {"kernels": [...], "torch": ..., "triton": ..., ...}}: the package's
    verified.json, then the user's record (`mugv verify-kernels`) over it, device by device."""
    from mugv.kernels.verify import user_record_path
    records: dict = {}
    for path in (VERIFIED_FILE, user_record_path()):
        if path.exists():
            try:
                records.update(json.loads(path.read_text()))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not a kernel verification record ({err}); delete it and "
                                 "rerun `mugv verify-kernels`") from None
    return records


def _kernel_source(module) -> str:
    """A kernel module's source less its docstrings and `*_reference` functions (cut by line, so
    the text, comments included, is what was written, whatever the Python version)."""
    source = inspect.getsource(module)
    drop = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.endswith("_reference"):
            drop.append((min([d.lineno for d in node.decorator_list] + [node.lineno]), node.end_lineno))
        if (isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
                and isinstance(node.body[0].value.value, str)):
            drop.append((node.body[0].lineno, node.body[0].end_lineno))
    lines = source.splitlines()
    return "\n".join(line for i, line in enumerate(lines, 1) if not any(a <= i <= b for a, b in drop))


def _kernel_modules(module_name: str) -> list[str]:
    """`module_name` and the mugv.kernels modules it imports, transitively, sorted."""
    seen, todo = set(), [module_name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(inspect.getsource(importlib.import_module(f"mugv.kernels.{name}")))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "mugv.kernels":
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mugv.kernels."):
                todo.append(node.module.split(".", 2)[2])
    return sorted(seen)


def fingerprint(name: str) -> str:
    """sha256 over what decides a kernel's numerics and launch: the whole source of its module and
    of the kernel modules it imports (kernels/_launch.py among them), less docstrings and
    `*_reference` functions, and the names of the parity files it must pass. Launch helpers
    (grids, tile geometry, gradient epilogues) are inside; editing a reference or a doc keeps a
    GPU verification valid."""
    entry = _entry(name)
    parts = [_kernel_source(importlib.import_module(f"mugv.kernels.{m}")) for m in _kernel_modules(entry.module)]
    parts.append(repr(entry.tests))  # a new required test voids earlier verifications
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def kernel_status(name: str, device, choice: str | None = None) -> tuple[bool, str]:
    """(whether the Triton kernel `name` may replace its reference on `device`, why). `choice` (a
    run's `core/recipe.py::KernelConfig.kernels`: "reference", "all" or names) wins over
    MUGV_KERNELS; None reads MUGV_KERNELS, and without it the verification records decide."""
    _entry(name)
    device_type = getattr(device, "type", str(device).split(":")[0])
    if device_type != "cuda":
        return False, f"reference: {device_type} device (kernels run on CUDA only)"
    source = "MUGV_KERNELS" if choice is None else "the run's kernels setting"
    choice = (os.environ.get("MUGV_KERNELS", "") if choice is None else choice).strip()
    if choice == "reference":
        return False, f"reference: forced by {source}=reference"
    if choice == "all":
        return True, f"kernel: forced by {source}=all (not checked against a verification record)"
    if choice:
        wanted = {k.strip() for k in choice.split(",") if k.strip()}
        unknown = wanted - set(KERNELS)
        if unknown:
            raise ValueError(f"{source}: unknown kernels {sorted(unknown)}; expected names from "
                             f"{sorted(KERNELS)}, 'all' or 'reference'")
        return (True, f"kernel: forced by {source}={choice}") if name in wanted else \
            (False, f"reference: not listed in {source}={choice}")
    import torch
    gpu = torch.cuda.get_device_name(device)
    record = verified_devices().get(gpu)
    if record is None:
        return False, f"reference: not verified on {gpu} (run `mugv verify-kernels`)"
    if name not in record.get("kernels", []):
        return False, f"reference: its parity test did not pass on {gpu} ({record.get('date', '?')})"
    if record.get("fingerprints", {}).get(name) != fingerprint(name):
        return False, f"reference: edited since verified on {gpu} (run `mugv verify-kernels`)"
    triton_version = _triton_version()
    if record.get("triton") != triton_version:
        return False, (f"reference: verified on {gpu} with Triton {record.get('triton')}, this is "
                       f"Triton {triton_version} (run `mugv verify-kernels`)")
    return True, f"kernel: verified on {gpu} ({record.get('date', '?')}, {record.get('command', '?')})"


def _triton_version() -> str:
    """The running Triton's version, as `mugv verify-kernels` records it (CUDA devices only: the
    kernel modules' import decides the interpreter first)."""
    from mugv.kernels import _launch
    return _launch.triton.__version__


def kernel_enabled(name: str, device, choice: str | None = None) -> bool:
    """Whether the Triton kernel `name` may replace its reference on `device` (see module doc)."""
    return kernel_status(name, device, choice)[0]


def kernel_report(device, choice: str | None = None) -> dict[str, dict]:
    """{kernel: {"used": bool, "why": str}} for every kernel on `device` (what runs record)."""
    return {n: dict(zip(("used", "why"), kernel_status(n, device, choice))) for n in KERNELS}


def kernel_function(name: str, reference: bool = False):
    """The Triton function of kernel `name` (or its plain-torch reference), without any check."""
    entry = _entry(name)
    module = importlib.import_module(f"mugv.kernels.{entry.module}")
    return getattr(module, entry.reference if reference else entry.function)


def select(name: str, device, choice: str | None = None):
    """The function to call for `name` on `device`: the Triton kernel where enabled (`choice` as
    in `kernel_enabled`), else the plain-torch reference (same arguments and results)."""
    return kernel_function(name, reference=not kernel_enabled(name, device, choice))


def attention_head_dim(backend: str, version: str, head_dim: int, device, fingerprint: str
                       ) -> tuple[int | None, str]:
    """For an attention backend outside torch (FlashAttention-4): the head dim to run a model
    head dim `head_dim` at on `device` (itself, or a zero-padded one whose forward and dQ/dK/dV
    parity passed there with this `version` and this `fingerprint` of the calling code and the dQ
    fix, `torch_backend/models/attention.py::fa4_fingerprint`), or None; and why. Among the passing ones the fastest in the record's timing (`ms`, measured by
    `mugv verify-kernels` after the parity), else the smallest. The record is written by
    `mugv verify-kernels` (kernels/verify.py) under the device's "attention" entry."""
    import torch

    gpu = torch.cuda.get_device_name(device)
    entry = verified_devices().get(gpu, {}).get("attention", {}).get(backend)
    if entry is None:
        return None, f"{backend} not verified on {gpu} (run `mugv verify-kernels`)"
    if entry.get("version") != version:
        return None, (f"{backend} {version} installed, {entry.get('version')} verified on {gpu} "
                      "(run `mugv verify-kernels`)")
    if entry.get("fingerprint") != fingerprint:
        return None, (f"{backend} {version} verified on {gpu} as {entry.get('fingerprint')!r} (dQ fix | calling "
                      f"code), this process runs {fingerprint!r} (run `mugv verify-kernels`)")
    passed = sorted(int(p) for p in entry.get("head_dims", {}).get(str(head_dim), []))
    if not passed:
        tested = entry.get("tested", {}).get(str(head_dim))
        return None, (f"{backend} {version} failed parity at head dim {head_dim} on {gpu} (tried {tested})"
                      if tested else f"{backend} {version} not verified at head dim {head_dim} on {gpu}")
    ms = {int(p): t for p, t in entry.get("ms", {}).get(str(head_dim), {}).items()}
    timed = [p for p in passed if p in ms]
    run_at = min(timed, key=lambda p: (ms[p], p)) if timed else passed[0]
    how = "unpadded" if run_at == head_dim else f"zero-padded to {run_at}"
    if timed:
        how += " (fastest verified: " + ", ".join(f"{p}: {ms[p]:.2f} ms" for p in sorted(timed)) + ")"
    failed = sorted(set(entry.get("tested", {}).get(str(head_dim), [])) - set(passed))
    return run_at, (f"{backend} {version} {how}: verified on {gpu} ({entry.get('date', '?')})"
                    + (f"; failed parity at {failed}" if failed else ""))
