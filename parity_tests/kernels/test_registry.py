"""The kernel registry: the reference is the default, kernels only where enabled for CUDA."""
import pytest
import torch

from mugv.kernels import registry


def test_every_registered_kernel_has_function_reference_and_test():
    import importlib
    import pathlib
    repo = pathlib.Path(__file__).resolve().parents[2]
    for entry in registry.KERNELS.values():
        module = importlib.import_module(f"mugv.kernels.{entry.module}")
        assert callable(getattr(module, entry.function)) and callable(getattr(module, entry.reference))
        assert entry.tests and all((repo / t).is_file() for t in entry.tests), entry.tests


def test_reference_on_cpu_even_when_forced(monkeypatch):
    monkeypatch.setenv("MUGV_KERNELS", "all")
    for name in registry.KERNELS:
        assert not registry.kernel_enabled(name, torch.device("cpu"))
        assert registry.select(name, torch.device("cpu")).__name__.endswith("_reference")


def test_env_choices_on_cuda(monkeypatch):
    cuda = torch.device("cuda")  # a device object only; no CUDA call is made for forced choices
    monkeypatch.setenv("MUGV_KERNELS", "all")
    assert registry.kernel_enabled("qk_rmsnorm_rope", cuda)
    monkeypatch.setenv("MUGV_KERNELS", "reference")
    assert not registry.kernel_enabled("qk_rmsnorm_rope", cuda)
    monkeypatch.setenv("MUGV_KERNELS", "adaln_modulate")
    assert registry.kernel_enabled("adaln_modulate", cuda)
    assert not registry.kernel_enabled("groupnorm_silu", cuda)
    monkeypatch.setenv("MUGV_KERNELS", "adaln_modulte")
    with pytest.raises(ValueError, match="adaln_modulte"):
        registry.kernel_enabled("adaln_modulate", cuda)
    with pytest.raises(KeyError, match="nope"):
        registry.select("nope", cuda)


