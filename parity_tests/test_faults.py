"""Faults that used to lose work or pass silently (issue 26): an edited manifest or a flipped bit in
a state blob, a torn metrics line, a run killed before its first checkpoint, two runs on one
output directory. Real child processes where the fault is a process's death."""
from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys

import pytest

from mugv.checkpoints.format import Checkpoint, CheckpointError
from mugv.parity_tests.helpers import child_env, kill_at, run_child, start_child
from mugv.torch_backend.training.checkpointing import CheckpointMixin
from mugv.torch_backend.training.run_lock import RunLock, RunLockError

WORKER = pathlib.Path(__file__).with_name("train_worker.py")


@pytest.fixture()
def committed(tmp_path):
    import numpy as np
    import torch

    from mugv.checkpoints.torch_io import save_torch
    from mugv.core.schema import ParamSpec, Schema
    schema = Schema((ParamSpec("w", (3, 5), "float32", None),))
    params = {"w": torch.from_numpy(np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32))}
    return save_torch(tmp_path, 7, {"model": (schema, params)}, config={"train": {"lr": 1e-3}},
                      meta={"step": 7}, states={"rng": b'{"x": 1}', "data": b"{}"})


@pytest.mark.parametrize("edit", ["step", "config", "meta"])
def test_edited_manifest_is_refused(committed, edit):
    mf = committed / "manifest.json"
    m = json.loads(mf.read_text())
    if edit == "step":
        m["step"] = 8
    elif edit == "config":
        m["config"]["train"]["lr"] = 1e-2
    else:
        m["meta"]["step"] = 0
    mf.write_text(json.dumps(m, indent=1))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        Checkpoint(committed)


def test_flipped_bit_in_a_state_blob_is_refused(committed):
    blob = committed / "state" / "rng" / "rank_00000.bin"
    data = bytearray(blob.read_bytes())
    data[2] ^= 0x01
    blob.write_bytes(bytes(data))
    ck = Checkpoint(committed)
    assert ck.read_state("data") == b"{}"
    with pytest.raises(CheckpointError, match=r"rank_00000.bin: sha256 does not match"):
        ck.read_state("rng")


class _Metrics(CheckpointMixin):
    def __init__(self, path):
        self._metrics_path = path
        self.logged = []
        self.log = self.logged.append


def test_torn_last_metrics_line_is_dropped_and_later_steps_rewound(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    m = _Metrics(path)
    assert m._truncate_metrics(2) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert any("torn last line" in x for x in m.logged)


def test_damaged_metrics_line_before_the_last_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2: not a metrics line"):
        _Metrics(path)._truncate_metrics(5)


HOLD = """
import sys, time
from mugv.torch_backend.training.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_on_one_out_dir_is_refused_and_a_dead_holder_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=rf"in use by another mugv run \(pid {holder.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)   # the kernel dropped the dead process's lock: no stale lock to clear
    lock.acquire()
    lock.release()


def test_killed_before_the_first_checkpoint_restarts_without_repeating_steps(tmp_path):
    """--ckpt-every 100: no checkpoint before the kill; the rerun starts at step 0, says so, and
    metrics.jsonl holds each step once."""
    args = [sys.executable, str(WORKER), str(tmp_path), "6", "--ckpt-every", "100"]
    kill_at(start_child(args), "step 3/", delay=0.2)
    assert (tmp_path / "metrics.jsonl").read_text().strip(), "the killed run wrote no metrics"
    assert "no committed checkpoint" in run_child(args)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6, steps
    # each start recorded what produced its steps: versions, device and the kernels with reasons
    starts = [json.loads(x) for x in (tmp_path / "environment.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in starts] == [0, 0]
    assert starts[-1]["versions"]["torch"] and set(starts[-1]["kernels"]) >= {"adaln_modulate"}
    assert all("why" in k for k in starts[-1]["kernels"].values())


@pytest.mark.parametrize("clip_id", ["../../escaped", "/tmp/absolute_escape", "a/b/../../../c", "..",
                                     "caf\u00e9 \u89c6\u9891", "\u202eevil\x00name"])
def test_output_names_from_ids_stay_inside_out(tmp_path, clip_id):
    """eval-vae / train-vae name their PNG/mp4 files after manifest ids: a hostile id writes inside
    --out under a sanitised name, and distinct ids keep distinct names."""
    import numpy as np

    from mugv.core.vae import vae_config
    from mugv.torch_backend.data.media import safe_name
    from mugv.torch_backend.jobs import vae_eval
    from mugv.torch_backend.models.vae import VideoVAE
    out = tmp_path / "out" / "eval"
    clip = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    vae_eval.evaluate(VideoVAE(vae_config("tiny")), "", 16, 16, 5, out_dir=out, clips=[(clip_id, clip)])
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert written and all(p.parent == out for p in written), written
    assert len({p.stem for p in written if p.suffix == ".png"}) == 1
    if "/" in clip_id:   # the separator-free spelling of the same id gets another name
        assert safe_name(clip_id) != safe_name(clip_id.replace("/", "_"))


def test_bad_videos_are_skipped_and_counted_by_eval_vae_train_vae_and_evaluate(tmp_path, capsys):
    """One bad video stopped eval-vae, train-vae and evaluate with a traceback, and train-vae
    dropped short clips in silence (issue 26): each now skips, names and counts them."""
    import json

    import numpy as np

    from mugv.core.vae import vae_config
    from mugv.torch_backend.cli import main
    from mugv.torch_backend.data.media import write_mp4
    from mugv.torch_backend.data.product_sources import write_audio_only
    from mugv.torch_backend.jobs import vae_eval
    from mugv.torch_backend.jobs.vae_train import VAETrainConfig, load_clips
    from mugv.torch_backend.models.vae import VideoVAE
    data = tmp_path / "videos"
    rng = np.random.default_rng(0)
    write_mp4(data / "good.mp4", rng.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8), 8)
    write_mp4(data / "short.mp4", rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8), 8)
    (data / "empty.mp4").write_bytes(b"")
    (data / "random.mp4").write_bytes(rng.bytes(4096))
    write_audio_only(data / "audio.mp4")
    clips = load_clips(VAETrainConfig(data=str(data), height=16, width=16, num_frames=9, fps=8.0))
    assert [name for name, _ in clips] == ["good"]
    said = capsys.readouterr().out
    assert "4 skipped (empty file 1, no video stream 1, too short 1, unreadable container 1)" in said
    result = vae_eval.evaluate(VideoVAE(vae_config("tiny")), data, 16, 16, 5)
    assert [r["clip"] for r in result["clips"]] == ["good"]
    assert "4 skipped (empty file 1, no video stream 1, too short 1, unreadable container 1)" in capsys.readouterr().out
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(data / n), "caption": "a red cube"}) + "\n"
                                for n in ("good.mp4", "empty.mp4", "random.mp4")))
    assert main(["evaluate", "--manifest", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert '"clips": 1' in out and "2 skipped (empty file 1, unreadable container 1)" in out
