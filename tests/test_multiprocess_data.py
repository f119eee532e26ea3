"""Two processes with `jax.distributed` read disjoint records and assemble one global batch."""

import json
import os
import subprocess
import sys

import pytest
from conftest import free_port



@pytest.mark.slow
def test_two_processes_read_disjoint_data(tmp_path):
    jsonl = tmp_path / "text.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"record {i} of the shared corpus"}) + "\n" for i in range(40)))
    port = str(free_port())
    worker = os.path.join(os.path.dirname(__file__), "multiprocess_data_worker.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, worker, str(i), port, str(jsonl), str(tmp_path / f"out{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert all(r["process_count"] == 2 for r in results)
    assert all(all(r["global_batch_holds_local_rows"]) for r in results)
    a, b = (set(r["texts"]) for r in results)
    assert len(a) == 8 and len(b) == 8  # 2 batches x 4 rows, no repeats within 40 records
    assert not a & b, f"both processes read {sorted(a & b)}"
    assert all(t.startswith("record ") for t in a | b)
