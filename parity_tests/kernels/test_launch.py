"""Direct launches (`kernels/_launch.py::launch`) against Triton's own launch path.

On the GPU: every kernel's forward and gradients are bit-equal when launched directly and through
Triton's path, and after the first launch of a signature no launch goes through Triton's path, in
fp32 with the kernels autotuned as production runs them (a child process, whatever
MUGV_KERNEL_AUTOTUNE the verification sets; the compiled kernel a direct launch calls has the
autotuner's chosen config), and in this process's configuration in bf16 and with tensors that are
not 16-byte aligned (their own signature: Triton compiles another binary for them). On the CPU: the argument binding on Triton's own
(uncompiled) objects and the signature (the interpreter has no compiled kernels to launch).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from mugv.kernels import _launch

import triton.language as tl  # noqa: E402  (after _launch: the interpreter decision)

KERNEL_MODULES = ["adaln_modulate", "gated_residual_modulate", "qk_rmsnorm_rope", "groupnorm_silu"]


def _kernel_for_binding(x_ptr, n, BLOCK: tl.constexpr, ROWS: tl.constexpr, FLAG: tl.constexpr = 7):
    pass


def test_binding_on_real_triton_objects():
    """The same on Triton's own classes (built without compiling): a JITFunction's `.fn` is the
    Python function, so the walk down an Autotuner stops at the JITFunction."""
    import triton
    from triton.runtime.jit import JITFunction
    jit = JITFunction(_kernel_for_binding)
    tuned = triton.autotune([triton.Config({"ROWS": 4}, num_warps=2), triton.Config({"ROWS": 2}, num_warps=4)],
                            key=["n"])(jit)
    tuned.best_config = tuned.configs[0]
    assert _launch._jit_function(tuned) is jit and _launch._jit_function(jit) is jit
    assert _launch._bound_tail(tuned, 2, {"BLOCK": 128}) == ([128, 4, 7], ["x_ptr", "n", "BLOCK", "ROWS", "FLAG"])
    assert _launch._bound_tail(jit, 2, {"BLOCK": 128, "ROWS": 1, "FLAG": 3})[0] == [128, 1, 3]
    assert not _launch._hooked(tuned)
    jit.add_pre_run_hook(lambda *a, **k: None)
    assert _launch._hooked(tuned) and _launch._hooked(jit)


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: records what a direct launch passes its launcher."""
    function, packed_metadata = "cu-function", "packed"

    def __init__(self):
        self.calls = []

    def _init_handles(self):
        pass

    def run(self, *launch_args):
        self.calls.append(launch_args)


class _FakeTuned:
    """Stands in for an Autotuner over `_kernel_for_binding`: `kernel[grid](...)` is Triton's path."""

    def __init__(self):
        from triton.runtime.jit import JITFunction
        self.fn = JITFunction(_kernel_for_binding)
        self.configs = []
        self.best_config = types.SimpleNamespace(kwargs={"ROWS": 4})
        self.compiled = _FakeCompiled()
        self.triton_path = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.triton_path.append((grid, args, meta))
            return self.compiled
        return run


def test_direct_launch_control_flow(monkeypatch):
    """The direct path's logic without a GPU: the first launch of a signature goes through Triton's
    path, later ones call the kept compiled kernel with the launcher's layout (grid, stream,
    function, metadata, no hooks, then every bound argument); a callable grid gets the bound
    arguments by name; a new signature or a set launch hook goes through Triton's path again."""
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "DIRECT", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77, raising=False)
    monkeypatch.setattr(_launch, "_DIRECT_CACHE", {})
    kernel = _FakeTuned()
    x = torch.zeros(8)
    grid = lambda meta: (meta["n"] // meta["ROWS"], 2)  # noqa: E731
    _launch.launch(kernel, grid, (x, 40), {"BLOCK": 64})
    assert len(kernel.triton_path) == 1 and not kernel.compiled.calls
    _launch.launch(kernel, grid, (x, 40), {"BLOCK": 64})
    assert len(kernel.triton_path) == 1
    assert kernel.compiled.calls == [(10, 2, 1, 77, "cu-function", "packed", None, None, None, x, 40, 64, 4, 7)]
    _launch.launch(kernel, grid, (x, 41), {"BLOCK": 64})           # another value: Triton's path
    _launch.launch(kernel, grid, (x[1:], 40), {"BLOCK": 64})       # misaligned: Triton's path
    assert len(kernel.triton_path) == 3 and len(kernel.compiled.calls) == 1
    hook = lambda *a: None  # noqa: E731
    _launch._knobs.runtime.launch_enter_hook.add(hook)
    try:
        _launch.launch(kernel, grid, (x, 40), {"BLOCK": 64})       # a profiler's hook: Triton's path
    finally:
        _launch._knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.triton_path) == 4 and len(kernel.compiled.calls) == 1
    _launch.launch(kernel, (3,), (x, 40), {"BLOCK": 64})
    assert kernel.compiled.calls[-1][:3] == (3, 1, 1)
    monkeypatch.setattr(_launch, "DIRECT", False)                  # benchmarks: always Triton's path
    _launch.launch(kernel, (3,), (x, 40), {"BLOCK": 64})
    assert len(kernel.triton_path) == 5 and len(kernel.compiled.calls) == 2


