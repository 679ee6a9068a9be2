"""`python -m mugv.torch_backend.cli` (what torchrun launches) = the `mugv` command."""
from mugv.torch_backend.cli import main

raise SystemExit(main())
