"""Two local processes with jax.distributed behave like two TPU hosts: each feeds its own slice."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_feed_one_global_batch():
    port = str(free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    worker = Path(__file__).with_name("multihost_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = sorted(outs, key=lambda o: o["process"])
    assert a["devices"] == b["devices"] == 4 and a["global_shape"] == [8, 4]
    assert len(a["local_rows"]) == len(b["local_rows"]) == 4
    assert set(a["local_rows"]).isdisjoint(b["local_rows"])
    assert a["sum"] == b["sum"] == a["expected"]
