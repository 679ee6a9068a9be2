"""A fresh machine gets what CI got: the install comes from the lock, the repository's top-level
folders never shadow installed packages, and runs record the versions that produced them.

Run through the README's command (`bash scripts/test.sh`: `python -P`, PYTHONSAFEPATH=1 for the
children), these tests see what a user's run sees from the repository root.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LOCK = REPO / "locks" / "cpu-py311.txt"
TOP_FOLDERS = ("core", "torch_backend", "jax_reference", "kernels", "checkpoints", "parity_tests")

PROBE = f"""
import importlib.machinery, json
found = {{}}
for name in {TOP_FOLDERS!r}:
    spec = importlib.machinery.PathFinder.find_spec(name)
    found[name] = spec.origin if spec is not None and spec.origin else None
print(json.dumps(found))
"""


def _shadowed(found: dict) -> dict:
    return {k: v for k, v in found.items() if v and pathlib.Path(v).resolve().is_relative_to(REPO)
            and ".venv" not in pathlib.Path(v).parts}


def test_this_process_does_not_import_the_repository_folders_as_top_level_modules():
    """The test process itself (started from the repository root by scripts/test.sh). Searched on
    sys.path (PathFinder), not in sys.modules, where pytest registers its own `parity_tests`."""
    found = {n: (s.origin if (s := importlib.machinery.PathFinder.find_spec(n)) else None)
             for n in TOP_FOLDERS}
    assert not _shadowed(found), (
        f"repository folders resolve as top-level modules: {_shadowed(found)}; sys.path[0] = "
        f"{sys.path[0]!r}. Start Python with -P (or PYTHONSAFEPATH=1), as scripts/test.sh does.")


def test_child_processes_started_from_the_root_do_not_either():
    """Children inherit the environment the tests give them (python -m ... with cwd = the root, as
    the parallel-layout and trainer tests start theirs)."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert not _shadowed(json.loads(out)), (
        f"a child started from {REPO} imports repository folders: {_shadowed(json.loads(out))}; "
        "export PYTHONSAFEPATH=1 (scripts/test.sh and scripts/main.sh do)")


def test_the_console_script_does_not_either():
    mugv = pathlib.Path(sys.executable).with_name("mugv")
    if not mugv.exists():
        pytest.skip(f"no `mugv` console script beside {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    proc = subprocess.run([str(mugv), "--help"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_pypi_kernels_package_imports_from_the_root():
    """transformers (>= 5.25) imports the PyPI package `kernels`; the repository's `kernels/`
    folder shadowed it (ImportError: cannot import name 'CUDAProperties')."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed here (older transformers)")
    out = subprocess.run([sys.executable, "-c", "import kernels, transformers; print(kernels.__file__)"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "site-packages" in out.stdout, out.stdout


def _locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", LOCK.read_text(), flags=re.M)
    return {name.lower().replace("_", "-"): version for name, version in pins}


@pytest.mark.skipif(not (sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64"),
                    reason="the lock is for CPython 3.11 on x86_64 (the GPU machine installs offline)")
def test_installed_packages_are_the_locked_versions():
    """Every package of the lock is installed at its locked version (scripts/install.sh installs
    with --require-hashes --no-deps from it), so this machine runs what CI ran."""
    wrong = {}
    for name, version in _locked().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "not installed"
        if have != version:
            wrong[name] = f"locked {version}, installed {have}"
    assert not wrong, f"{LOCK.name} vs this environment: {wrong}; rerun `bash scripts/install.sh`"


def test_the_lock_pins_every_dependency_with_hashes():
    text = LOCK.read_text()
    pins = _locked()
    for dep in ("torch", "megatron-core", "jax", "transformers", "kernels", "pytest", "setuptools"):
        assert dep in pins, f"{LOCK.name} does not pin {dep}"
    assert pins["torch"].endswith("+cpu"), "the CPU lock must pin the CPU build of torch"
    blocks = re.split(r"\n(?=[A-Za-z0-9_.\-]+==)", text)
    unhashed = [b.split()[0] for b in blocks if "==" in b.split("\n")[0] and "--hash=sha256:" not in b]
    assert not unhashed, f"pins without a hash: {unhashed}"
    assert not any(n.startswith("nvidia-") for n in pins), "a CUDA package is in the CPU lock"


def test_environment_names_versions_without_importing_frameworks():
    from mugv.core import provenance
    code = ("import sys; from mugv.core import provenance; e = provenance.environment(); "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules; "
            "print(provenance.versions_line(e))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"torch {importlib.metadata.version('torch')}" in out.stdout
    env = provenance.environment()
    assert env["versions"]["megatron-core"] == importlib.metadata.version("megatron-core")


def test_report_records_the_environment(tmp_path):
    from mugv.torch_backend.jobs import report
    path = report.markdown_report(tmp_path / "r.md", "t", [("a", "b")], config={})
    text = path.read_text()
    assert "## Environment" in text and f"| torch | {importlib.metadata.version('torch')} |" in text


def test_the_second_dispatch_pass_names_existing_test_files():
    """scripts/test_dispatch.sh (CI's second CPU dispatch path) lists parity files by name: a
    renamed file would make that pass fail with "file not found" only in CI."""
    text = (REPO / "scripts" / "test_dispatch.sh").read_text()
    listed = re.findall(r"parity_tests/[\w/]+(?:\.py)?", text.split("files=(", 1)[1].split(")", 1)[0])
    assert listed, "no files found in scripts/test_dispatch.sh"
    missing = [f for f in listed if not (REPO / f).exists()]
    assert not missing, f"scripts/test_dispatch.sh names missing files: {missing}"
