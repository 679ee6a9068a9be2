"""The `mugv` command line: help of every subcommand, bad input failing before any work and naming
the key, recipe files + dotted overrides, and sampling from official-layout weights (the goldens'
tiny DiT and VAE), equal to sampling from the same weights converted to a mugv checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mugv.torch_backend.cli import commands, main

SUBCOMMANDS = ("generate-data", "train-vae", "eval-vae", "cache", "train", "sample", "evaluate",
               "convert-official", "make-preferences", "train-preference", "finetune", "curate", "verify-kernels", "demo")


@pytest.fixture(scope="module")
def parser():
    return commands.build_parser()


def _subparsers(parser):
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_of_every_subcommand(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "mugv" in text and "--config" in text


def test_every_subcommand_dispatches_to_a_job_or_experiment(parser):
    """cli/commands.py::RUNNERS names, for every subcommand, a function of torch_backend/jobs/ (or
    experiments/ for the demo): the CLI parses and dispatches only."""
    import importlib
    assert set(commands.RUNNERS) == set(_subparsers(parser)) == set(SUBCOMMANDS)
    for name, (module, function) in commands.RUNNERS.items():
        assert module.split(".")[0] in ("jobs", "experiments"), name
        assert callable(getattr(importlib.import_module(f"mugv.torch_backend.{module}"), function)), name


def test_finetune_recipe_parses_into_its_configs(tmp_path, capsys):
    for name in ("dit.pt", "vae.pt", "clips.jsonl"):
        (tmp_path / name).write_bytes(b"")
    paths = ["--base", str(tmp_path / "dit.pt"), "--manifest", str(tmp_path / "clips.jsonl")]
    command, cfg = commands.parse(["finetune", *paths, "--vae_official", str(tmp_path / "vae.pt"),
                                   "--finetune.mode", "full", "--train.steps", "7", "--finetune.buckets",
                                   '[{"height": 32, "width": 48, "frames": 17, "batch_size": 4, "fps": 16}]'])
    assert command == "finetune" and cfg.finetune.mode == "full" and cfg.train.steps == 7
    assert [(b.height, b.width, b.frames, b.batch_size) for b in cfg.finetune.buckets] == [(32, 48, 17, 4)]
    assert main(["finetune", *paths]) == 2     # no VAE: fails before any work, naming the field
    assert "FinetuneRunConfig.vae_official" in capsys.readouterr().err


def test_every_option_has_help(parser):
    missing = []
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if action.dest in ("help", "print_config") or not action.option_strings:
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, f"options without help: {missing}"
    train = _subparsers(parser)["train"]
    helps = {a.dest: a.help for a in train._actions}
    assert "TP size" in helps["parallel.tensor_parallel"]      # from the ParallelConfig docstring
    assert "learning rate" == helps["train.optimizer.lr"]


@pytest.mark.parametrize("argv, names", [
    (["train", "--train.stepz", "3"], "--train.stepz"),                       # unknown key
    (["train", "--parallel.tensor_paralel", "2"], "--parallel.tensor_paralel"),
    (["train", "--train.steps", "many"], "train.steps"),                       # wrong type
    (["demo", "--data.count", "1.5"], "data.count"),
    (["train", "--train.steps", "-3"], "TrainConfig.steps"),                  # out of range
    (["train", "--train.optimizer.lr", "2.0"], "OptimizerConfig.lr"),
    (["demo", "--data.colours", "[\"red\", \"mauve\"]"], "DemoData.colours"),
    (["train", "--parallel.sequence_parallel", "true"], "ParallelConfig.sequence_parallel"),
])
def test_bad_overrides_fail_naming_the_key(argv, names, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert names in err, err


def test_missing_dataset_path_fails_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["train-vae", "--data", str(missing)]) == 2
    assert f"--data = '{missing}'" in capsys.readouterr().err
    assert main(["train", "--manifest", str(missing / "m.jsonl"), "--vae_checkpoint", str(tmp_path)]) == 2
    assert "--manifest" in capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text("")
    assert main(["cache", "--manifest", str(tmp_path / "m.jsonl"), "--vae_checkpoint", str(missing)]) == 2
    assert "--vae_checkpoint" in capsys.readouterr().err
    assert main(["eval-vae", "--data", str(missing)]) == 2
    assert "--data" in capsys.readouterr().err


def test_recipe_file_then_dotted_overrides(tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"manifest: {tmp_path / 'm.jsonl'}\nvae_checkpoint: {tmp_path}\n"
                      "train:\n  seed: 11\n  optimizer:\n    weight_decay: 0.02\n"
                      "stages:\n  - name: images\n    frames: 1\n    steps: 7\n"
                      "  - name: clips\n    frames: 9\n    steps: 5\n    i2v: 0.5\n")
    command, (cfg, stage) = commands.parse(["train", "--config", str(recipe), "--train.optimizer.weight_decay",
                                            "0.05", "--parallel.tensor_parallel", "2", "--stage", "clips"])
    assert command == "train" and stage == "clips"
    assert cfg.train.seed == 11 and cfg.train.optimizer.weight_decay == 0.05 and cfg.parallel.tensor_parallel == 2
    assert [(s.name, s.frames, s.steps, s.i2v) for s in cfg.stages] == [("images", 1, 7, 0.0), ("clips", 9, 5, 0.5)]
    with pytest.raises(Exception, match="--stage 'video'"):
        commands.parse(["train", "--config", str(recipe), "--stage", "video"])
    # options each stage replaces were accepted and overwritten in silence (issue 26): refused
    for option, value, field in (("--train.optimizer.lr", "3e-4", "lr"), ("--train.steps", "3", "steps"),
                                 ("--train.optimizer.warmup_steps", "3", "warmup_steps")):
        with pytest.raises(Exception, match=rf"each stage sets its own `{field}` \(stages\[i\].{field}"):
            commands.parse(["train", "--config", str(recipe), option, value])


def test_sample_from_official_layout_weights(goldens_dir, tmp_path):
    """Official-layout tiny DiT + VAE (goldens) from a local directory -> t2v and i2v clips; the
    same weights converted with `convert-official` sample the same clips bit for bit."""
    dit, vae = goldens_dir / "dit_tiny_seed0.safetensors", goldens_dir / "vae_tiny_seed0.safetensors"
    common = ["--vae_official", str(vae), "--vae_size", "golden", "--prompt", "a red cone, slow zoom in", "a blue sphere",
              "--frames", "9", "--size", "32", "--sampler.num_steps", "3", "--seed", "5"]
    assert main(["sample", "--official", str(goldens_dir), *common, "--out", str(tmp_path / "official")]) == 0
    out = tmp_path / "official"
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "prompts.json", "sample_0.mp4", "sample_1.mp4"]
    from mugv.torch_backend.data.analyzer import _read
    a = _read(out / "sample_0.mp4")
    assert a.shape == (9, 32, 32, 3) and a.std() > 1.0       # decoded pixels, not a constant frame

    assert main(["convert-official", "--kind", "dit", "--src", str(dit), "--dst", str(tmp_path / "ckpt")]) == 0
    meta = json.loads(next((tmp_path / "ckpt").glob("step_*/manifest.json")).read_text())
    d = meta["config"]["dit"]
    dit_args = [f"--dit.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in d.items()]
    assert main(["sample", "--checkpoint", str(tmp_path / "ckpt"), *dit_args, *common,
                 "--out", str(tmp_path / "converted")]) == 0
    b = _read(tmp_path / "converted" / "sample_0.mp4")
    np.testing.assert_array_equal(a, b)

    # image-to-video: the product image is the first frame
    image = tmp_path / "converted" / "sample_1.mp4"
    assert main(["sample", "--official", str(dit), *common, "--image", str(image), "--out", str(tmp_path / "i2v")]) == 0
    assert (tmp_path / "i2v" / "grid.png").stat().st_size > 100


def test_sample_needs_exactly_one_weight_source(tmp_path, capsys):
    assert main(["sample", "--prompt", "a red cone"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["sample", "--official", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "--official" in capsys.readouterr().err
    # no VAE: it used to decode through a random VAE and exit 0 (issue 26); now only when asked
    (tmp_path / "dit.safetensors").write_bytes(b"")
    assert main(["sample", "--official", str(tmp_path / "dit.safetensors"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--vae_checkpoint" in err and "--vae_random" in err, err


def test_generate_data_then_evaluate(tmp_path, capsys):
    """generate-data writes real mp4 + manifests; evaluate scores them against their captions."""
    out = tmp_path / "data"
    assert main(["generate-data", "--out", str(out), "--count", "3", "--held_out", "1", "--val", "1",
                 "--frames", "9", "--colours", '["red", "blue"]', "--held_out_pairs", "[]",
                 "--held_out_triples", "2", "--val_triples", "1"]) == 0
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all((out / r["path"]).stat().st_size > 0 for r in rows)
    assert all(r["caption"].split()[1] in ("red", "blue") for r in rows)
    capsys.readouterr()
    assert main(["evaluate", "--manifest", str(out / "train.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["clips"] == 3 and result["accuracy"]["colour"] == 1.0


def test_cached_batches_resume_exactly(tmp_path):
    """The trainer's BatchSource over the cache: a source restored from a state dict taken after
    k batches yields exactly the batches the uninterrupted source yields next."""
    import torch

    from mugv.core.data import BucketSpec, TaskMix
    from mugv.torch_backend.experiments import demo
    from mugv.torch_backend.data.cache import CachedSource, build_cache, pool_encoder
    from mugv.torch_backend.data.dataset import build_index
    from mugv.torch_backend.data.text import EmbeddedTextEncoder
    from mugv.torch_backend.training.data_source import CachedBatches

    manifests = demo.generate(demo.DemoData(count=7, held_out=1, val=1, frames=9), tmp_path / "data", log=lambda s: None)
    index = build_index(manifests["train"], (BucketSpec(32, 32, 9, 2, 16.0), BucketSpec(32, 32, 1, 3, 16.0)))
    build_cache(index, tmp_path / "cache", pool_encoder, EmbeddedTextEncoder(dim=16, max_len=24), "pool", "emb")
    make = lambda: CachedBatches(index, CachedSource(index, tmp_path / "cache", "pool", "emb"), TaskMix(0.4, 0.6, 0.0),  # noqa: E731
                                 seed=3, sample_posterior=True)
    a = make()
    run = [a.next_batch() for _ in range(9)]
    b = make()
    for _ in range(4):
        b.next_batch()
    c = make()
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for want in run[4:]:
        got = c.next_batch()
        assert got.ids == want.ids and got.pixel_hw == want.pixel_hw
        torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=0)
        torch.testing.assert_close(got.text, want.text, rtol=0, atol=0)
    assert {tuple(x.latents.shape[:3]) for x in run} == {(2, 3, 2), (3, 3, 1)}   # video and image batches
    assert all(x.latents.std() > 0 for x in run)


def test_recipe_with_a_duplicate_key_is_refused_naming_both_lines(tmp_path, capsys):
    """A duplicate YAML key kept the last value in silence (issue 26)."""
    (tmp_path / "m.jsonl").write_text("")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"manifest: {tmp_path / 'm.jsonl'}\nvae_checkpoint: {tmp_path}\n"
                      "train:\n  seed: 11\n  seed: 12\n")
    assert main(["train", "--config", str(recipe)]) == 2
    assert "recipe.yaml:5: key 'seed' given twice (first on line 4)" in capsys.readouterr().err

