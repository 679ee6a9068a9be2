"""Build a latent/text cache with the stand-in pool encoder (optionally slowed down), one process
or data parallel when RANK/WORLD_SIZE are set; appends "<array> <row>" to PROGRESS per row.
For the data-parallel cache kill test (test_faults_vae.py).

    python parity_tests/cache_dp_worker.py MANIFEST OUT PROGRESS DELAY_S
"""
from __future__ import annotations

import sys
import time


def main() -> None:
    import torch.distributed as dist

    from mugv.core.data import BucketSpec
    from mugv.torch_backend.data import cache, dataset, text
    from mugv.torch_backend.parallel.launch import init_distributed
    manifest, out, progress, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    init_distributed(timeout_s=120.0)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    index = dataset.build_index(manifest, (BucketSpec(32, 32, 9, 2, 16.0),))

    def slow_encoder(pixels):
        time.sleep(delay)
        return cache.pool_encoder(pixels)
    with open(progress, "a") as log:
        def on_row(name, row):
            log.write(f"{name} {row}\n")
            log.flush()
        cache.build_cache(index, out, slow_encoder, text.EmbeddedTextEncoder(32, 48, seed=3), "pool",
                          "embedded-32-48-seed3", batch=2, on_row=on_row, rank=rank, world=world,
                          barrier=dist.barrier if world > 1 else None)


if __name__ == "__main__":
    main()
