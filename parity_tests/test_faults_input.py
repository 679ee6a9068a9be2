"""Bad input through the real `mugv` entry point (issue 26): exit status 2, ONE line naming the
option or file:line and what was expected, and no model loaded first. Before, bad manifests,
`--size 0`, impossible layouts, bf16 on a CPU and a missing T5 folder were tracebacks with exit
status 1 raised after the VAE had loaded. In-process `main([...])`: fast."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mugv.torch_backend.cli import main


@pytest.fixture()
def no_models(monkeypatch):
    """Every way a job loads a model raises: a check that runs late fails the test."""
    from mugv.torch_backend.data import text
    from mugv.torch_backend.models import dit, vae
    from mugv.torch_backend.training import preference, trainer

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for owner, name in ((vae.VideoVAE, "__init__"), (dit, "build_dit"), (trainer.Trainer, "__init__"),
                        (preference.PreferenceTrainer, "__init__"), (text.T5TextEncoder, "__init__"),
                        (text.EmbeddedTextEncoder, "__init__")):
        monkeypatch.setattr(owner, name, loaded)


@pytest.fixture()
def inputs(tmp_path):
    """A well-formed clips manifest (media are not read by the checks), a committed checkpoint
    (its manifest is what the checks read) and a folder that is not a checkpoint."""
    import numpy as np
    import torch

    from mugv.checkpoints.torch_io import save_torch
    from mugv.core.schema import ParamSpec, Schema
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"path": "a.mp4", "caption": "a red cube"}) + "\n")
    from mugv.core import validate
    from mugv.core.recipe import demo_dit
    schema = Schema((ParamSpec("w", (2, 3), "float32", None),))
    groups = {"model": (schema, {"w": torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3)).astype(
        np.float32))})}
    vae = save_torch(tmp_path / "vae", 1, groups, config={"vae": {"size": "tiny"}})
    dit = save_torch(tmp_path / "ckpt", 1, groups, config={"dit": validate.to_dict(demo_dit())})
    (tmp_path / "not_a_ckpt").mkdir()
    return {"good": str(good), "vae": str(vae), "ckpt": str(dit), "dir": str(tmp_path / "not_a_ckpt"),
            "tmp": tmp_path}


def _manifest(tmp_path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


BAD_MANIFESTS = {   # name: (content, what the line must say)
    "non_json": ('{"path": "a.mp4", "caption": "x"}\nnot json\n', "non_json.jsonl:2: not valid JSON"),
    "no_caption": ('{"path": "a.mp4"}\n', "no_caption.jsonl:1: field 'caption' is missing"),
    "fps_text": ('{"path": "a.mp4", "caption": "x", "fps": "fast"}\n',
                 "fps_text.jsonl:1: field 'fps' = 'fast': expected a number > 0"),
    "unknown_field": ('{"path": "a.mp4", "caption": "x", "captoin": "y"}\n',
                      "unknown_field.jsonl:1: unknown field(s) ['captoin']"),
    "empty": ("\n", "empty.jsonl: no rows"),
}


def _fails(argv, capsys, *names):
    """exit status 2 and one line on stderr holding every name."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mugv: error: "), err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# every kind of bad row through one command; every command that reads a manifest with one kind
@pytest.mark.parametrize("command, bad", [("cache", bad) for bad in sorted(BAD_MANIFESTS)] + [
    (command, "non_json") for command in ("train", "finetune", "evaluate", "eval-vae", "train-vae")])
def test_bad_manifest_names_file_line_before_any_model(command, bad, inputs, capsys, no_models):
    text, says = BAD_MANIFESTS[bad]
    m = _manifest(inputs["tmp"], f"{bad}.jsonl", text)
    option = {"eval-vae": "data", "train-vae": "data"}.get(command, "manifest")
    argv = {"cache": ["cache", "--manifest", m, "--vae_checkpoint", inputs["vae"]],
            "train": ["train", "--manifest", m, "--vae_checkpoint", inputs["vae"]],
            "finetune": ["finetune", "--base", inputs["ckpt"], "--manifest", m, "--vae_checkpoint", inputs["vae"],
                         "--vae_size", "tiny"],
            "evaluate": ["evaluate", "--manifest", m],
            "eval-vae": ["eval-vae", "--data", m],
            "train-vae": ["train-vae", "--data", m]}[command]
    _fails(argv, capsys, f"--{option}", says)


