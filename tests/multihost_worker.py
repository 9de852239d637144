"""One of two processes acting as TPU hosts (run by test_multihost.py): jax.distributed over gloo."""
import json
import sys

import jax
import numpy as np

process_id, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from jaxtune import sharding  # noqa: E402
from jaxtune.data import loader  # noqa: E402

rows = {name: np.arange(16 * 4, dtype=np.int32).reshape(16, 4) * (k + 1)
        for k, name in enumerate(("tokens", "targets", "weights", "segment_ids", "positions"))}
mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
batches = loader.Batches(rows, 8, seed=3)
local, _ = batches.next_step()
batch_sharding = sharding.named_sharding(("batch", "length"), (8, 4), mesh)
batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
local_rows = batches.local_indices(0, 0).tolist()
total = int(jax.jit(lambda t: t.sum())(batch["tokens"]))  # a cross-host reduction over the global array
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "local_rows": local_rows,
                  "global_shape": list(batch["tokens"].shape), "sum": total,
                  "expected": int(rows["tokens"][batches.order(0)[:8]].sum())}))