def test_signature_separates_dtype_alignment_values_and_keywords():
    buf = torch.zeros(64)
    base = _launch._signature("k", 0, (buf[:8], 3, 1.5), {"B": 1})
    assert base == _launch._signature("k", 0, (buf[4:12], 3, 1.5), {"B": 1})  # 16 bytes on: aligned
    for other in [_launch._signature("k", 0, (buf[1:9], 3, 1.5), {"B": 1}),      # 4 bytes on
                  _launch._signature("k", 0, (buf[:8].double(), 3, 1.5), {"B": 1}),
                  _launch._signature("k", 0, (buf[:8], 4, 1.5), {"B": 1}),
                  _launch._signature("k", 0, (buf[:8], 3.0, 1.5), {"B": 1}),     # int 3 vs float 3.0
                  _launch._signature("k", 0, (buf[:8], 3, 1.5), {"B": 2}),
                  _launch._signature("k", 0, (buf[:8], 3, 1.5), {"B": True}),   # a constexpr's type counts
                  _launch._signature("k", 1, (buf[:8], 3, 1.5), {"B": 1})]:
        assert other != base


def _cases(dtype: torch.dtype, dev: str, misaligned: bool = False):
    """(kernel name, function, float inputs that take gradients, all arguments) per kernel, at
    small production-like shapes (the DiT's bool frame mask, a view of the fused qkv projection)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g) * scale
        if misaligned:  # one element past an aligned allocation: 4 or 2 bytes off 16
            buf = torch.empty(t.numel() + 1, dtype=dtype, device=dev)
            out = buf[1:].view(*shape)
            out.copy_(t.to(dtype))
            return out.requires_grad_()
        return t.to(dev, dtype).requires_grad_()

    from mugv.kernels.adaln_modulate import adaln_modulate
    from mugv.kernels.gated_residual_modulate import gated_residual_modulate
    from mugv.kernels.groupnorm_silu import groupnorm_silu
    from mugv.kernels.qk_rmsnorm_rope import qk_rmsnorm_rope
    b, length, h = 2, 300, 256
    mask = (torch.arange(length) < 40).expand(b, length).to(dev)
    x, shift, scale = rand(b, length, h), rand(b, 2, h), rand(b, 2, h, scale=0.5)
    y, gate = rand(b, length, h), rand(b, 2, h)
    qkv = rand(b, length, 6, 3 * 72)
    q = qkv[..., :72]
    angles = (torch.rand(1, length, 36, generator=g) * 6).to(dev)
    w = rand(72)
    fmap, gw, gb = rand(2, 64, 3, 16, 16), rand(64), rand(64)
    return [("adaln_modulate", lambda: adaln_modulate(x, shift, scale, mask), [x, shift, scale]),
            ("gated_residual_modulate", lambda: gated_residual_modulate(x, y, gate, shift, scale, mask.long()),
             [x, y, gate, shift, scale]),
            ("qk_rmsnorm_rope", lambda: qk_rmsnorm_rope(q, w, angles), [qkv, w]),
            ("groupnorm_silu", lambda: groupnorm_silu(fmap, gw, gb, 32), [fmap, gw, gb])]


def _run(fn, inputs):
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    ups = [(torch.arange(o.numel(), device=o.device) % 3).view(o.shape).to(o.dtype) - 0.75 for o in outs]
    grads = torch.autograd.grad(outs, inputs, ups)
    return [o.detach() for o in outs] + list(grads)


def _module_kernels():
    import importlib
    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"mugv.kernels.{name}")
        for attr, obj in vars(module).items():
            if hasattr(obj, "run") and (hasattr(obj, "params") or hasattr(obj, "configs")):
                found[f"{name}.{attr}"] = obj
    return found


def compare(variants) -> list[dict]:
    """For each (dtype, misaligned) variant and kernel: outputs and gradients launched directly vs
    through Triton's path (bit-equal?), which kernels still went through Triton's path after the
    first direct call, and then, per kept compiled kernel, its alignment and (autotuned) whether
    its config is the autotuner's choice. One dict per finding."""
    kernels = _module_kernels()
    triton_path_calls = {k: 0 for k in kernels}
    for key, kernel in kernels.items():
        def counting(*args, _run=kernel.run, _key=key, **kw):
            triton_path_calls[_key] += 1
            return _run(*args, **kw)
        kernel.run = counting
    direct, cache = _launch.DIRECT, dict(_launch._DIRECT_CACHE)
    _launch._DIRECT_CACHE.clear()
    results = []
    try:
        for dtype, misaligned in variants:
            for name, fn, inputs in _cases(dtype, "cuda", misaligned):
                _launch.DIRECT = False
                _run(fn, inputs)  # tunes new keys
                want = _run(fn, inputs)
                _launch.DIRECT = True
                first = _run(fn, inputs)   # Triton's path where the signature is new
                before = dict(triton_path_calls)
                later = [_run(fn, inputs) for _ in range(2)]
                torch.cuda.synchronize()
                via_triton = {k: triton_path_calls[k] - before[k] for k in kernels
                              if triton_path_calls[k] != before[k]}
                equal = all(torch.equal(a, b) for got in [first, *later] for a, b in zip(got, want))
                worst = max(float((a.float() - b.float()).abs().max()) for got in [first, *later]
                            for a, b in zip(got, want))
                results.append({"kernel": name, "dtype": str(dtype), "misaligned": misaligned, "equal": equal,
                                "max_abs_diff": worst, "triton_path_after_first": via_triton})
        by_id = {id(k): (key, k) for key, k in kernels.items()}
        aligned = {}
        for sig, (compiled, tail, names) in _launch._DIRECT_CACHE.items():
            key, kernel = by_id[sig[0]]
            aligned.setdefault(key, set()).add(all(part[1] for part in sig[2:] if isinstance(part, tuple)
                                                   and len(part) == 2 and isinstance(part[0], torch.dtype)))
            if not hasattr(kernel, "configs"):
                continue
            # the config a direct launch uses is the autotuner's choice for its key
            bound = dict(zip(names[len(names) - len(tail):], tail))
            choices = [c for c in kernel.cache.values() if all(bound.get(m) == v for m, v in c.kwargs.items())
                       and c.num_warps == compiled.metadata.num_warps]
            results.append({"kernel": key, "autotuned_choice": bool(choices),
                            "config": {m: bound.get(m) for m in kernel.configs[0].kwargs}
                            | {"num_warps": compiled.metadata.num_warps}})
        results.append({"signatures_by_alignment": {k: sorted(v) for k, v in aligned.items()}})
    finally:
        for kernel in kernels.values():
            del kernel.run
        _launch.DIRECT = direct
        _launch._DIRECT_CACHE.clear()
        _launch._DIRECT_CACHE.update(cache)
    return results


