"""The checkpoint format: framework round trips, tensor-parallel resharding, atomic commits, bad input."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest
import torch

from mugv.checkpoints.format import Checkpoint, CheckpointError, CheckpointWriter, latest_checkpoint, list_checkpoints
from mugv.checkpoints.torch_io import from_numpy, load_torch, save_torch, to_numpy
from mugv.core.dit import dit_config, dit_schema
from mugv.core.validate import to_dict

CFG = dit_config("debug", depth=2, text_dim=64)   # debug width, two layers: the whole block structure
SCHEMA = dit_schema(CFG)


def random_params(schema, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p.name: torch.randn(p.shape, generator=g).to(dtype) for p in schema}


def bits(t: torch.Tensor) -> np.ndarray:
    a = to_numpy(t)
    return a.view(np.int16) if a.dtype == ml_dtypes.bfloat16 else a.view(np.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_to_jax_to_torch_bit_exact(tmp_path, dtype):
    import jax.numpy as jnp
    from mugv.checkpoints.jax_io import load_jax, save_jax

    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    schema = SCHEMA.with_dtype(name)
    params = random_params(schema, dtype)
    path = save_torch(tmp_path / "a", 7, {"model": (schema, params)}, config={"dit": to_dict(CFG)},
                      schema_hash=schema.hash())
    loaded = load_jax(path, schema)
    assert set(loaded) == set(params)
    for k, v in loaded.items():
        assert v.dtype == (jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32), k
        np.testing.assert_array_equal(np.asarray(v).view(bits(params[k]).dtype), bits(params[k]), err_msg=k)
    # and back: JAX writes, torch reads
    path2 = save_jax(tmp_path / "b", 8, {"model": (schema, loaded)}, schema_hash=schema.hash())
    again = load_torch(path2, schema)
    for k, v in again.items():
        assert v.dtype == dtype
        np.testing.assert_array_equal(bits(v), bits(params[k]), err_msg=k)
    assert Checkpoint(path2).manifest["schema_hash"] == schema.hash()


def test_reshard_on_read_tp1_tp4(tmp_path):
    """One process writes as if it were TP=2 ranks 0 and 1; readers at TP=1 and TP=4 get their slices."""
    full = random_params(SCHEMA)
    writer = CheckpointWriter(tmp_path, 1)
    writer.create({"model": SCHEMA}, tp_size=2)
    for rank in range(2):
        for spec in SCHEMA:
            if spec.tp_axis is None and rank:
                continue
            idx = spec.shard_index(rank, 2)
            writer.write("model", spec.name, to_numpy(full[spec.name][idx]), idx)
    path = writer.commit()
    whole = load_torch(path, SCHEMA)
    for k in full:
        assert torch.equal(whole[k], full[k]), k
    for rank in range(4):
        part = load_torch(path, SCHEMA, tp_rank=rank, tp_size=4)
        for spec in SCHEMA:
            assert torch.equal(part[spec.name], full[spec.name][spec.shard_index(rank, 4)]), (spec.name, rank)


_TP2_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from mugv.checkpoints.torch_io import save_torch
    from mugv.core.dit import dit_config, dit_schema
    root, store = sys.argv[1], sys.argv[2]
    rank = int(sys.argv[3])
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    schema = dit_schema(dit_config("debug", depth=2, text_dim=64))
    g = torch.Generator().manual_seed(0)
    full = {p.name: torch.randn(p.shape, generator=g) for p in schema}
    local = {p.name: full[p.name][p.shard_index(rank, 2)].clone() for p in schema}
    save_torch(root, 3, {"model": (schema, local)}, tp_rank=rank, tp_size=2, states={"rng": bytes([rank])})
    dist.destroy_process_group()
""")


def test_two_process_gloo_tp2_save(tmp_path):
    """A real 2-process gloo run writes a TP=2-sharded checkpoint concurrently."""
    script = tmp_path / "worker.py"
    script.write_text(_TP2_WORKER)
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck"), str(store), str(r)])
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    full = random_params(SCHEMA)
    path = latest_checkpoint(tmp_path / "ck")
    got = load_torch(path, SCHEMA)
    for k in full:
        assert torch.equal(got[k], full[k]), k
    quarter = load_torch(path, SCHEMA, tp_rank=3, tp_size=4)
    qkv = SCHEMA["layers.1.self_attn.qkv.weight"]
    assert torch.equal(quarter[qkv.name], full[qkv.name][qkv.shard_index(3, 4)])
    ck = Checkpoint(path)
    assert ck.read_state("rng", 0) == b"\x00" and ck.read_state("rng", 1) == b"\x01"


