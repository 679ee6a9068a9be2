"""SIGKILL in the middle of `mugv cache`, `mugv sample` and `mugv train-preference` (issue 26): real
child processes on the CPU with tiny inputs, each killed once its own progress line says it is
mid-work; the rerun completes and equals an uninterrupted run (cache arrays bit for bit; the
sampled clips, grid and prompts; the preference checkpoint's arrays and metrics, each step once).
The DiT trainer's kill tests are in test_faults.py; VAE training's belongs with issue 25's VAE work."""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from mugv.parity_tests.helpers import (finish_child, kill_at, random_clips, run_child, start_child,
                                       tiny_dit_checkpoint, tiny_vae_checkpoint)

MUGV = [sys.executable, "-m", "mugv.torch_backend.cli"]
# Each test starts the uninterrupted run first and lets it run beside the killed one and its rerun.


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """20 clips of 12 frames with captions, a tiny VAE checkpoint and a demo-size DiT checkpoint."""
    from mugv.core.recipe import demo_dit
    root = tmp_path_factory.mktemp("kill_inputs")
    names = {f"clip{i:02d}.mp4": 12 for i in range(20)}
    random_clips(root / "clips", names)
    colours = ("red", "blue", "green", "yellow")
    (root / "m.jsonl").write_text("".join(
        json.dumps({"path": f"clips/{n}", "caption": f"a {colours[i % 4]} cube, clip {i}"}) + "\n"
        for i, n in enumerate(names)))
    return {"root": root, "manifest": root / "m.jsonl", "vae": tiny_vae_checkpoint(root / "vae"),
            "dit": tiny_dit_checkpoint(root / "dit", demo_dit())}


# ---------------------------------------------------------------------------------------------
# mugv cache


def _cache_arrays(cache: pathlib.Path) -> dict[str, np.ndarray]:
    """Every zarr array of a cache folder (latents/<bucket>/{mean,std,done}, text/...) by path."""
    import tensorstore as ts
    out = {}
    for meta in sorted(cache.rglob("zarr.json")):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(meta.parent)}}
        out[str(meta.parent.relative_to(cache))] = ts.open(spec, open=True).result().read().result()
    return out


