"""What each `mugv` subcommand runs: one module per job (cli/commands.py::RUNNERS), plus the
loaders they share (loaders.py) and what a user sees (report.py). Jobs import training, models,
data, parallel and objectives, never the CLI nor an experiment."""
