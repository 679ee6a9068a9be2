"""Checkpoint saves that do not make the step wait on the disk.

`CheckpointSaver.save` takes a snapshot that is already a set of host tensors and bytes (the
trainer copies the state off the device first: pinned host memory on a GPU, fresh copies on a
CPU), then writes it with `checkpoints/torch_io.py::save_torch`:
- synchronous mode: right away, in the caller;
- asynchronous mode: in a background thread, while training goes on. The write is the same
  atomic protocol (`.partial.step_*`, manifest last, rename), so a process killed mid-write leaves
  the previous checkpoint intact. The writer's barriers run on a process group of their own
  (gloo), never on the group the training collectives use, so a barrier in the writer thread
  cannot interleave with a step's all-reduce.

At most one save is in flight: `save` first waits for the previous one (and re-raises its
error, if it failed); `wait` must be called before the process exits (the trainer does at the
end of `run` and in `close`). Both modes write byte-identical checkpoints from the same snapshot.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mugv.checkpoints.torch_io import save_torch


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy that nothing else aliases (pinned memory for a device tensor, so the copy is a
    DMA the caller synchronises once for all tensors; see `CheckpointSaver.snapshot_done`)."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class CheckpointSaver:
    """Writes checkpoints synchronously or in a background thread (one at a time).

    async_save: write in a background thread.
    log: where "committed" lines go (called from the writer thread in async mode).
    """

    def __init__(self, async_save: bool, log: Callable[[str], None] = print):
        self.async_save = async_save
        self.log = log
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._pending: Optional[Path] = None
        # Every rank creates the group (a collective), also in sync mode: the layout is the same.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def _barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)

    @staticmethod
    def snapshot_done() -> None:
        """The non-blocking device->host copies of `to_host` are complete after this."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def save(self, root: Path, step: int, groups: dict, **kw) -> Path:
        """Write `groups` (host tensors) and `kw` (save_torch's keywords) as checkpoint `step`.
        Returns the checkpoint's final path (committed already in sync mode, later in async)."""
        self.wait()
        self.snapshot_done()
        final = Path(root) / f"step_{step:09d}"
        if not self.async_save:
            self._write(root, step, groups, kw)
            return final
        self._pending = final
        self._thread = threading.Thread(target=self._run, args=(root, step, groups, kw),
                                        name=f"mugv-checkpoint-{step}", daemon=True)
        self._thread.start()
        return final

    def _write(self, root, step, groups, kw) -> None:
        path = save_torch(root, step, groups, barrier=self._barrier, **kw)
        self.log(f"[mugv] checkpoint: step {step} committed at {path}")

    def _run(self, root, step, groups, kw) -> None:
        try:
            self._write(root, step, groups, kw)
        except BaseException as err:  # re-raised in the training thread by wait()
            self._error = err

    def wait(self) -> Optional[Path]:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        done = None
        if self._thread is not None:
            self._thread.join()
            self._thread, done, self._pending = None, self._pending, None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"asynchronous checkpoint save failed: {err}") from err
        return done

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