def test_cache_killed_mid_bucket_reruns_to_the_same_arrays(inputs, tmp_path):
    """Killed after 16 of the image bucket's 20 rows (the video bucket and the text not started):
    the rerun encodes only the rest, and every array equals an uninterrupted build's bit for bit."""
    from mugv.torch_backend.data.cache import cache_complete

    def recipe(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"manifest: {inputs['manifest']}\nvae_checkpoint: {inputs['vae']}\nout: {tmp_path / name}\n"
                        "stages:\n  - {name: images, frames: 1, steps: 1, batch_size: 4}\n"
                        "  - {name: clips, frames: 9, steps: 1, batch_size: 4}\n")
        return [*MUGV, "cache", "--config", str(path)]

    whole = start_child(recipe("whole"), log=tmp_path / "whole.log")
    kill_at(start_child(recipe("killed")), "[mugv] cache 32x32x1@16: 16 rows committed")
    images, video = (tmp_path / "killed" / "cache" / name for name in ("32x32x1@16", "32x32x9@16"))
    assert not cache_complete(images) and not cache_complete(video)
    done = int(_cache_arrays(images)["latents/32x32x1@16/done"].sum())
    assert 16 <= done < 20, done
    said = run_child(recipe("killed"))
    assert f"{images}: {20 - done} clips encoded" in said, said   # finished rows are not redone
    assert f"{video}: 20 clips encoded" in said, said
    finish_child(whole, tmp_path / "whole.log")
    for bucket in ("32x32x1@16", "32x32x9@16"):
        a = _cache_arrays(tmp_path / "killed" / "cache" / bucket)
        b = _cache_arrays(tmp_path / "whole" / "cache" / bucket)
        assert sorted(a) == sorted(b) and len(a) == 6, sorted(a)
        for key in a:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), f"{bucket}/{key} differs"
        assert json.loads((tmp_path / "killed" / "cache" / bucket / "meta.json").read_text()) == \
            json.loads((tmp_path / "whole" / "cache" / bucket / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------
# mugv sample


def test_sample_killed_mid_sampling_leaves_no_file_and_reruns_to_the_same_clips(inputs, tmp_path):
    """Killed at Euler step 5 of 30: nothing is written under a final name; the rerun writes the
    clips, grid and prompts of an uninterrupted run."""
    from mugv.torch_backend.data.analyzer import _read

    def command(out):
        return [*MUGV, "sample", "--checkpoint", str(inputs["dit"]), "--vae_checkpoint", str(inputs["vae"]),
                "--prompt", "a red cube, slow zoom in", "a blue sphere", "--frames", "9", "--size", "32",
                "--sampler.num_steps", "30", "--seed", "3", "--out", str(tmp_path / out)]

    whole = start_child(command("whole"), log=tmp_path / "whole.log")
    kill_at(start_child(command("killed")), "[mugv] sampling: step 5/30")
    assert not (tmp_path / "killed").exists() or not any((tmp_path / "killed").iterdir())
    run_child(command("killed"))
    finish_child(whole, tmp_path / "whole.log")
    names = ["grid.png", "prompts.json", "sample_0.mp4", "sample_1.mp4"]
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == names   # no partial file left
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == names
    for name in ("grid.png", "prompts.json"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    for name in ("sample_0.mp4", "sample_1.mp4"):
        a, b = _read(tmp_path / "killed" / name), _read(tmp_path / "whole" / name)
        assert a.shape == (9, 32, 32, 3) and a.std() > 1.0
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# mugv train-preference

TIMING = ("step_time", "tokens_per_s", "mfu")


def test_preference_killed_mid_run_resumes_to_the_same_checkpoint_and_metrics(inputs, tmp_path):
    """DPO on 8 latent pairs, 8 steps, a checkpoint every 2: killed once step 5 is logged; the
    rerun resumes from a committed checkpoint, logs each step once, and its final checkpoint
    (policy, optimizer state) and metrics equal an uninterrupted run's."""
    from mugv.checkpoints.format import Checkpoint, latest_checkpoint
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        for side in ("w", "l"):
            np.save(tmp_path / f"{side}{i}.npy", rng.standard_normal((8, 3, 4, 4)).astype(np.float32))
        rows.append({"caption": f"a {('red', 'blue')[i % 2]} cube, pair {i}", "preferred": f"w{i}.npy",
                     "rejected": f"l{i}.npy"})
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def command(out):
        return [*MUGV, "train-preference", "--manifest", str(tmp_path / "dpo.jsonl"), "--reference",
                str(inputs["dit"]), "--out", str(tmp_path / out), "--steps", "8", "--batch_size", "4",
                "--beta", "100", "--train.checkpoint_every", "2", "--train.log_every", "1"]

    whole = start_child(command("whole"), log=tmp_path / "whole.log")
    kill_at(start_child(command("killed")), "[mugv] step 5/8")
    said = run_child(command("killed"))
    assert "no committed checkpoint" not in said, said
    starts = [json.loads(x)["start_step"] for x in (tmp_path / "killed" / "environment.jsonl").read_text().splitlines()]
    assert starts[0] == 0 and starts[1] in (2, 4), starts   # resumed from a checkpoint of the killed run
    finish_child(whole, tmp_path / "whole.log")

    def metrics(run):
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in m.items() if k not in TIMING} for m in lines]

    killed, whole = metrics("killed"), metrics("whole")
    assert [m["step"] for m in killed] == list(range(1, 9))   # each step once
    assert killed == whole
    a = Checkpoint(latest_checkpoint(tmp_path / "killed" / "checkpoints"))
    b = Checkpoint(latest_checkpoint(tmp_path / "whole" / "checkpoints"))
    assert a.path.name == b.path.name and a.groups() == b.groups() and "model" in a.groups()
    for group in a.groups():
        assert a.names(group) == b.names(group), group
        for name in a.names(group):
            assert np.array_equal(a.read(group, name), b.read(group, name)), f"{group}/{name} differs"


def test_a_file_killed_mid_write_never_appears_under_its_final_name(tmp_path):
    """`written_atomically` (sample's outputs): a writer killed mid-write leaves no file under the
    final name and an earlier file untouched; an exception in the block leaves no partial file."""
    from mugv.torch_backend.data.media import written_atomically
    target = tmp_path / "grid.png"
    target.write_bytes(b"earlier")
    writer = (f"import sys, time\nfrom mugv.torch_backend.data.media import written_atomically\n"
              f"with written_atomically({str(target)!r}) as tmp:\n"
              f"    f = open(tmp, 'wb'); f.write(b'half'); f.flush()\n"
              f"    print('writing', flush=True); time.sleep(60)\n")
    kill_at(start_child([sys.executable, "-c", writer]), "writing")
    assert target.read_bytes() == b"earlier"
    with pytest.raises(RuntimeError):
        with written_atomically(tmp_path / "new.mp4") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("encoder failed")
    assert not (tmp_path / "new.mp4").exists() and not (tmp_path / ".new.partial.mp4").exists()
    with written_atomically(tmp_path / "new.mp4") as tmp:
        tmp.write_bytes(b"whole")
    assert (tmp_path / "new.mp4").read_bytes() == b"whole"