def test_preference_manifest_names_file_line_before_any_model(inputs, capsys, no_models):
    m = _manifest(inputs["tmp"], "dpo.jsonl", json.dumps({"caption": "x", "preferred": "a.npy"}) + "\n")
    _fails(["train-preference", "--manifest", m, "--reference", inputs["ckpt"]], capsys,
           "--manifest", "dpo.jsonl:1: field 'preferred' = 'a.npy': file not found")


def test_missing_manifest_names_the_option(inputs, capsys, no_models):
    missing = str(inputs["tmp"] / "nope.jsonl")
    _fails(["cache", "--manifest", missing, "--vae_checkpoint", inputs["vae"]], capsys, "--manifest", missing)
    _fails(["evaluate", "--manifest", missing], capsys, "--manifest", missing)


@pytest.mark.parametrize("argv, names", [
    (["train", "--size", "0"], ("PretrainConfig.size = 0", "positive multiple of 16")),
    (["cache", "--size", "-16"], ("PretrainConfig.size = -16",)),
    (["sample", "--size", "0"], ("--size = 0", "positive multiple of 16")),
    (["sample", "--size", "24"], ("--size = 24",)),
    (["sample", "--frames", "0"], ("--frames = 0",)),
    (["eval-vae", "--height", "0"], ("--height = 0", "positive multiple of 8")),
    (["eval-vae", "--size", "huge"], ("--size = 'huge'", "VAE size")),
])
def test_bad_sizes_name_the_option(argv, names, inputs, capsys, no_models):
    command = argv[0]
    rest = {"train": ["--manifest", inputs["good"], "--vae_checkpoint", inputs["vae"]],
            "cache": ["--manifest", inputs["good"], "--vae_checkpoint", inputs["vae"]],
            "sample": ["--checkpoint", inputs["ckpt"], "--vae_checkpoint", inputs["vae"], "--prompt", "x"],
            "eval-vae": ["--data", inputs["good"]]}[command]
    _fails(argv + rest, capsys, *names)


@pytest.mark.parametrize("world, tp, names", [
    ("1", "2", ("--parallel.*", "world size 1 is not a multiple of tensor_parallel 2")),
    ("4", "4", ("--parallel.*", "num_heads 2 is not divisible by tensor_parallel 4")),
    ("3", "2", ("--parallel.*", "world size 3")),
])
def test_impossible_layouts_name_the_sizes(world, tp, names, inputs, capsys, no_models, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    _fails(["train", "--manifest", inputs["good"], "--vae_checkpoint", inputs["vae"],
            "--parallel.tensor_parallel", tp], capsys, *names)


def _latent_pairs(tmp_path) -> str:
    """A well-formed DPO manifest of one latent pair."""
    import numpy as np
    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, np.zeros((8, 3, 4, 4), np.float32))
    return _manifest(tmp_path, "dpo.jsonl", json.dumps({"caption": "x", "preferred": "a.npy", "rejected": "b.npy"}) + "\n")


