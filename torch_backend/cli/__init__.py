"""`mugv`: one command line for what a user does, built on jsonargparse.

    mugv generate-data | train-vae | eval-vae | cache | train | sample | evaluate |
         convert-official | make-preferences | train-preference | finetune | curate |
         verify-kernels | demo
         [--config recipe.yaml] [--section.field value ...]

The CLI parses and dispatches only: each subcommand runs one job (torch_backend/jobs/) or, for
`demo`, the experiment composed of them (torch_backend/experiments/); cli/commands.py::RUNNERS
names which. Every subcommand's options come from the config dataclasses (core/, e.g.
core/recipe.py, and the jobs' run configs): a recipe
file (`--config`, YAML or JSON) sets any of them and dotted options override it
(`--train.optimizer.lr 3e-4`, `--parallel.tensor_parallel 2`). An unknown key or a value of the
wrong type fails while parsing, naming the key; an out-of-range value fails when the dataclasses
are built (their `__post_init__` raises ConfigError naming the field) - both before any work.
`mugv <subcommand> --print_config` shows the resolved config as YAML (a recipe to edit).

Several processes: `torchrun --nproc-per-node N -m mugv.torch_backend.cli train ...` (the trainer
joins the torchrun world through RANK / WORLD_SIZE / MASTER_ADDR).
"""
from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")


class UsageError(Exception):
    """Bad command-line input (unknown key, wrong type, out-of-range value, missing path). Inputs
    read from files (manifests, checkpoints, layouts) are checked next, by `commands.preflight`
    (jobs/preflight.py `InputError`); both end as one line and exit status 2."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mugv` console script. Returns the exit status (2 = bad input)."""
    from mugv.torch_backend.cli import commands
    argv = sys.argv[1:] if argv is None else list(argv)
    from mugv.torch_backend.jobs.preflight import InputError
    try:
        command, cfg = commands.parse(argv)
        commands.preflight(command, cfg)    # every input read and checked, no model loaded yet
        return commands.run(command, cfg)
    except (UsageError, InputError) as err:   # a job's own input error (InputError) ends the same way
        sys.stderr.write(f"mugv: error: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
