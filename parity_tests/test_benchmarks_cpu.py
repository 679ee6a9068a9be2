"""The GPU benchmark scripts (benchmarks/vae_throughput.py, lora_step.py, multi_gpu.py) at tiny
sizes on the CPU: each runs end to end as a user would launch it, writes its JSON, records no
error, and the numbers it reports are consistent (shapes, counts, parity within tolerance).

The GPU numbers themselves come from `bash benchmarks/gpu_suite.sh` on the device machine.
multi_gpu.py needs a 2-process gloo launch (~45-100 s on the shared 2-core box): marked slow.
"""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _env() -> dict:
    """A user's launch: no torch.distributed variables of this pytest process (child_env drops them)."""
    from mugv.parity_tests.helpers import child_env
    return dict(child_env(), CUDA_VISIBLE_DEVICES="")


def _run(args: list[str], timeout: int = 300) -> None:
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")


def _no_errors(d, path="") -> list[str]:
    """Every "error" entry anywhere in a result tree (a benchmark records failures and goes on)."""
    found = []
    if isinstance(d, dict):
        for k, v in d.items():
            if k == "error":
                found.append(f"{path}: {str(v)[:300]}")
            else:
                found += _no_errors(v, f"{path}.{k}")
    return found


def test_vae_throughput_tiny(tmp_path):
    _run([sys.executable, "benchmarks/vae_throughput.py", "--tiny", "--repeats", "1", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "vae_throughput.json").read_text())
    assert not _no_errors(r), _no_errors(r)
    for k in ("throughput_256p", "throughput_720p"):
        assert r[k]["encode_fps"] > 0 and r[k]["decode_fps"] > 0
    # the chunked encode/decode of the long clip (2 encode chunks, 3 decode chunks) returns every frame
    long = r["memory_720p_20s"]
    assert long["output"] == [1, 3, long["frames"], long["height"], long["width"]]
    assert long["latent"][0] == math.ceil(long["frames"] / 8)
    # bf16 vs fp32 of the same weights: finite, nonzero (the two really ran in different dtypes)
    # and far from O(1) (a broken cast would be)
    for part in ("posterior_mean", "decode"):
        e = r["bf16_vs_fp32"][part]
        assert 0 < e["l2_rel"] < 0.3, (part, e)
    # the cache job's encode and the sample job's decode ran (fp32, reference GroupNorm on the CPU)
    assert r["paths_256p"]["fp32_reference"]["encode_fps"] > 0 and r["paths_256p"]["fp32_reference"]["decode_fps"] > 0


def test_vae_cache_job_benchmark_tiny(tmp_path):
    """`--cache-job` (the real `mugv cache` stage) in one process: every clip cached, clips/s > 0."""
    _run([sys.executable, "benchmarks/vae_throughput.py", "--cache-job", "--tiny", "--cache-clips", "4",
          "--out", str(tmp_path)])
    r = json.loads((tmp_path / "vae_cache_job_world1.json").read_text())
    assert r["world_size"] == 1 and r["clips"] == 4 and r["clips_per_s"] > 0, r
    from mugv.torch_backend.data.cache import cache_complete
    (folder,) = (tmp_path / "cache_job_world1" / "run" / "cache").iterdir()
    assert cache_complete(folder)


def test_lora_step_tiny(tmp_path):
    _run([sys.executable, "benchmarks/lora_step.py", "--tiny", "--inline", "--recompute", "full",
          "--warmup", "0", "--steps", "2", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "lora_step.json").read_text())
    assert not _no_errors(r), _no_errors(r)
    c, ar = r["cases"]["full"], r["arithmetic"]
    assert c["skipped"] == 0 and all(math.isfinite(x) for x in c["losses"])
    assert c["trainable_params"] == ar["lora_params"]           # only the adapters train
    assert c["frozen_params"] == ar["base_params"]
    assert c["step_time_s"] > 0 and c["tokens_per_s"] > 0
    # LoRA's memory arithmetic is below full fine-tuning's for every policy
    for rc in ("full", "selective", "none"):
        assert ar["lora_gib"][rc]["total"] < ar["full_finetune_gib"][rc]["total"]


@pytest.mark.slow  # a 2-process gloo launch: 45-100 s on the shared 2-core machine
def test_multi_gpu_cpu(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "benchmarks/multi_gpu.py",
          "--cpu", "--out", str(tmp_path)], timeout=600)
    r = json.loads((tmp_path / "multi_gpu.json").read_text())
    assert not _no_errors(r), _no_errors(r)
    layouts = r["parity"]["layouts"]
    for tag in ("tp2_sp", "pp2", "dp2_distopt"):
        assert layouts[tag]["pass"], (tag, layouts[tag])
    assert layouts["cp2"].get("pass") or "not available" in layouts["cp2"].get("skipped", ""), layouts["cp2"]
    assert r["reshard"]["pass"], r["reshard"]
    assert r["scaling"]["world"] == 2 and r["scaling"]["tokens_per_s_per_gpu"] > 0
    assert all(math.isfinite(x) for x in r["scaling"]["losses"])