def test_preference_layout_is_checked_too(inputs, capsys, no_models, monkeypatch):
    m = _latent_pairs(inputs["tmp"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    _fails(["train-preference", "--manifest", m, "--reference", inputs["ckpt"], "--parallel.pipeline_parallel",
            "2"], capsys, "--parallel.*", "depth 3 layers do not divide into pipeline_parallel 2")


def test_bf16_on_a_cpu_names_the_option(inputs, capsys, no_models):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: bf16 is allowed here")
    _fails(["train", "--manifest", inputs["good"], "--vae_checkpoint", inputs["vae"], "--train.precision", "bf16"],
           capsys, "--train.precision = 'bf16'", "fp32")
    _fails(["train-preference", "--manifest", _latent_pairs(inputs["tmp"]), "--reference", inputs["ckpt"],
            "--reference_precision", "bf16"], capsys, "--reference_precision = 'bf16'")


def test_missing_t5_folder_names_the_option(inputs, capsys, no_models):
    missing = str(inputs["tmp"] / "t5")
    _fails(["train", "--manifest", inputs["good"], "--vae_checkpoint", inputs["vae"], "--text_encoder", missing],
           capsys, f"--text_encoder = '{missing}'", "T5")
    (inputs["tmp"] / "t5").mkdir()
    _fails(["sample", "--checkpoint", inputs["ckpt"], "--vae_checkpoint", inputs["vae"], "--prompt", "x",
            "--text_encoder", missing], capsys, "--text_encoder", "no config.json")


def test_checkpoint_folders_are_checked_before_loading(inputs, capsys, no_models):
    """A folder that holds no committed checkpoint, a run folder where a step is needed, an edited
    manifest, an official-weights folder without a DiT file, one model's checkpoint for the other."""
    _fails(["cache", "--manifest", inputs["good"], "--vae_checkpoint", inputs["dir"]], capsys,
           "--vae_checkpoint", "not a committed mugv checkpoint")
    root = str(inputs["tmp"] / "ckpt")
    assert Path(inputs["ckpt"]).parent == Path(root)
    _fails(["train", "--manifest", inputs["good"], "--vae_checkpoint", str(inputs["tmp"] / "vae")], capsys,
           "--vae_checkpoint", "a run folder; give one of its step_* checkpoints")
    _fails(["cache", "--manifest", inputs["good"], "--vae_checkpoint", inputs["ckpt"]], capsys,   # a DiT for a VAE
           "--vae_checkpoint", "holds no VAE")
    manifest = Path(inputs["ckpt"]) / "manifest.json"
    m = json.loads(manifest.read_text())
    m["step"] = 2
    manifest.write_text(json.dumps(m))
    _fails(["sample", "--checkpoint", root, "--vae_random", "--prompt", "x"], capsys,
           "--checkpoint", "checksum mismatch")
    _fails(["sample", "--official", inputs["dir"], "--vae_random", "--prompt", "x"], capsys,
           "--official", "no *dit*.pt or *dit*.safetensors")
    _fails(["sample", "--checkpoint", inputs["vae"], "--vae_random", "--prompt", "x"], capsys,   # a VAE for a DiT
           "--checkpoint", "holds no DiT (its config has sections ['vae']")


def _curriculum(tmp_path, rows: list[str]) -> str:
    """A two-stage recipe (images, then 9-frame clips; one step each) over clips named in `rows`:
    good (12 frames), short (3 frames: images only) and empty (0 bytes: neither stage)."""
    from mugv.parity_tests.helpers import random_clips, tiny_vae_checkpoint
    random_clips(tmp_path / "clips", {"good1.mp4": 12, "good2.mp4": 12, "short.mp4": 3})
    (tmp_path / "clips" / "empty.mp4").write_bytes(b"")
    manifest = _manifest(tmp_path, "m.jsonl", "".join(
        json.dumps({"path": f"clips/{n}.mp4", "caption": f"a red cube, {n}"}) + "\n" for n in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"manifest: {manifest}\nvae_checkpoint: {tiny_vae_checkpoint(tmp_path / 'vae')}\n"
                      f"out: {tmp_path / 'out'}\nstages:\n"
                      "  - {name: images, frames: 1, steps: 1, batch_size: 2}\n"
                      "  - {name: clips, frames: 9, steps: 1, batch_size: 2}\n")
    return str(recipe)


def test_train_names_each_skipped_clip_once_and_sums_up_each_stage(tmp_path):
    """`mugv train` named each bad or short clip three times per stage (the stage's index was built
    three times) and gave no summary: now each once per run, and one line per stage."""
    import sys

    from mugv.parity_tests.helpers import run_child
    recipe = _curriculum(tmp_path, ["good1", "short", "empty", "good2"])
    out = run_child([sys.executable, "-m", "mugv.torch_backend.cli", "train", "--config", recipe])
    empty, short = str(tmp_path / "clips" / "empty.mp4"), str(tmp_path / "clips" / "short.mp4")
    assert out.count(empty) == 1 and out.count(short) == 1, out
    assert f"[mugv] skipped {empty} (line 3): empty file" in out
    assert f"[mugv] skipped {short} (line 2): too short: 3 frames" in out
    assert "[mugv] stage images: 3 decoded, 1 skipped (empty file 1)" in out
    assert "[mugv] stage clips: 2 decoded, 2 skipped (empty file 1, too short 1)" in out
    assert (tmp_path / "out" / "stages" / "clips" / "metrics.jsonl").is_file()   # and it trained


def test_a_stage_no_clip_can_fill_is_an_input_error(tmp_path, capsys, request):
    """It said 'cache incomplete; run build_cache' after the VAE had loaded."""
    recipe = _curriculum(tmp_path, ["short", "empty"])
    request.getfixturevalue("no_models")   # from here on (the recipe's VAE checkpoint is written)
    _fails(["train", "--config", recipe], capsys, "stage 'clips': no clip of --manifest",
           "9 frame(s) of 32x32 px", "skipped: empty file 1, too short 1")