def child() -> None:
    """In a process with the kernels autotuned (fp32: autotuning every kernel compiles ~90
    configs per dtype): one JSON line per finding."""
    assert _launch.autotuning(), "the direct-launch test runs the kernels autotuned"
    for r in compare([(torch.float32, False)]):
        print(json.dumps(r))


def _check_equal(rows: list[dict], n: int) -> None:
    checks = [r for r in rows if "equal" in r]
    assert len(checks) == n, rows
    for r in checks:
        assert r["equal"], f"direct launch differs from Triton's path: {r}"
        assert not r["triton_path_after_first"], f"launched through Triton's path after the first call: {r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need a GPU (the interpreter has none)")
def test_direct_launch_equals_tritons_path_autotuned():
    """As production runs: autotuned (a child process, whatever MUGV_KERNEL_AUTOTUNE this one has)."""
    env = {**os.environ, "MUGV_KERNEL_AUTOTUNE": "1", "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-P", "-c",
                           "from mugv.parity_tests.kernels.test_launch import child; child()"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    _check_equal(rows, 4)
    tuned = [r for r in rows if "autotuned_choice" in r]
    assert len(tuned) == 10 and all(r["autotuned_choice"] for r in tuned), tuned   # 10 autotuned kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need a GPU (the interpreter has none)")
def test_direct_launch_equals_tritons_path_bf16_and_misaligned():
    """bf16, and fp32 tensors 4 bytes off 16-byte alignment (their own signature: Triton compiles
    another binary), in this process's launch configuration."""
    rows = compare([(torch.bfloat16, False), (torch.float32, True), (torch.float32, False)])
    _check_equal(rows, 12)
    by_alignment = next(r for r in rows if "signatures_by_alignment" in r)["signatures_by_alignment"]
    # the kernels that read the test's misaligned inputs got a signature of each kind
    for kernel in ("adaln_modulate._adaln_fwd_kernel", "gated_residual_modulate._gated_bwd_kernel",
                   "qk_rmsnorm_rope._qk_fwd_kernel", "groupnorm_silu._gn_stats_kernel"):
        assert by_alignment.get(kernel) == [False, True], by_alignment


def test_cast_rows_one_cast_per_gradient_dtype():
    grads = torch.tensor([[1.0 + 2 ** -12, 2.0], [3.0, 4.0 + 2 ** -10]])
    same = _launch.cast_rows(grads, (torch.bfloat16, torch.bfloat16))
    assert [g.dtype for g in same] == [torch.bfloat16] * 2 and torch.equal(same[0], grads[0].bfloat16())
    mixed = _launch.cast_rows(grads, (torch.float32, torch.bfloat16))
    assert mixed[0].dtype == torch.float32 and torch.equal(mixed[0], grads[0])   # not rounded through bf16
    assert mixed[1].dtype == torch.bfloat16 and torch.equal(mixed[1], grads[1].bfloat16())
