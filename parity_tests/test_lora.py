"""LoRA on MUG-DiT (core/lora.py, torch_backend/models/lora.py), on the tiny DiT with random nonzero weights.

In this process (TP=1):
- B = 0 leaves outputs and input gradients bit-identical to the frozen base model;
- merged == unmerged outputs (fp32 "dit" row); unmerge restores the base weights; the torch merge
  equals core's numpy `merge_arrays`; the merged official export reads back to the merged weights;
- full activation recomputation changes neither outputs nor adapter gradients;
- bf16 base weights stay within bf16 error of the fp32 model; config errors name the field.
One 2-process gloo launch (this file is also the worker) runs:
- the adapted DiT at TP=2 and at TP=2 with sequence parallelism: outputs and adapter gradients
  (shards gathered, partial gradients summed over TP) equal the TP=1 run of this process; the
  TP=2 adapters saved alone load at TP=1 and give the TP=2 outputs (each judged against a float64
  run of the TP=1 model, tolerances.assert_sharded_vs_float64);
- the Trainer at TP=2 with `lora_model_hook` for 3 steps on SyntheticLatents: only the adapters
  require gradients, have main gradients and sit in the optimizer; the checkpoint's optimizer and
  EMA groups hold exactly the adapter arrays and its base weights are the loaded ones, unchanged.
One child process runs torch_backend/jobs/finetune.py from official-layout weights on product clips
through the cache (LoRA with a bf16 base, full, and an interrupted + resumed LoRA run).
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mugv.parity_tests.fixtures import megatron_world  # noqa: F401  (a fixture)
from mugv.parity_tests.lora_worker import _lora_cfg, adapted_model, child_env, random_adapters, run_model

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = pathlib.Path(__file__).with_name("lora_worker.py")


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_tp2")
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode:
        raise AssertionError(f"2-process gloo run failed (rc {proc.returncode}):\n{proc.stderr[-5000:]}")
    return out


# ---------------------------------------------------------------------------------------------
# Core: config and schema (no framework)


def test_config_errors_name_the_field():
    from mugv.core.dit import dit_config
    from mugv.core.lora import LoRAConfig, lora_targets
    from mugv.core.validate import ConfigError
    for kw, field in [(dict(rank=0), "rank"), (dict(alpha=-1.0), "alpha"), (dict(targets=()), "targets"),
                      (dict(dropout=1.0), "dropout"), (dict(base_dtype="float16"), "base_dtype")]:
        with pytest.raises(ConfigError, match=f"LoRAConfig.{field}"):
            LoRAConfig(**kw)
    with pytest.raises(ConfigError, match="mlp.fc3"):
        lora_targets(dit_config("tiny"), LoRAConfig(targets=("mlp.fc3",)))


def test_schema_shapes_and_tp_axes():
    from mugv.core.dit import dit_config
    from mugv.core.lora import LoRAConfig, lora_schema
    cfg = dit_config("10B")
    s = lora_schema(cfg, LoRAConfig()).as_dict()
    assert len(s) == 56 * 7 * 2
    h = cfg.hidden_size
    assert (s["layers.3.self_attn.qkv.lora_a.weight"].shape, s["layers.3.self_attn.qkv.lora_a.weight"].tp_axis) == ((64, h), None)
    assert (s["layers.3.self_attn.qkv.lora_b.weight"].shape, s["layers.3.self_attn.qkv.lora_b.weight"].tp_axis) == ((3 * h, 64), 0)
    assert (s["layers.3.mlp.fc2.lora_a.weight"].shape, s["layers.3.mlp.fc2.lora_a.weight"].tp_axis) == ((64, 4 * h), 1)
    assert (s["layers.3.mlp.fc2.lora_b.weight"].shape, s["layers.3.mlp.fc2.lora_b.weight"].tp_axis) == ((h, 64), None)
    assert all(p.init.kind == "zeros" for n, p in s.items() if "lora_b" in n)
    # rank 64 on the 10B model: 285M trainable parameters (2.8% of 10B)
    assert sum(p.numel for p in s.values()) == 56 * 64 * (h + 3 * h + h + h + h + h + h + 2 * h + h + 4 * h + 4 * h + h + h + h)
    # glob patterns and replicated linears
    sel = lora_schema(dit_config("tiny"), LoRAConfig(rank=2, targets=("layers.1.mlp.*", "t_block")))
    assert sel.names == ["t_block.lora_a.weight", "t_block.lora_b.weight",  # schema order
                         "layers.1.mlp.fc1.lora_a.weight", "layers.1.mlp.fc1.lora_b.weight",
                         "layers.1.mlp.fc2.lora_a.weight", "layers.1.mlp.fc2.lora_b.weight"]
    assert sel["t_block.lora_b.weight"].tp_axis is None


# ---------------------------------------------------------------------------------------------
# TP=1, in this process


@pytest.fixture(scope="module")
def case():
    from mugv.parity_tests.test_dit import CFG, loss_weights, make_inputs, random_params
    lora = _lora_cfg()
    return dict(cfg=CFG, lora=lora, params=random_params(CFG), adapters=random_adapters(CFG, lora),
                inputs=make_inputs("i2v"), weights=loss_weights())


def test_b_zero_is_bit_identical_to_frozen_base(megatron_world, case):
    """B = 0: outputs and input gradients bit-identical to the base model with frozen weights.
    (Against the base with trainable weights they differ by an fp32 rounding: Megatron runs frozen
    weights through LinearWithFrozenWeight, matmul then bias add, instead of a fused addmm.)"""
    base = adapted_model(case["params"])
    for p in base.parameters():
        p.requires_grad_(False)
    out0, g0 = run_model(base, case["inputs"], case["weights"])
    model = adapted_model(case["params"], case["lora"])
    out1, g1 = run_model(model, case["inputs"], case["weights"])
    assert np.array_equal(out0.numpy(), out1.numpy())
    assert np.array_equal(g0["input.x"].numpy(), g1["input.x"].numpy())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n in g1 if n != "input.x") and len(trainable) == 2 * 7 * 2
    assert all("lora_" in n for n in trainable)
    # A's gradient is zero while B = 0 (it flows through B), B's is not
    assert all(np.abs(g1[n].numpy()).max() == 0 for n in trainable if "lora_a" in n)
    assert all(np.abs(g1[n].numpy()).max() > 0 for n in trainable if "lora_b" in n)


def test_merge_unmerge(megatron_world, case):
    from mugv.core.lora import merge_arrays
    from mugv.parity_tests.tolerances import assert_close
    from mugv.torch_backend.models.lora import merge_lora, unmerge_lora
    model = adapted_model(case["params"], case["lora"], case["adapters"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, _ = run_model(model, case["inputs"], case["weights"])
    base = adapted_model(case["params"])
    out_base, _ = run_model(base, case["inputs"], case["weights"])
    # the adapters really change the output (else merge tests prove nothing)
    assert np.abs(out.numpy() - out_base.numpy()).max() > 1e-2 * np.abs(out_base.numpy()).max()
    assert merge_lora(model) == 14
    merged_out, _ = run_model(model, case["inputs"], case["weights"])
    assert_close(merged_out, out, "dit", "float32", name="merged vs unmerged output")
    expected = merge_arrays(case["params"], case["adapters"], case["cfg"], case["lora"])
    for name, arr in expected.items():
        assert_close(dict(model.named_parameters())[name], arr, "*", "float32", name=f"merged {name}")
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        assert_close(p, before[n], "*", "float32", name=f"unmerged {n}")
    again, _ = run_model(model, case["inputs"], case["weights"])
    assert_close(again, out, "dit", "float32", name="output after unmerge")


def test_recompute_full_same_outputs_and_adapter_grads(megatron_world, case):
    from mugv.parity_tests.tolerances import assert_close
    ref = run_model(adapted_model(case["params"], case["lora"], case["adapters"]), case["inputs"], case["weights"])
    rec = run_model(adapted_model(case["params"], case["lora"], case["adapters"], recompute_granularity="full",
                                  recompute_method="uniform", recompute_num_layers=1),
                    case["inputs"], case["weights"])
    assert_close(rec[0], ref[0], "exact", "float32", name="recompute output")
    assert ref[1].keys() == rec[1].keys() and len(ref[1]) == 29
    for n in ref[1]:
        assert_close(rec[1][n], ref[1][n], "exact", "float32", name=f"recompute grad {n}")


def test_bf16_base_weights(megatron_world, case):
    """Base weights held in bf16 (half the frozen memory): adapters stay fp32 and train; the output
    is within bf16 error of the fp32 model."""
    import torch
    from mugv.parity_tests.tolerances import assert_close
    ref, _ = run_model(adapted_model(case["params"], case["lora"], case["adapters"]), case["inputs"], case["weights"])
    model = adapted_model(case["params"], _lora_cfg(base_dtype="bfloat16"), case["adapters"])
    assert model.layers["0"].mlp.fc1.weight.dtype == torch.bfloat16
    assert model.layers["0"].mlp.fc1.lora_a.weight.dtype == torch.float32
    out, grads = run_model(model, case["inputs"], case["weights"])
    assert_close(out, ref, "*", "bfloat16", name="bf16-base output")
    assert len(grads) == 29 and all(torch.isfinite(g).all() for g in grads.values())


def test_merged_official_export_round_trip(case, tmp_path):
    """Adapters saved alone -> merged into the base -> official dit.pt -> imported back equals the
    canonical merge (the fused-qkv row reorder commutes with the merge)."""
    from mugv.checkpoints.format import CheckpointWriter
    from mugv.checkpoints.official_dit import import_official, load_official_file
    from mugv.core.lora import lora_schema, merge_arrays
    from mugv.core.validate import to_dict
    from mugv.torch_backend.models.lora import export_merged_official, read_adapters
    cfg, lora = case["cfg"], case["lora"]
    schema = lora_schema(cfg, lora)
    w = CheckpointWriter(tmp_path / "ad", 0)
    w.create({"lora": schema})
    for n, a in case["adapters"].items():
        w.write("lora", n, a)
    w.commit(config={"dit": to_dict(cfg), "lora": to_dict(lora)})
    got_lora, got = read_adapters(tmp_path / "ad")
    assert got_lora == lora and all(np.array_equal(got[n], case["adapters"][n]) for n in got)
    path = export_merged_official(case["params"], cfg, tmp_path / "ad", tmp_path / "dit.pt")
    back = import_official(load_official_file(str(path)), cfg)
    expected = merge_arrays(case["params"], case["adapters"], cfg, lora)
    assert back.keys() == expected.keys()
    for n in expected:
        assert np.array_equal(back[n], expected[n]), n
    unmerged = merge_arrays(expected, case["adapters"], cfg, lora, sign=-1.0)
    from mugv.parity_tests.tolerances import assert_close
    for n in case["params"]:
        assert_close(unmerged[n], case["params"][n], "*", "float32", name=n)


# ---------------------------------------------------------------------------------------------
# TP=2 (2-process gloo) vs TP=1


@pytest.fixture(scope="module")
def tp1_reference(megatron_world, case):
    """The adapted DiT in this process (TP=1), in fp32 and in float64 (the same fp32 parameters,
    adapters and inputs): output and adapter / input gradients."""
    as64 = lambda a: a.astype(np.float64) if a.dtype == np.float32 else a  # noqa: E731
    runs = {}
    for suffix, cast in (("", lambda a: a), ("64", as64)):
        model = adapted_model(case["params"], case["lora"], case["adapters"])
        if suffix:
            model.double()
        out, grads = run_model(model, {k: cast(v) for k, v in case["inputs"].items()}, cast(case["weights"]))
        runs[f"out{suffix}"], runs[f"grads{suffix}"] = out.numpy(), {n: g.numpy() for n, g in grads.items()}
    return runs


@pytest.mark.parametrize("tag", ["tp2", "tp2sp"])
def test_tp2_equals_tp1(worker_out, tp1_reference, tag):
    """TP=2 output and gathered adapter gradients against the TP=1 run, both against float64
    (tolerances.assert_sharded_vs_float64, docs/tolerances.md)."""
    from mugv.parity_tests.tolerances import assert_sharded_vs_float64
    res = dict(np.load(worker_out / "lora_results.npz"))
    ref = tp1_reference
    assert_sharded_vs_float64(res[f"{tag}.out"], ref["out"], ref["out64"], name=f"LoRA {tag} output")
    names = [n for n in ref["grads"] if n != "input.x"]
    assert len(names) == 28
    for n in names:
        assert_sharded_vs_float64(res[f"{tag}.{n}"], ref["grads"][n], ref["grads64"][n], name=f"LoRA {tag} grad {n}")


def test_adapter_saved_at_tp2_loads_at_tp1(worker_out, megatron_world, case, tp1_reference):
    """The TP=2 adapters saved alone, loaded at TP=1 into a plain base model: the same arrays, and
    the TP=2 output against this TP=1 output, both against the float64 run."""
    from mugv.checkpoints.format import Checkpoint, latest_checkpoint
    from mugv.parity_tests.tolerances import assert_sharded_vs_float64
    from mugv.torch_backend.models.lora import load_adapters
    ckpt = Checkpoint(latest_checkpoint(worker_out / "adapters_tp2"))
    assert ckpt.groups() == ["lora"] and len(ckpt.names("lora")) == 28 and ckpt.step == 5
    for n in ckpt.names("lora"):  # the TP=2 slices assembled into the global arrays
        assert np.array_equal(ckpt.read("lora", n), case["adapters"][n]), n
    model = adapted_model(case["params"])  # a plain base model: load_adapters attaches them
    assert load_adapters(model, case["cfg"], worker_out / "adapters_tp2") == case["lora"]
    out, _ = run_model(model, case["inputs"], case["weights"])
    tp2 = np.load(worker_out / "lora_results.npz")["tp2.out"]
    assert_sharded_vs_float64(tp2, out.numpy(), tp1_reference["out64"],
                              name="LoRA TP=2 output vs TP=1 with the TP=2 adapters")


def test_trainer_updates_and_stores_only_adapters(worker_out, case):
    from mugv.checkpoints.format import Checkpoint, latest_checkpoint
    from mugv.core.dit import dit_schema
    from mugv.core.lora import lora_schema
    cfg, lora = case["cfg"], case["lora"]
    adapters = sorted(lora_schema(cfg, lora).names)
    numel = lora_schema(cfg, lora).numel
    for rank in (0, 1):
        counts = json.loads((worker_out / "trainer" / f"counts_rank{rank}.json").read_text())
        assert counts["requires_grad"] == adapters
        assert counts["main_grad"] == adapters
        assert counts["optimizer_tensors"] == len(adapters) == 28
        # TP=2 local shards: A of column and B of row layers are replicated, the others halved
        s = lora_schema(cfg, lora)
        local = sum(p.numel // (2 if p.tp_axis is not None else 1) for p in s)
        assert counts["optimizer_numel"] == local < numel
    losses = json.loads((worker_out / "trainer" / "counts_rank0.json").read_text())["losses"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    ck = Checkpoint(latest_checkpoint(worker_out / "trainer" / "checkpoints"))
    assert ck.step == 3
    for group in ("optimizer.exp_avg", "optimizer.exp_avg_sq", "ema"):
        assert sorted(ck.names(group)) == adapters, group
        assert all(np.abs(ck.read(group, n)).max() > 0 for n in adapters if "lora_b" in n), group
    assert sorted(ck.names("model")) == sorted(dit_schema(cfg).names + adapters)
    for n in dit_schema(cfg).names:  # frozen: exactly the loaded base weights
        assert np.array_equal(ck.read("model", n), case["params"][n]), n
    # the adapters moved: B left zero after 3 steps of lr 1e-2
    assert all(np.abs(ck.read("model", n)).max() > 0 for n in adapters if "lora_b" in n)


# ---------------------------------------------------------------------------------------------
# torch_backend/jobs/finetune.py end to end: official weights + product clips through the cache


def test_finetune_from_official_weights_lora_and_full(goldens_dir, tmp_path):
    """From an official-layout weights file (the golden tiny DiT) on 4 product clips through the
    cache: LoRA (base in bf16) trains only adapters (its checkpoints hold them alone, the base is
    reloaded from its file; adapters also written alone), full fine-tuning trains everything; a
    LoRA run stopped after 2 steps and restarted ends bit-identical to the uninterrupted 3-step
    run (adapters, EMA, Adam, losses); restarting it on another base file fails, naming both."""
    from safetensors.numpy import load_file, save_file

    from mugv.checkpoints.format import Checkpoint, latest_checkpoint
    from mugv.checkpoints.official_dit import config_from_official, import_official
    from mugv.core.dit import dit_schema
    from mugv.core.lora import lora_schema
    state = {k[len("param."):]: a for k, a in load_file(str(goldens_dir / "dit_tiny_seed0.safetensors")).items()
             if k.startswith("param.")}
    save_file(state, str(tmp_path / "dit.safetensors"))
    proc = subprocess.run([sys.executable, str(WORKER), "finetune", str(tmp_path), str(tmp_path / "dit.safetensors")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    cfg = config_from_official(state)
    base = import_official(state, cfg)
    reports = json.loads((tmp_path / "reports.json").read_text())
    adapters = lora_schema(cfg, _lora_cfg()).names
    assert reports["lora"]["trainable_params"] == lora_schema(cfg, _lora_cfg()).numel
    assert reports["full"]["trainable_params"] == dit_schema(cfg).numel
    lora_ck = Checkpoint(latest_checkpoint(tmp_path / "lora" / "checkpoints"))
    assert sorted(lora_ck.names("optimizer.exp_avg")) == sorted(adapters)
    # the frozen base stays out of LoRA checkpoints (the hook reloads it from the base file, whose
    # path they record); resuming on another base fails, naming both
    assert sorted(lora_ck.names("model")) == sorted(adapters)
    official = str((tmp_path / "dit.safetensors").resolve())
    assert lora_ck.manifest["meta"]["frozen_from"] == official
    error = reports["other_base_error"]
    assert error and official in error and "other_base.safetensors" in error, error
    ad = Checkpoint(latest_checkpoint(tmp_path / "lora" / "adapters"))
    assert ad.groups() == ["lora"] and sorted(ad.names("lora")) == sorted(adapters)
    for n in adapters:
        assert np.array_equal(ad.read("lora", n), lora_ck.read("model", n)), n
    assert all(np.abs(ad.read("lora", n)).max() > 0 for n in adapters if "lora_b" in n)
    full_ck = Checkpoint(latest_checkpoint(tmp_path / "full" / "checkpoints"))
    assert sorted(full_ck.names("optimizer.exp_avg")) == sorted(dit_schema(cfg).names)
    moved = [n for n in dit_schema(cfg).names if not np.array_equal(full_ck.read("model", n), base[n])]
    assert len(moved) > 0.9 * len(dit_schema(cfg).names), len(moved)
    for mode in ("lora", "full"):
        rows = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    models = np.load(tmp_path / "sampling_models.npz")  # finetuned_model before / after
    from mugv.parity_tests.tolerances import assert_close
    assert_close(models["after"], models["after_unmerged"], "*", "bfloat16", name="merged vs unmerged (bf16 base)")
    assert np.abs(models["after"] - models["before"]).max() > 1e-3 * np.abs(models["before"]).max()
    # exact resume: base reloaded by the hook, then adapters, Adam, EMA, RNG and data position
    # from the checkpoint give the uninterrupted run bit for bit
    resumed = Checkpoint(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert resumed.step == 3 and (tmp_path / "resumed" / "checkpoints" / "step_000000002").is_dir()
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("resumed") == losses("lora")
    for group in resumed.groups():
        for n in resumed.names(group):
            assert np.array_equal(resumed.read(group, n), lora_ck.read(group, n)), (group, n)


def test_load_official_vae_matches_golden(goldens_dir, tmp_path):
    """`load_official_vae` (the encoder the fine-tuning cache uses) reproduces the official
    posterior of the golden tiny VAE."""
    import torch
    from safetensors.numpy import load_file, save_file

    from mugv.parity_tests.tolerances import assert_close
    from mugv.torch_backend.jobs.loaders import load_official_vae
    golden = load_file(str(goldens_dir / "vae_tiny_seed0.safetensors"))
    save_file({k[len("param."):]: a for k, a in golden.items() if k.startswith("param.")},
              str(tmp_path / "vae.safetensors"))
    vae = load_official_vae(tmp_path / "vae.safetensors", size="golden")
    with torch.no_grad():
        mean, _ = vae.posterior(torch.from_numpy(golden["input.t17.video"]))
    assert_close(mean, golden["output.t17.posterior_mean"], "vae", "float32", name="posterior mean")

