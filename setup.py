"""Maps the repository's top-level folders onto the `mugv.*` namespace.

`core/` installs as `mugv.core`, `torch_backend/` as `mugv.torch_backend`, and so on, so generic
names such as `core` never land in site-packages. Subpackages are found, not listed, so a new one
cannot be missing from the wheel while the editable install still works.
"""
from setuptools import find_packages, setup

TOP = ["core", "torch_backend", "jax_reference", "kernels", "checkpoints", "parity_tests"]

packages, package_dir = [], {}
for top in TOP:
    for sub in [top] + [f"{top}.{p}" for p in find_packages(top)]:
        name = "mugv." + sub
        packages.append(name)
        package_dir[name] = sub.replace(".", "/")

setup(packages=packages, package_dir=package_dir,
      # kernels/verified.json is the record of which kernels passed parity on which device: without it
      # a wheel install (the GPU machine's) silently falls back to plain torch everywhere.
      package_data={"mugv.parity_tests": ["*.json"], "mugv.kernels": ["verified.json"]})