_KILL_WORKER = textwrap.dedent("""
    import sys, numpy as np
    from mugv.checkpoints.format import CheckpointWriter
    from mugv.core.schema import ParamSpec, Schema
    root = sys.argv[1]
    schema = Schema(tuple(ParamSpec(f"p{i}", (64, 256)) for i in range(24)))
    step = 0
    while True:
        step += 1
        w = CheckpointWriter(root, step)
        w.create({"model": schema})
        for i, p in enumerate(schema):
            w.write("model", p.name, np.full(p.shape, step * 1000 + i, np.float32))
        w.commit(meta={"step": step}, keep_last=2)
        print(step, flush=True)
""")


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7, 1.3])
def test_sigkill_during_save_keeps_latest_complete(tmp_path, delay):
    """A real child saving in a loop is SIGKILLed at several points; whatever is committed is whole."""
    script = tmp_path / "saver.py"
    script.write_text(_KILL_WORKER)
    root = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"   # one checkpoint committed before the kill
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = list_checkpoints(root)
    assert found, "the committed checkpoint disappeared"
    for step, path in found:
        ck = Checkpoint(path)
        assert ck.step == step
        for i in range(24):
            a = ck.read("model", f"p{i}")
            assert a.shape == (64, 256) and np.all(a == step * 1000 + i), (step, i)
    # the next save cleans a stale partial directory and commits normally
    step = found[-1][0] + 1
    w = CheckpointWriter(root, step)
    from mugv.core.schema import ParamSpec, Schema
    w.create({"model": Schema((ParamSpec("x", (3,)),))})
    w.write("model", "x", np.arange(3, dtype=np.float32))
    w.commit()
    assert latest_checkpoint(root).name == f"step_{step:09d}"
    assert not [p for p in root.iterdir() if p.name.startswith(".partial")]


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the parameter and both shapes/dtypes


@pytest.fixture()
def saved(tmp_path):
    params = random_params(SCHEMA)
    return save_torch(tmp_path, 1, {"model": (SCHEMA, params)}, config={"dit": to_dict(CFG)})


def test_missing_parameter(tmp_path):
    params = random_params(SCHEMA)
    name = "layers.1.mlp.fc2.weight"
    small = SCHEMA.select([n for n in SCHEMA.names if n != name])
    path = save_torch(tmp_path, 1, {"model": (small, {k: v for k, v in params.items() if k != name})})
    with pytest.raises(CheckpointError, match=rf"missing parameter {name} \(expected shape \(288, 1152\)\)"):
        load_torch(path, SCHEMA)


def test_extra_parameter(tmp_path):
    bigger = dit_schema(dit_config("debug", depth=3, text_dim=64))
    path = save_torch(tmp_path, 1, {"model": (bigger, random_params(bigger))})
    with pytest.raises(CheckpointError, match=r"unexpected parameter layers\.2\.self_attn\.qkv\.weight \(shape \(864, 288\)\)"):
        load_torch(path, SCHEMA)


def test_wrong_shape(tmp_path):
    other = dit_schema(dit_config("debug", depth=2, text_dim=32))
    path = save_torch(tmp_path, 1, {"model": (other, random_params(other))})
    with pytest.raises(CheckpointError, match=r"text_embedder\.fc1\.weight: checkpoint shape \(288, 32\), expected \(288, 64\)"):
        load_torch(path, SCHEMA)


def test_wrong_dtype(saved):
    with pytest.raises(CheckpointError, match=r"start_token: checkpoint dtype float32, expected bfloat16"):
        load_torch(saved, SCHEMA, expect_dtype="bfloat16")


def test_truncated_array_file(saved):
    chunk = saved / "arrays" / "model" / "layers.0.mlp.fc1.weight" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.fc1\.weight is unreadable"):
        load_torch(saved, SCHEMA)


def test_deleted_chunk_is_an_error_not_zeros(saved):
    import shutil
    shutil.rmtree(saved / "arrays" / "model" / "t_block.weight" / "c")
    with pytest.raises(CheckpointError, match=r"chunk c/0/0 of array model/t_block\.weight is missing"):
        load_torch(saved, SCHEMA)


def test_config_mismatch_names_fields(saved):
    other = to_dict(dit_config("debug", depth=2, text_dim=64, norm_eps=1e-5))
    with pytest.raises(CheckpointError, match=r"dit\.norm_eps: checkpoint 1e-06, now 1e-05"):
        Checkpoint(saved).check_config({"dit": other})


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no manifest.json"):
        Checkpoint(tmp_path)


def test_unwritable_root(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"{target / 'sub'} is not writable"):
        save_torch(target / "sub", 1, {"model": (SCHEMA, random_params(SCHEMA))})


def test_refuses_to_overwrite_committed(saved):
    with pytest.raises(CheckpointError, match="already exists"):
        save_torch(saved.parent, 1, {"model": (SCHEMA, random_params(SCHEMA))})


def test_all_zero_arrays_are_stored(tmp_path):
    """A zero-initialised bias must leave chunk files, else it is indistinguishable from damage."""
    params = {k: torch.zeros_like(v) for k, v in random_params(SCHEMA).items()}
    path = save_torch(tmp_path, 1, {"model": (SCHEMA, params)})
    got = load_torch(path, SCHEMA)
    assert all(torch.equal(got[k], params[k]) for k in params)


def test_bf16_numpy_round_trip_exact():
    t = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(from_numpy(to_numpy(t)), t)
    for scalar in (torch.tensor(4.0), torch.tensor(4.0).to(torch.bfloat16)):   # 0-d stays 0-d
        back = from_numpy(to_numpy(scalar))
        assert back.shape == () and torch.equal(back, scalar)