def test_verified_record_needs_matching_fingerprint(monkeypatch):
    """A GPU record enables a kernel only while its sources still hash to the recorded value."""
    monkeypatch.delenv("MUGV_KERNELS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    current = registry.fingerprint("adaln_modulate")
    record = {"Some GPU": {"kernels": ["adaln_modulate", "groupnorm_silu"], "triton": registry._triton_version(),
                           "fingerprints": {"adaln_modulate": current, "groupnorm_silu": "0" * 64}}}
    monkeypatch.setattr(registry, "verified_devices", lambda: record)
    cuda = torch.device("cuda")
    assert registry.kernel_enabled("adaln_modulate", cuda)
    assert not registry.kernel_enabled("groupnorm_silu", cuda)  # edited since its GPU run
    assert not registry.kernel_enabled("qk_rmsnorm_rope", cuda)  # never verified there
    record["Some GPU"]["triton"] = "0.0.1"   # Triton compiles the kernels: another version, other binaries
    used, why = registry.kernel_status("adaln_modulate", cuda)
    assert not used and "Triton 0.0.1" in why and "mugv verify-kernels" in why
    record["Some GPU"]["triton"] = registry._triton_version()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Other GPU")
    assert not registry.kernel_enabled("adaln_modulate", cuda)


def test_committed_record_matches_current_kernels():
    """kernels/verified.json describes the kernels as they are. A kernel edited since its GPU run
    is reported as a visible skip, not a failure: the registry already falls back to its reference
    there until benchmarks/kernels.py is re-run on the GPU and the new record committed."""
    stale = []
    for device, record in registry.verified_devices().items():
        assert set(record["kernels"]) <= set(registry.KERNELS), record["kernels"]
        for name in record["kernels"]:
            assert len(record["fingerprints"][name]) == 64, (device, name)
            if record["fingerprints"][name] != registry.fingerprint(name):
                stale.append(f"{name} on {device}")
    if stale:
        pytest.skip(f"edited since their GPU parity run (references used there until re-run): {stale}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only chosen without a GPU")
def test_early_triton_import_gives_a_clear_error_at_launch():
    """Importing triton (here through torch's deterministic mode) before TRITON_INTERPRET is set
    leaves the references usable and makes a kernel launch say what went wrong."""
    import os
    import subprocess
    import sys
    code = (
        "import torch\n"
        "torch.use_deterministic_algorithms(True)\n"
        "from mugv.kernels.registry import select\n"
        "from mugv.kernels.adaln_modulate import adaln_modulate\n"
        "x, t = torch.randn(1, 3, 8), torch.randn(1, 1, 8)\n"
        "select('adaln_modulate', torch.device('cpu'))(x, t, t)\n"
        "try:\n"
        "    adaln_modulate(x, t, t)\n"
        "except RuntimeError as e:\n"
        "    print('CLEAR' if 'TRITON_INTERPRET' in str(e) else repr(e))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "CLEAR" in out.stdout, out.stdout + out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The user's record (`mugv verify-kernels`): merged over the packaged one, and why each choice


@pytest.fixture()
def fake_gpu(monkeypatch, tmp_path):
    import torch

    from mugv.kernels import registry
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 9000")
    monkeypatch.setenv("MUGV_VERIFIED_KERNELS", str(tmp_path / "verified_kernels.json"))
    monkeypatch.delenv("MUGV_KERNELS", raising=False)
    registry.verified_devices.cache_clear()
    yield tmp_path / "verified_kernels.json"
    registry.verified_devices.cache_clear()


def test_user_record_switches_a_kernel_on_for_its_device_and_says_why(fake_gpu):
    from mugv.kernels import registry, verify
    used, why = registry.kernel_status("adaln_modulate", "cuda")
    assert not used and "not verified on Fake GPU 9000" in why and "mugv verify-kernels" in why
    parity = {"files": {"test_launch": True, "test_adaln_modulate": True, "test_gated_residual_modulate": False,
                        "test_qk_rmsnorm_rope": True, "test_dit_kernels": True}}
    record = verify.device_record("Fake GPU 9000", parity, None, {})
    verify.write_record("Fake GPU 9000", record)
    registry.verified_devices.cache_clear()
    assert registry.kernel_status("adaln_modulate", "cuda") == (
        True, f"kernel: verified on Fake GPU 9000 ({record['date']}, mugv verify-kernels)")
    used, why = registry.kernel_status("gated_residual_modulate", "cuda")
    assert not used and "did not pass" in why
    assert "gated_residual_modulate" in record["failed"]
    # a DiT kernel counts only when the whole DiT with the kernels passed too
    alone = verify.device_record("Fake GPU 9000", {"files": {"test_qk_rmsnorm_rope": True,
                                                            "test_dit_kernels": False}}, None, {})
    assert "qk_rmsnorm_rope" in alone["failed"] and "qk_rmsnorm_rope" not in alone["kernels"]
    assert set(registry.verified_devices()) >= {"Fake GPU 9000"}   # the packaged devices stay too
    report = registry.kernel_report("cpu")
    assert set(report) == set(registry.KERNELS) and not any(r["used"] for r in report.values())


def test_edited_kernel_falls_back_until_verified_again(fake_gpu):
    from mugv.kernels import registry, verify
    record = verify.device_record("Fake GPU 9000", {"files": {"test_qk_rmsnorm_rope": True, "test_launch": True,
                                                             "test_dit_kernels": True}}, None, {})
    record["fingerprints"]["qk_rmsnorm_rope"] = "0" * 64    # verified with other source
    verify.write_record("Fake GPU 9000", record)
    registry.verified_devices.cache_clear()
    used, why = registry.kernel_status("qk_rmsnorm_rope", "cuda")
    assert not used and "edited since verified" in why


def test_only_keeps_the_other_verified_kernels(fake_gpu):
    from mugv.kernels import verify
    first = verify.device_record("Fake GPU 9000", {"files": {"test_adaln_modulate": True, "test_dit_kernels": True,
                                                            "test_launch": True,
                                                            "test_groupnorm_silu": True}}, None, {})
    again = verify.device_record("Fake GPU 9000", {"files": {"test_groupnorm_silu": False}},
                                 {"groupnorm_silu"}, first)
    assert again["kernels"] == ["adaln_modulate"] and again["failed"] == ["groupnorm_silu"]


def test_verify_needs_a_gpu_and_the_bad_record_is_named(fake_gpu):
    import torch

    from mugv.kernels import registry, verify
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            verify.verify()
    fake_gpu.write_text("{not json")
    registry.verified_devices.cache_clear()
    with pytest.raises(ValueError, match="verified_kernels.json: not a kernel verification record"):
        registry.verified_devices()


# ---------------------------------------------------------------------------------------------
# Attention backends outside torch (FlashAttention-4): used only at a verified head dim


def _fa4_parity(results):
    return {"cases": {f"test_attention_fa4::test_fa4_equals_float64_reference[{kind}-{d}-{p}]": ok
                      for (d, p, kind), ok in results.items()}}


def test_fa4_runs_at_the_smallest_verified_head_dim(fake_gpu, monkeypatch):
    """The 4.0.0b36 case: 72 and 80 fail dQ, 96 passes -> pad to 96; a cross failure alone counts."""
    import importlib.metadata

    from mugv.kernels import registry, verify
    from mugv.torch_backend.models.attention import fa4_fingerprint
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name, _v=importlib.metadata.version: "4.0.0b36" if name == "flash-attn-4" else _v(name))
    results = {(72, 72, "self"): False, (72, 72, "cross"): True, (72, 80, "self"): True,
               (72, 80, "cross"): False, (72, 96, "self"): True, (72, 96, "cross"): True,
               (128, 128, "self"): True, (128, 128, "cross"): True}
    record = verify.device_record("Fake GPU 9000", {"files": {}, **_fa4_parity(results)}, None, {})
    assert record["attention"]["fa4"]["head_dims"] == {"72": [96], "128": [128]}
    verify.write_record("Fake GPU 9000", record)
    registry.verified_devices.cache_clear()
    code = fa4_fingerprint("4.0.0b36")
    run_at, why = registry.attention_head_dim("fa4", "4.0.0b36", 72, "cuda", code)
    assert run_at == 96 and "zero-padded to 96" in why and "failed parity at [72, 80]" in why
    assert registry.attention_head_dim("fa4", "4.0.0b36", 128, "cuda", code)[0] == 128
    run_at, why = registry.attention_head_dim("fa4", "4.0.0b37", 72, "cuda", code)
    assert run_at is None and "4.0.0b36 verified" in why
    run_at, why = registry.attention_head_dim("fa4", "4.0.0b36", 64, "cuda", code)
    assert run_at is None and "not verified at head dim 64" in why


def test_attention_resolution_on_cpu_and_without_fa4(monkeypatch):
    from mugv.torch_backend.models import attention
    assert attention.resolve("auto", torch.device("cpu"), 72)[0] == "auto"
    assert attention.resolve("cudnn", torch.device("cpu"), 72, 80) == ("cudnn", 80, "cudnn: chosen")
    with pytest.raises(ValueError, match="'fa4' needs a CUDA device"):
        attention.resolve("fa4", torch.device("cpu"), 72)
    monkeypatch.setattr(attention, "fa4_version", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 9000")
    backend, pad, why = attention.resolve("auto", torch.device("cuda"), 72)
    assert backend == "auto" and pad is None and "flash-attn-4 is not installed" in why
    with pytest.raises(ValueError, match="head dim 72: flash-attn-4 is not installed"):
        attention.resolve("fa4", torch.device("cuda"), 72)


def test_fa4_runs_at_the_fastest_verified_head_dim_with_the_same_code(fake_gpu, monkeypatch):
    """With the dQ fix 72, 80 and 96 all pass: the record's timing picks the fastest; a record made
    under another fix (or none, as FA4 released) or another calling code does not switch it on."""
    import importlib.metadata

    from mugv.kernels import fa4_sm90, registry, verify
    from mugv.torch_backend.models import attention
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name, _v=importlib.metadata.version: "4.0.0b36" if name == "flash-attn-4" else _v(name))
    monkeypatch.delenv("MUGV_FA4_DQ_FIX", raising=False)
    results = {(72, p, kind): True for p in (72, 80, 96) for kind in ("self", "cross")}
    record = verify.device_record("Fake GPU 9000", {"files": {}, **_fa4_parity(results)}, None, {})
    code = attention.fa4_fingerprint("4.0.0b36")
    assert record["attention"]["fa4"]["fingerprint"] == code
    assert code.startswith(fa4_sm90.fingerprint("4.0.0b36") + "|call:") and not code.startswith("none")
    record["attention"]["fa4"]["ms"] = {"72": {"72": 9.5, "80": 8.7, "96": 9.2}}
    verify.write_record("Fake GPU 9000", record)
    registry.verified_devices.cache_clear()
    run_at, why = registry.attention_head_dim("fa4", "4.0.0b36", 72, "cuda", code)
    assert run_at == 80 and "zero-padded to 80 (fastest verified: 72: 9.50 ms, 80: 8.70 ms, 96: 9.20 ms)" in why
    monkeypatch.setenv("MUGV_FA4_DQ_FIX", "kernel32")
    run_at, why = registry.attention_head_dim("fa4", "4.0.0b36", 72, "cuda", attention.fa4_fingerprint("4.0.0b36"))
    assert run_at is None and "this process runs 'kernel32:" in why and "mugv verify-kernels" in why
    monkeypatch.setattr(attention, "fa4_attention", lambda q, k, v, key_mask=None, scale=None: q)
    monkeypatch.setenv("MUGV_FA4_DQ_FIX", fa4_sm90.DEFAULT_MODE)
    other = attention.fa4_fingerprint("4.0.0b36")     # the calling code edited since the record
    assert other != code and registry.attention_head_dim("fa4", "4.0.0b36", 72, "cuda", other)[0] is None


# Stand-ins with the constructors of flash-attn-4 4.0.0b36's SM90 backward kernel and postprocess
# (only the head-dim rounding they do), to test what the dQ fix changes where FA4 cannot import.
class _Postprocess:
    def __init__(self, dtype, head_dim, arch, tile_m=128, num_threads=256, AtomLayoutMdQ=1,
                 dQ_swapAB=False, use_2cta_instrs=False, cluster_size=1, hdim_multiple_of=32, accum_order=None):
        self.tile_hdim = -(-head_dim // hdim_multiple_of) * hdim_multiple_of
        self.tile_m = tile_m


class _KernelSm90:
    def __init__(self, dtype, head_dim, head_dim_v=None, qhead_per_kvhead=1, is_causal=False,
                 SdP_swapAB=False, dKV_swapAB=False, **kwargs):
        m = 64 if dKV_swapAB else 16
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        self.tile_hdim, self.tile_hdimv = -(-head_dim // m) * m, -(-head_dim_v // m) * m
        self.check_hdim_oob = head_dim != self.tile_hdim
        self.check_hdim_v_oob = head_dim_v != self.tile_hdimv
        self.SdP_swapAB, self.dKV_swapAB = SdP_swapAB, dKV_swapAB
        self.shuffle_LSE = self.shuffle_dPsum = SdP_swapAB and self.tile_hdim <= 64


def test_fa4_dq_fix_makes_the_reader_and_the_writer_of_dq_agree():
    from mugv.kernels import fa4_sm90

    def tiles(head_dim, arch=90, swapped=False):
        kernel = _KernelSm90(None, head_dim, dKV_swapAB=swapped)
        post = _Postprocess(None, head_dim, arch, 64, hdim_multiple_of=64 if swapped else 32)
        return kernel.tile_hdim, post.tile_hdim

    assert tiles(72) == (80, 96) and tiles(80) == (80, 96)   # the bug: written 80 wide, read 96 wide
    assert tiles(96) == (96, 96) and tiles(64) == (64, 64)   # why 64, 96, 128 were right
    post_cls, kernel_cls = type("P", (_Postprocess,), {}), type("K", (_KernelSm90,), {})
    fa4_sm90.patch_postprocess(post_cls)
    fa4_sm90.patch_postprocess(post_cls)                    # idempotent: wrapped once
    assert getattr(post_cls.__init__, "__wrapped__").__qualname__ == "_Postprocess.__init__"
    for d in (72, 80, 88, 96, 104, 128):
        assert post_cls(None, d, 90, 64).tile_hdim == _KernelSm90(None, d).tile_hdim
        assert post_cls(None, d, 100, 64).tile_hdim == _Postprocess(None, d, 100, 64).tile_hdim  # not SM90
    assert post_cls(None, 136, 90, 64, hdim_multiple_of=64).tile_hdim == 192   # swapped: untouched
    fa4_sm90.patch_kernel(kernel_cls)
    for d in (72, 80, 96, 104):
        k = kernel_cls(None, d, SdP_swapAB=True)
        assert k.tile_hdim == k.tile_hdimv == _Postprocess(None, d, 90).tile_hdim
        assert k.check_hdim_oob == (d % 32 != 0) and not k.shuffle_LSE
    assert kernel_cls(None, 136, dKV_swapAB=True).tile_hdim == 192


def test_fa4_dq_fix_mode_and_fingerprint(monkeypatch):
    from mugv.kernels import fa4_sm90
    monkeypatch.delenv("MUGV_FA4_DQ_FIX", raising=False)
    assert fa4_sm90.fix_for("4.0.0b36") == fa4_sm90.DEFAULT_MODE
    assert fa4_sm90.fingerprint("4.0.1") == "none"           # a version whose sources were not read
    prints = set()
    for mode in fa4_sm90.MODES:
        monkeypatch.setenv("MUGV_FA4_DQ_FIX", mode)
        prints.add(fa4_sm90.fingerprint("4.0.0b36"))
    assert len(prints) == 3 and "off" in prints
    monkeypatch.setenv("MUGV_FA4_DQ_FIX", "postprocess")
    with pytest.raises(ValueError, match="MUGV_FA4_DQ_FIX='postprocess': expected one of"):
        fa4_sm90.mode()


def test_compiled_layers_only_where_verified_with_this_torch_and_layer_code(fake_gpu):
    """KernelConfig.compile_layers="auto" compiles on a GPU whose record holds the compiled DiT's
    parity (test_dit_compiled.py) with this torch and layer code; never on the CPU, with
    recompute or context parallelism; "on"/"off" force it."""
    from mugv.core.recipe import KernelConfig
    from mugv.kernels import registry, verify
    from mugv.torch_backend.models.dit_layers import compile_status, compiled_fingerprint
    auto, cuda = KernelConfig(), torch.device("cuda")
    assert compile_status(auto, torch.device("cpu")) == (False, "not compiled: not a CUDA device")
    used, why = compile_status(auto, cuda)
    assert not used and "not verified on Fake GPU 9000" in why and "mugv verify-kernels" in why
    record = verify.device_record("Fake GPU 9000", {"files": {"test_dit_compiled": True}}, None, {})
    assert record["compiled_layers"]["fingerprint"] == compiled_fingerprint()
    assert compiled_fingerprint().startswith(f"torch {torch.__version__}|")
    verify.write_record("Fake GPU 9000", record)
    registry.verified_devices.cache_clear()
    used, why = compile_status(auto, cuda)
    assert used and why.startswith("compiled: verified on Fake GPU 9000")
    assert compile_status(auto, cuda, recompute=True)[0] is False
    assert compile_status(auto, cuda, context_parallel=2)[0] is False
    assert compile_status(auto, cuda, hooked=True)[0] is False
    assert compile_status(KernelConfig(compile_layers="off"), cuda) == (False, "compile_layers=off")
    assert compile_status(KernelConfig(compile_layers="on"), torch.device("cpu"))[0] is True
    # a later run where the file failed drops it; another torch or layer code is not this record
    failed = verify.device_record("Fake GPU 9000", {"files": {"test_dit_compiled": False}}, None, record)
    assert "compiled_layers" not in failed
    record["compiled_layers"]["fingerprint"] = "torch 2.0.0|0123456789abcdef"
    verify.write_record("Fake GPU 9000", record)
    registry.verified_devices.cache_clear()
    used, why = compile_status(auto, cuda)
    assert not used and "torch 2.0.0|0123456789abcdef" in why
    with pytest.raises(ValueError, match="compile_layers"):
        KernelConfig(compile_layers="yes")
