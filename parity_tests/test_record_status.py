"""benchmarks/record_status.py: which recorded fast paths a checkout's code would still use.

It decides whether a branch can be merged before its GPUs re-verify, so its verdicts are checked
against records doctored in each way a path goes stale, and against the committed record, whose
verdicts must agree with the registry's own check (`kernel_status`'s fingerprint comparison)."""
from __future__ import annotations

import copy
import importlib.util
import json
import pathlib

import pytest

from mugv.kernels import registry

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def record_status():
    spec = importlib.util.spec_from_file_location("record_status", REPO / "benchmarks" / "record_status.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _committed() -> dict:
    return json.loads(registry.VERIFIED_FILE.read_text())


def test_committed_record_agrees_with_the_registry(record_status):
    record = _committed()
    states = {(d, p): s for d, p, s, _ in record_status.rows(record)}
    for device, entry in record.items():
        for name in registry.KERNELS:
            current = entry["fingerprints"].get(name) == registry.fingerprint(name)
            assert (states[device, name] == "current") == (current and name in entry["kernels"])
        assert (device, "compiled_layers") in states
        for backend, fa in entry.get("attention", {}).items():
            assert (device, f"{backend} {fa['version']}") in states


def test_each_way_a_path_goes_stale(record_status):
    from mugv.torch_backend.models import dit_layers
    device, kernel = "GPU X", next(iter(registry.KERNELS))
    entry = copy.deepcopy(next(iter(_committed().values())))
    entry["fingerprints"] = {n: registry.fingerprint(n) for n in registry.KERNELS}
    entry["kernels"] = list(registry.KERNELS)
    entry["compiled_layers"] = {"fingerprint": "torch 0.0 on the GPU|" +
                                dit_layers.compiled_fingerprint().split("|", 1)[1]}
    fresh = {p: s for _, p, s, _ in record_status.rows({device: entry})}
    assert all(fresh[n] == "current" for n in registry.KERNELS)
    assert fresh["compiled_layers"] == "current"   # the torch version is the device's, not compared

    stale = copy.deepcopy(entry)
    other = list(registry.KERNELS)[1]
    stale["fingerprints"][kernel] = "0" * 16
    stale["kernels"].remove(other)
    stale["compiled_layers"]["fingerprint"] = "torch 0.0|" + "0" * 16
    for fa in stale.get("attention", {}).values():
        fa["fingerprint"] = "postprocess16:0|call:0"
    got = {p: s for _, p, s, _ in record_status.rows({device: stale})}
    assert got[kernel] == "edited since" and got[other] == "not passed there"
    assert got["compiled_layers"] == "edited since"
    assert all(s == "edited since" for p, s in got.items() if p.startswith("fa4"))
    del stale["compiled_layers"]
    assert {p: s for _, p, s, _ in record_status.rows({device: stale})}["compiled_layers"] == "not recorded"


def test_unreadable_record_names_the_file(record_status, tmp_path, capsys):
    bad = tmp_path / "verified.json"
    bad.write_text("{not json")
    assert record_status.main(["--record", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    bad.write_text("[]")
    assert record_status.main(["--record", str(bad)]) == 2
    assert "expected a JSON object" in capsys.readouterr().err
