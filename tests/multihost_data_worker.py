"""One of two processes acting as the hosts of a pod (run by test_multihost.py): the data tokenized across
both, each into its own cache directory, then the first global batches; then data with a bad record in the
other host's chunk."""
import hashlib
import json
import sys

import jax
import numpy as np

process_id, port, data, cache = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from jaxtune import JaxtuneError  # noqa: E402
from jaxtune.data import loader  # noqa: E402
from jaxtune.data.formats import Formatter, FormatOptions  # noqa: E402

tokenized, tokenize = [], Formatter.tokenize
Formatter.tokenize = lambda self, records, *a, **k: (tokenized.append(len(records)), tokenize(self, records, *a, **k))[1]
model, opts = sys.argv[5], FormatOptions("chat", seq_len=256, overlong="split")
built = loader.tokenize_sources([data], model, opts, cache_dir=cache, chunk_records=7, workers=1, progress=False)
packed = loader.build([data], model, opts, val_fraction=0.1, seed=5, cache_dir=cache, progress=False)
batches = loader.Batches(packed.train, 4, seed=1)
digests = []
for step in range(3):
    rows = packed.train.take(batches.order(0)[step * 4:(step + 1) * 4])
    digests.append(hashlib.sha256(b"".join(rows[k].tobytes() for k in sorted(rows))).hexdigest())
try:
    loader.tokenize_sources([sys.argv[6]], model, opts, cache_dir=cache, chunk_records=7, workers=1, progress=False)
    error = None
except JaxtuneError as e:
    error = str(e)
print(json.dumps({"process": jax.process_index(), "records_tokenized": sum(tokenized), "batches": digests, "error": error,
                  "cache": hashlib.sha256(np.asarray(built.ids).tobytes() + np.asarray(built.weights).tobytes()
                                          + built.offsets.tobytes()).hexdigest(), "counters": built.counters()}))
