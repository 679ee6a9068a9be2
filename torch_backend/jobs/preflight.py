"""Checks of a command's inputs that run before any model is loaded, written once for every job.

Each check reads only what is cheap (a manifest's rows, a checkpoint's manifest.json, a folder's
config.json, the layout arithmetic) and raises `InputError`: ONE line naming the option (and the
file:line where there is one) and what was expected. The CLI (`cli/commands.py::preflight`) runs
them per subcommand between parsing and the job and turns an `InputError` into exit status 2, as
it does one raised by a job itself (e.g. a stage in which no clip is usable). Before these checks
a bad manifest, an impossible layout, bf16 on a CPU or a missing T5 folder was a traceback with
exit status 1, raised after the VAE had loaded (issue 26).
"""
from __future__ import annotations

import os
import pathlib


MODEL_NAMES = {"vae": "VAE", "dit": "DiT"}   # checkpoint config section -> what the user calls it


class InputError(ValueError):
    """Bad user input found before any work; the message is one line naming the option or file:line."""


def manifest(option: str, path: str, kind: str = "clips") -> list:
    """The rows of a training manifest (`kind` "clips": data/manifest.py) or a preference manifest
    ("dpo" / "kto": data/preference.py): every row parsed and typed, at least one."""
    if not path or not pathlib.Path(path).is_file():
        raise InputError(f"--{option} = {path!r}: no such manifest file")
    if kind == "clips":
        from mugv.torch_backend.data.manifest import ManifestError, read_manifest
        errors, read = (ManifestError,), read_manifest
    else:
        from mugv.torch_backend.data import preference
        errors = (preference.PreferenceError,)
        read = preference.read_dpo_manifest if kind == "dpo" else preference.read_kto_manifest
    try:
        rows = read(path)
    except errors as err:
        raise InputError(f"--{option}: {_one_line(err)}") from None
    if not rows:
        raise InputError(f"--{option}: {path}: no rows (expected one JSON object per line with at least "
                         f"'path' and 'caption')")
    return rows


def data(option: str, path: str) -> None:
    """A folder of videos or a manifest file (train-vae, eval-vae)."""
    p = pathlib.Path(path) if path else None
    if p is None or not p.exists():
        raise InputError(f"--{option} = {path!r}: no such folder or manifest")
    if p.is_file():
        manifest(option, path)


def checkpoint(option: str, path: str, step_only: bool = False, holds: str | None = None) -> pathlib.Path:
    """A committed mugv checkpoint: a step_* folder with its manifest.json (format and checksum
    checked, no array read), or with `step_only` False a run folder holding one (itself or under
    checkpoints/); with `holds` ("vae" / "dit") its config must describe that model (a VAE
    checkpoint given where a DiT one belongs). Returns the step folder."""
    from mugv.checkpoints.format import Checkpoint, CheckpointError, latest_checkpoint
    p = pathlib.Path(path) if path else None
    if p is None or not p.exists():
        raise InputError(f"--{option} = {path!r}: no such checkpoint folder")
    step = p if (p / "manifest.json").is_file() else None
    if step is None and p.is_dir():
        newest = latest_checkpoint(p) or latest_checkpoint(p / "checkpoints")
        if newest is not None and step_only:
            raise InputError(f"--{option} = {path!r}: a run folder; give one of its step_* checkpoints "
                             f"(the newest: {newest})")
        step = newest
    if step is None:
        raise InputError(f"--{option} = {path!r}: not a committed mugv checkpoint (expected a step_* folder "
                         f"with manifest.json{'' if step_only else ', or a run folder holding one'})")
    try:
        config = Checkpoint(step).manifest.get("config") or {}
    except CheckpointError as err:
        raise InputError(f"--{option}: {_one_line(err)}") from None
    if holds is not None and holds not in config:
        raise InputError(f"--{option} = {path!r}: {step} holds no {MODEL_NAMES[holds]} (its config has sections "
                         f"{sorted(config)}, no {holds!r})")
    return step


def weights_file(option: str, path: str) -> None:
    """An official-layout weights file (or, where a loader takes one, a folder)."""
    if not path or not pathlib.Path(path).exists():
        raise InputError(f"--{option} = {path!r}: no such file")


def text_encoder(option: str, spec: str) -> None:
    """"embedded", or a local T5 folder in `save_pretrained` layout (config.json present)."""
    if spec == "embedded":
        return
    p = pathlib.Path(spec)
    if not p.is_dir():
        raise InputError(f"--{option} = {spec!r}: expected 'embedded' or a local T5 folder; no such folder")
    if not (p / "config.json").is_file():
        raise InputError(f"--{option} = {spec!r}: no config.json in it (expected a T5 save_pretrained folder "
                         f"with the encoder and tokenizer)")


def pixels(option: str, value: int, multiple: int) -> None:
    """A frame height / width / size in pixels: positive and a multiple of `multiple`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
        raise InputError(f"--{option} = {value!r}: expected a positive multiple of {multiple}")


def positive(option: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"--{option} = {value!r}: expected a number > 0")


def layout(option: str, parallel, dit) -> int:
    """The parallel layout against the model and this launch's world size (WORLD_SIZE, 1 without
    torchrun). Returns the data-parallel size."""
    from mugv.core.parallel import LayoutError, check_layout
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return check_layout(parallel, dit, world)
    except LayoutError as err:
        raise InputError(f"--{option}.*: {_one_line(err)}") from None


def precision(option: str, value: str) -> None:
    """bf16 mixed precision runs on a GPU only."""
    if value == "bf16":
        import torch
        if not torch.cuda.is_available():
            raise InputError(f"--{option} = 'bf16': needs a GPU and none is visible; use 'fp32' on a CPU")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
