"""Two local processes with jax.distributed behave like two TPU hosts: each feeds its own slice."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port, without_compilation_cache


def two_workers(worker: str, devices: int, args) -> list[dict]:
    """`worker` (a script beside this file) as processes 0 and 1 of one jax.distributed job, each with
    `devices` CPU devices and argv `i PORT *args(i)`: the JSON each prints last, process 0 first."""
    port = str(free_port())
    env = without_compilation_cache({**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                                     "JAX_PLATFORMS": "cpu"})
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name(worker)), str(i), port, *args(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(outs, key=lambda o: o["process"])


def test_two_hosts_feed_one_global_batch():
    a, b = two_workers("multihost_worker.py", 2, lambda i: [])
    assert a["devices"] == b["devices"] == 4 and a["global_shape"] == [8, 4]
    assert len(a["local_rows"]) == len(b["local_rows"]) == 4
    assert set(a["local_rows"]).isdisjoint(b["local_rows"])
    assert a["sum"] == b["sum"] == a["expected"]


def test_two_hosts_tokenize_half_each_and_read_the_batches_of_one(smollm2_dir, chat_data, tmp_path):
    """Two processes as the hosts of a pod, each with its own cache directory: each tokenizes about half of
    the 100 conversations (chunks of 7, alternately), both end with the cache one process builds, byte for
    byte, hence the same global batches."""
    import hashlib

    import numpy as np

    from jaxtune.data import loader
    from jaxtune.data.formats import FormatOptions

    src = str(chat_data / "train.jsonl")
    lines = Path(src).read_text().splitlines(keepends=True)[:20]
    bad = tmp_path / "bad.jsonl"  # line 10 is in chunk 1 (records 8-14): host 1 tokenizes it, host 0 skips it
    bad.write_text("".join(lines[:9]) + '{"messages": [{"role": "user", "content": null}]}\n' + "".join(lines[10:]))
    a, b = two_workers("multihost_data_worker.py", 1,
                       lambda i: [src, str(tmp_path / f"host{i}"), str(smollm2_dir), str(bad)])
    assert (a["records_tokenized"] - 7, b["records_tokenized"] - 7) == (7 * 7 + 2, 7 * 7)  # chunks 0, 2, .., 14 and
    # 1, .., 13 of the good data, then chunk 0 / 1 of the bad: host 1 meets the bad record, and both stop on it
    assert b["error"] == f"{bad}:10: messages[0].content is null, expected a string; fix or remove that record"
    assert a["error"] == f"host 1: {b['error']}"
    opts = FormatOptions("chat", seq_len=256, overlong="split")
    one = loader.tokenize_sources([src], str(smollm2_dir), opts, cache_dir=tmp_path / "one", progress=False)
    assert a["cache"] == b["cache"] == hashlib.sha256(np.asarray(one.ids).tobytes() + np.asarray(one.weights).tobytes()
                                                      + one.offsets.tobytes()).hexdigest()
    assert a["counters"] == b["counters"] == one.counters()
    packed = loader.build([src], str(smollm2_dir), opts, val_fraction=0.1, seed=5, cache_dir=tmp_path / "one",
                          progress=False)
    order = loader.Batches(packed.train, 4, seed=1).order(0)
    expected = []
    for step in range(3):
        rows = packed.train.take(order[step * 4:(step + 1) * 4])
        expected.append(hashlib.sha256(b"".join(rows[k].tobytes() for k in sorted(rows))).hexdigest())
    assert a["batches"] == b["batches"] == expected


def start_job(config_file, processes: int, devices_per_process: int, *extra):
    """`jaxtune train` as a job of `processes` local processes (gloo on 127.0.0.1), each with its own
    CPU devices, as the hosts of a pod run it; returns the Popen objects, process 0 first."""
    port = str(free_port())
    env = without_compilation_cache({**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                                     "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"})
    flags = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                       "--process-id", str(i)] if processes > 1 else []
    return [subprocess.Popen([sys.executable, "-m", "jaxtune.cli", "train", *flags(i), str(config_file), *extra],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def finish(procs, timeout=400):
    results = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], results


def metric_lines(workdir):
    from jaxtune.paths import run_path

    return [json.loads(line) for line in (run_path(workdir) / "metrics.jsonl").read_text().splitlines()]


def without_clock(events):
    return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in events]


def test_two_processes_train_like_one_and_stop_together(tiny_dir, chat_data, tmp_path, bucket):
    """The real `jaxtune train` as 2 processes x 4 CPU devices = one 8-device mesh, its workdir in a
    bucket as on a pod: the losses of the 1-process x 8-device run; both processes save and restore
    through gs://, process 0 alone writes metrics.jsonl; SIGTERM to process 1 alone makes both save the
    same step and exit 75; re-running both resumes to exactly the uninterrupted losses."""
    import signal

    from conftest import run_config, write_config_file

    from jaxtune.train.loop import train

    def config(name, steps=20, workdir=None):
        cfg = run_config(tiny_dir, chat_data, workdir or tmp_path / name, **{
            "mesh.fsdp": -1, "train.micro_batch_size": 8, "train.max_steps": steps, "log.every_steps": 1,
            "eval.every_steps": 10, "checkpoint.every_steps": 10})
        return cfg, write_config_file(tmp_path / f"{name}.py", cfg)

    train(config("one")[0])  # 1 process x 8 devices: this test process (conftest forces 8 CPU devices)
    two_dir = f"{bucket}/multihost/two"
    codes, outs = finish(start_job(config("two", workdir=two_dir)[1], 2, 4))
    assert codes == [0, 0], [err[-3000:] for _, err in outs]
    one, two = metric_lines(tmp_path / "one"), metric_lines(two_dir)
    assert [(e["step"], sorted(e)) for e in one] == [(e["step"], sorted(e)) for e in two]  # no line twice
    for a, b in zip(one, two):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a, b)
    assert "process 1 of 2: training; process 0 reports" in outs[1][1] and outs[1][0] == ""

    # Context parallelism over both hosts (mesh.context=8: every row split over all 8 devices): both processes
    # are given the same rows and each puts its own devices' pieces; the losses of the same mesh in one process.
    cfg, path = config("context", steps=6)
    with cfg.unlocked():
        cfg.mesh.fsdp, cfg.mesh.context, cfg.workdir = 1, -1, str(tmp_path / "context_one")
    train(cfg)
    codes, outs = finish(start_job(path, 2, 4, "--config.mesh.fsdp=1", "--config.mesh.context=-1"))
    assert codes == [0, 0], [err[-3000:] for _, err in outs]
    losses = lambda events: {e["step"]: e["loss"] for e in events if "loss" in e}  # noqa: E731
    one_context, two_context = losses(metric_lines(tmp_path / "context_one")), losses(metric_lines(tmp_path / "context"))
    assert sorted(two_context) == list(range(1, 7)), two_context
    assert all(abs(two_context[s] / one_context[s] - 1) <= 1e-5 for s in two_context), (one_context, two_context)

    stopped = tmp_path / "stopped"
    procs = start_job(config("stopped")[1], 2, 4)
    wait_until(procs, lambda: (stopped / "metrics.jsonl").is_file() and len(metric_lines(stopped)) >= 4)
    procs[1].send_signal(signal.SIGTERM)  # one host gets the preemption notice
    codes, outs = finish(procs)
    assert codes == [75, 75], [err[-3000:] for _, err in outs]
    saved = sorted(int(p.name) for p in (stopped / "checkpoints").iterdir() if p.name.isdigit())
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGTERM" and summary["steps"] == saved[-1] < 20

    # The resumed job loses a host (kill -9) while the final checkpoint is being written; the rest of
    # the slice goes down with it. The next run must resume from a complete checkpoint, never the partial.
    procs = start_job(tmp_path / "stopped.py", 2, 4)
    wait_until(procs, lambda: any(p.name.startswith("20") for p in (stopped / "checkpoints").iterdir()))
    procs[1].kill()
    procs[1].wait()
    time.sleep(2)
    procs[0].kill()
    finish(procs)
    codes, outs = finish(start_job(tmp_path / "stopped.py", 2, 4))
    assert codes == [0, 0], [err[-3000:] for _, err in outs]
    assert without_clock(metric_lines(stopped)) == without_clock(two)


def wait_until(procs, condition, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the job ended before the signal"
        time.sleep(0.05)
