"""Checkpoint RNG state (torch_backend/training/rng.py): exact round trip, and files hold data only:
a pickle payload, a foreign blob or a damaged field is refused by name and runs nothing."""
from __future__ import annotations

import ast
import json
import pathlib
import pickle
import random

import numpy as np
import pytest
import torch

from mugv.torch_backend.training import rng

REPO = pathlib.Path(__file__).resolve().parent.parent


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_capture_restore_round_trip():
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn()   # cached gaussians are part of the state
    blob = rng.capture()
    first = _draws()
    _draws()
    rng.restore(blob)
    assert _draws() == first
    assert json.loads(blob)["format"] == rng.FORMAT


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"python": _Payload(str(marker))})
    with pytest.raises(rng.RngStateError, match="never loaded"):
        rng.restore(blob)
    assert not marker.exists()


@pytest.mark.parametrize("field, value, needle", [
    ("format", "other", "'format'"),
    ("python.words", [1, 2, 3], "'python.words'"),
    ("numpy.keys", [2 ** 40] * 624, "'numpy.keys'"),
    ("numpy.pos", "0", "'numpy.pos'"),
    ("torch_cpu", "AAAA", "'torch_cpu'"),
    ("torch_cpu", "not base64!", "'torch_cpu'"),
    ("megatron_tracker", [1], "'megatron_tracker'"),
])
def test_damaged_field_is_named_before_any_generator_changes(field, value, needle):
    torch.manual_seed(9)
    state = json.loads(rng.capture())
    node = state
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    before = torch.get_rng_state().clone()
    with pytest.raises(rng.RngStateError, match=needle):
        rng.restore(json.dumps(state).encode())
    assert torch.equal(torch.get_rng_state(), before)


def test_no_load_path_unpickles():
    """The package never calls pickle.load(s) or torch.load without weights_only=True."""
    offenders = []
    for folder in ("core", "torch_backend", "checkpoints", "kernels", "jax_reference"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if owner in ("pickle", "cPickle", "dill") and node.func.attr in ("load", "loads", "Unpickler"):
                    offenders.append(f"{where} {owner}.{node.func.attr}")
                if owner == "torch" and node.func.attr == "load":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        offenders.append(f"{where} torch.load without weights_only=True")
    assert not offenders, offenders
