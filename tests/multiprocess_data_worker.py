"""One process of the two-process data test (run by test_multiprocess_data.py).

argv: process_id, coordinator port, jsonl path, output json path.
Each process reads its share of a JSONL text source through the full
pipeline, assembles global batches with `jax.make_array_from_process_local_data`
and records the texts it read plus what the global batch holds.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

process_id, port, jsonl, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from experiments.tiny import get_config  # noqa: E402
from mmjax.data.pipeline import default_tokenizer, make_dataset, to_global_arrays  # noqa: E402

c = get_config().data
c.seq_len, c.global_batch, c.pack_window = 32, 8, 1
c.mix_weights = (0.0, 0.0, 1.0)
c.sources.text = f"jsonl:{jsonl}"
tok = default_tokenizer(c)
it = iter(make_dataset(c, tok, batch_size=c.global_batch // jax.process_count(),
                       process_index=jax.process_index(), process_count=jax.process_count()))
mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
sharding = NamedSharding(mesh, PartitionSpec("data"))
texts, matches = [], []
for _ in range(2):
    local = next(it)
    texts += [tok.decode(row[row > 2]) for row in local["tokens"]]
    batch = to_global_arrays({"tokens": local["tokens"]}, {"tokens": sharding})
    gathered = multihost_utils.process_allgather(batch["tokens"], tiled=True)
    rows = slice(jax.process_index() * len(local["tokens"]), (jax.process_index() + 1) * len(local["tokens"]))
    matches.append(bool(np.array_equal(gathered[rows], local["tokens"])) and gathered.shape[0] == c.global_batch)
with open(out, "w") as f:
    json.dump({"texts": texts, "global_batch_holds_local_rows": matches,
               "process_count": jax.process_count()}, f)
jax.distributed.shutdown()
