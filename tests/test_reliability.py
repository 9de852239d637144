"""Nothing a user types or a crash does loses a run; every mistake is one clear line.

One test (or more) per finding of the reliability issue, each reproducing it as a user would meet it:
kill -9 at several moments, damaged checkpoints and logs, changed configs on resume, two runs on one
workdir, full and read-only disks, code in a model directory, and `export --out` over things it must
never delete.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import jaxtune_cli, make_hf_model, run_config, write_config_file
from jaxtune import JaxtuneError
from jaxtune.cli import main
from jaxtune.train.loop import train

# eval every 2, checkpoints every 4: the best checkpoint runs ahead of the regular ones (finding 2)
RUN = {"eval.every_steps": 2, "checkpoint.every_steps": 4}


def losses(workdir):
    """metrics.jsonl without the wall-clock field."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    for needle in needles:
        assert needle in err, (needle, err)


def cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def straight(tiny_dir, chat_data, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    train(run_config(tiny_dir, chat_data, workdir, **RUN))
    return workdir


def fresh_copy(straight, tmp_path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    return workdir


def checkpoint_steps(workdir, kind="checkpoints"):
    return sorted(int(p.name) for p in (Path(workdir) / kind).iterdir() if p.name.isdigit())


# --- 1. export --out never deletes what jaxtune did not write ----------------------------------------

def test_export_refuses_to_replace_anything_but_its_own_export(straight, tmp_path, capsys):
    run = fresh_copy(straight, tmp_path)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    code, err = cli(["export", run, "--out", run, "--adapter", "--no-verify"], capsys)
    one_line_error(code, err, "workdir")
    code, err = cli(["export", run, "--out", tmp_path, "--adapter", "--no-verify"], capsys)  # contains the run
    one_line_error(code, err, "workdir")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before

    mine = tmp_path / "my_files"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, err = cli(["export", run, "--out", mine, "--adapter", "--no-verify", "--overwrite"], capsys)
    one_line_error(code, err, "did not write")
    assert (mine / "notes.txt").read_text() == "precious"

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = cli(["export", run, "--out", a_file, "--merged", "--no-verify"], capsys)
    one_line_error(code, err, "not a directory")

    out = tmp_path / "adapter"
    assert cli(["export", run, "--out", out, "--adapter", "--no-verify"], capsys)[0] == 0
    code, err = cli(["export", run, "--out", out, "--adapter", "--no-verify"], capsys)
    one_line_error(code, err, "--overwrite")
    code, err = cli(["export", run, "--out", out, "--merged", "--no-verify", "--overwrite"], capsys)
    one_line_error(code, err, "not a hf-model export")
    assert (out / "adapter_model.safetensors").is_file()
    assert cli(["export", run, "--out", out, "--adapter", "--no-verify", "--overwrite", "--step", "4"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "chat_template.jinja", "generation_config.json",
                                                     "jaxtune_export.json", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


# --- 2, 4. replaying after a crash, damaged checkpoints ----------------------------------------------

def test_resume_after_the_best_checkpoint_ran_ahead(straight, tiny_dir, chat_data, tmp_path):
    """A hard kill after the best checkpoint of step 6 was written but before the regular one was
    (async) leaves exactly this: best_checkpoint/6, checkpoints/4. The replay must not collide."""
    run = fresh_copy(straight, tmp_path)
    assert checkpoint_steps(run, "best_checkpoint") == [6] and checkpoint_steps(run) == [4, 6]
    shutil.rmtree(run / "checkpoints" / "6")
    train(run_config(tiny_dir, chat_data, run, **RUN))
    assert losses(run) == losses(straight)
    train(run_config(tiny_dir, chat_data, run, **RUN))  # and again: a finished run stays resumable
    assert losses(run) == losses(straight)


def corrupt_largest_array_file(checkpoint: Path):
    """Overwrite bytes in the middle of the biggest data file of the trainable parameters."""
    data = max((p for p in (checkpoint / "trainable").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = b"\xff" * 64
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["overwritten bytes", "missing file", "torn record"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(straight, tiny_dir, chat_data, tmp_path, damage, capsys):
    run = fresh_copy(straight, tmp_path)
    latest = run / "checkpoints" / "6"
    if damage == "overwritten bytes":
        corrupt_largest_array_file(latest)
    elif damage == "missing file":
        (latest / "opt_state" / "manifest.ocdbt").unlink()
    else:
        (latest / "meta" / "metadata").write_text('{"step": 6, "data_st')
    train(run_config(tiny_dir, chat_data, run, **RUN))
    out = capsys.readouterr().out
    assert f"checkpoint {latest} is damaged" in out and "resuming from step 4" in out
    assert (run / "damaged_checkpoints" / "6").is_dir()  # kept for the user, out of the way
    assert losses(run) == losses(straight)


def test_export_of_a_damaged_checkpoint_is_refused(straight, tmp_path, capsys):
    run = fresh_copy(straight, tmp_path)
    corrupt_largest_array_file(run / "checkpoints" / "6")
    code, err = cli(["export", run, "--out", tmp_path / "out", "--adapter", "--no-verify"], capsys)
    one_line_error(code, err, "damaged", "--step")
    assert not (tmp_path / "out").exists()


def test_every_checkpoint_damaged_is_an_error_that_moves_nothing(straight, tiny_dir, chat_data, tmp_path):
    run = fresh_copy(straight, tmp_path)
    for step in (4, 6):
        corrupt_largest_array_file(run / "checkpoints" / str(step))
    with pytest.raises(JaxtuneError, match="every checkpoint in .* is damaged"):
        train(run_config(tiny_dir, chat_data, run, **RUN))
    assert checkpoint_steps(run) == [4, 6]


# --- 3. a torn last line in metrics.jsonl ----------------------------------------------------------

def test_torn_metrics_line(straight, tiny_dir, chat_data, tmp_path, capsys):
    run = fresh_copy(straight, tmp_path)
    shutil.rmtree(run / "checkpoints" / "6")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 10.7')  # a kill during a write
    assert cli(["curves", run], capsys)[0] == 0
    train(run_config(tiny_dir, chat_data, run, **RUN))
    assert losses(run) == losses(straight)

    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, err = cli(["curves", run], capsys)
    one_line_error(code, err, "metrics.jsonl:3")


# --- 5. a resume must be the same run ------------------------------------------------------------

def config_json_bytes(run):
    return (run / "config.json").read_bytes()


def test_resume_refuses_another_base_model_with_the_same_shapes(straight, tiny_dir, chat_data, tmp_path):
    run = fresh_copy(straight, tmp_path)
    other, _ = make_hf_model(tmp_path / "other", seed=1, vocab_size=49152, num_key_value_heads=2,
                             tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_dir / name, other / name)
    before = config_json_bytes(run)
    with pytest.raises(JaxtuneError, match="not the base model the checkpoints"):
        train(run_config(other, chat_data, run, **RUN))
    assert config_json_bytes(run) == before


@pytest.mark.parametrize("change, needle", [
    ({"lora.rank": 8}, "lora.rank changed from 16 to 8"),
    ({"lora.targets": "q_proj,v_proj"}, "lora.targets changed"),
    ({"method": "full"}, "method changed"),
    ({"data.seq_len": 96}, "data"),
    ({"train.lr": "2e-3"}, "--config.resume.allow_changes=train.lr"),
])
def test_resume_refuses_a_changed_run_in_one_line(straight, tiny_dir, chat_data, tmp_path, capsys, change, needle):
    run = fresh_copy(straight, tmp_path)
    before = config_json_bytes(run)
    cfg_file = write_config_file(tmp_path / "cfg.py", run_config(tiny_dir, chat_data, run, **{**RUN, **change}))
    code, err = cli(["train", cfg_file], capsys)
    one_line_error(code, err, "resume refused", needle)
    assert config_json_bytes(run) == before


def test_an_allowed_change_resumes(straight, tiny_dir, chat_data, tmp_path):
    run = fresh_copy(straight, tmp_path)
    summary = train(run_config(tiny_dir, chat_data, run, **{**RUN, "train.max_steps": 8,
                                                             "resume.allow_changes": "train.max_steps"}))
    assert summary["steps"] == 8 and losses(run)[:len(losses(straight))] == losses(straight)
    assert json.loads(config_json_bytes(run))["train"]["max_steps"] == 8


def test_max_steps_below_the_step_reached_is_refused_and_the_record_kept(straight, tiny_dir, chat_data, tmp_path,
                                                                         capsys):
    """Before: allowed, it rewrote config.json with the lower value, so the next resume with the true one
    was refused."""
    run = fresh_copy(straight, tmp_path)
    before = config_json_bytes(run)
    cfg_file = write_config_file(tmp_path / "cfg.py", run_config(tiny_dir, chat_data, run, **{
        **RUN, "train.max_steps": 2, "resume.allow_changes": "train.max_steps"}))
    code, err = cli(["train", cfg_file], capsys)
    one_line_error(code, err, "train.max_steps=2 is below step 6, where the checkpoints")
    assert config_json_bytes(run) == before


def test_wrong_model_path_is_refused_before_anything_is_written(straight, chat_data, tmp_path, capsys):
    run = fresh_copy(straight, tmp_path)
    bigger, _ = make_hf_model(tmp_path / "bigger", hidden_size=96)
    before = config_json_bytes(run)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(json.loads(before)["model"]["path"]) / name, bigger / name)
    cfg_file = write_config_file(tmp_path / "cfg.py", run_config(bigger, chat_data, run, **RUN))
    code, err = cli(["train", cfg_file], capsys)
    one_line_error(code, err, "not the base model")
    assert config_json_bytes(run) == before


# --- 6. one training per workdir ------------------------------------------------------------------

def test_second_training_on_a_workdir_is_refused_and_a_dead_lock_holder_frees_it(tiny_dir, chat_data, tmp_path,
                                                                                  capsys):
    import sys

    workdir = tmp_path / "w"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from jaxtune.train.run_dir import WorkdirLock; l = WorkdirLock(Path(sys.argv[1])); "
                               "l.__enter__(); print('locked', flush=True); time.sleep(600)", str(workdir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg_file = write_config_file(tmp_path / "cfg.py", run_config(tiny_dir, chat_data, workdir, **{
            "train.max_steps": 2, "eval.every_steps": 0}))
        code, err = cli(["train", cfg_file], capsys)
        one_line_error(code, err, "in use by another training", f"pid {holder.pid}")
        assert not (workdir / "metrics.jsonl").exists()
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock with the process
        holder.wait()
    assert cli(["train", cfg_file], capsys)[0] == 0


# --- 7. full and read-only disks --------------------------------------------------------------------

def can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare -rm and tmpfs mounts (user namespaces)")
@pytest.mark.parametrize("noticed_by", ["space check", "background save"])
def test_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tiny_dir, chat_data, tmp_path, noticed_by):
    """A real full disk: the workdir is a 1.2 MB tmpfs that holds two checkpoints. The run stops with
    one line and a checkpoint that restores, whether the space check before a save notices, or (with
    that check blinded) the asynchronous write fails in the background."""
    import sys

    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    cfg = run_config(tiny_dir, chat_data, disk / "run", **{"checkpoint.every_steps": 1, "checkpoint.keep": 20,
                                                            "eval.every_steps": 0, "train.max_steps": 12})
    cfg_file = write_config_file(tmp_path / "cfg.py", cfg)
    blind = "c.shutil.disk_usage = lambda p: type('U', (), {'free': 1 << 40})(); " if noticed_by != "space check" else ""
    program = (f"import sys; import jaxtune.train.checkpoint as c; {blind}"
               f"from jaxtune.cli import main; sys.exit(main(['train', {str(cfg_file)!r}]))")
    script = (f"mount -t tmpfs -o size=1200k tmpfs {disk} && {sys.executable} -c \"{program}\"; rc=$?; "
              f"cp -r {disk}/run {saved}; exit $rc")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                            env={**os.environ, "XLA_FLAGS": ""}, timeout=600)
    one_line_error(result.returncode, result.stderr, "saving the checkpoint", str(disk / "run"), "space")
    kept = checkpoint_steps(saved)
    assert kept, result.stderr
    assert f"the last complete checkpoint is step {kept[-1]}" in result.stderr
    cfg.workdir = str(saved)
    cfg.train.max_steps = kept[-1]
    cfg.resume.allow_changes = "train.max_steps"
    assert train(cfg)["steps"] == kept[-1]  # it restores (and verifies)


def test_unwritable_workdir_fails_before_the_model_loads(tiny_dir, chat_data, tmp_path, capsys, monkeypatch):
    import jaxtune.train.loop as loop

    monkeypatch.setattr(loop, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model first"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg_file = write_config_file(tmp_path / "cfg.py", run_config(tiny_dir, chat_data, blocker / "run"))
    code, err = cli(["train", cfg_file], capsys)
    one_line_error(code, err, "not writable", str(blocker / "run"))


# --- 8. no code from a model directory runs -----------------------------------------------------

@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_model_directory_code_never_runs(tiny_dir, chat_data, tmp_path, capsys, where):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    pwned = tmp_path / "PWNED"
    (model / "evil.py").write_text(f"open({str(pwned)!r}, 'w').write('ran')\n")
    meta = json.loads((model / where).read_text())
    meta["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]} if where.startswith("tokenizer") else \
        {"AutoModelForCausalLM": "evil.EvilModel"}
    (model / where).write_text(json.dumps(meta))
    cfg_file = write_config_file(tmp_path / "cfg.py", run_config(model, chat_data, tmp_path / "w"))
    for args in (["generate", model, "--prompt", "hi"], ["train", cfg_file],
                 ["preflight", chat_data / "train.jsonl", "--model", model], ["verify", model]):
        code, err = cli(args, capsys)
        one_line_error(code, err, "custom code", where)
    assert not pwned.exists()


# --- 11. one line where a traceback was ---------------------------------------------------------------

def test_empty_model_directory_is_one_line(chat_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg_file = write_config_file(tmp_path / "cfg.py", run_config(empty, chat_data, tmp_path / "w"))
    for args in (["generate", empty, "--prompt", "hi"], ["train", cfg_file],
                 ["preflight", chat_data / "train.jsonl", "--model", empty]):
        code, err = cli(args, capsys)
        one_line_error(code, err, "config.json")


def test_nan_before_any_checkpoint_says_so(tiny_dir, chat_data, tmp_path):
    with pytest.raises(JaxtuneError, match=r"at step 1: training stopped. No checkpoint was saved before it"):
        train(run_config(tiny_dir, chat_data, tmp_path / "w", **{"train.lr": "1e30", "train.warmup_steps": 0,
                                                                  "eval.every_steps": 0}))


# --- kill -9 at several moments, SIGTERM, and exit codes -------------------------------------------------

def wait_for(proc, condition, what, timeout=300):
    start = time.time()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()}")
        if time.time() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric_steps(workdir):
    try:
        return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
                if line.endswith("}")]
    except (OSError, ValueError):
        return []


def test_kill_at_several_moments_then_resume_equals_one_run(tiny_dir, chat_data, tmp_path):
    """The same command, killed with SIGKILL at several moments (eval on) and once stopped with
    SIGTERM (exit 75, a checkpoint), then run to the end: the metrics equal those of an
    uninterrupted run of the same command."""
    cfg = run_config(tiny_dir, chat_data, tmp_path / "straight", **{**RUN, "train.max_steps": 8})
    proc = jaxtune_cli("train", write_config_file(tmp_path / "straight.py", cfg))
    assert proc.wait() == 0, proc.stderr.read()

    workdir = tmp_path / "killed"
    cfg_file = write_config_file(tmp_path / "killed.py", run_config(tiny_dir, chat_data, workdir, **{
        **RUN, "train.max_steps": 8}))
    moments = [
        ("the baseline eval is logged", lambda: 0 in metric_steps(workdir), signal.SIGKILL),
        ("the best checkpoint of step 2 exists", lambda: (workdir / "best_checkpoint" / "2").exists(), signal.SIGKILL),
        ("step 5 is logged", lambda: 5 in metric_steps(workdir), signal.SIGTERM),
        ("a checkpoint save of step 8 is under way", lambda: any(
            p.name.startswith("8") for d in ("checkpoints", "best_checkpoint") if (workdir / d).is_dir()
            for p in (workdir / d).iterdir()), signal.SIGKILL),
    ]
    for what, condition, sig in moments:
        proc = jaxtune_cli("train", cfg_file)
        try:
            wait_for(proc, condition, what)
            proc.send_signal(sig)
            if sig == signal.SIGTERM:  # a clean stop: a checkpoint, and "resume me" for a retry wrapper
                assert proc.wait(timeout=300) == 75, proc.stderr.read()
                stopped = json.loads((workdir / "summary.json").read_text())
                assert stopped["stopped_by_signal"] == "SIGTERM"
                assert checkpoint_steps(workdir)[-1] == stopped["steps"] < 8
        finally:
            proc.kill()
            proc.wait()
    proc = jaxtune_cli("train", cfg_file)
    assert proc.wait() == 0, proc.stderr.read()
    assert losses(workdir) == losses(tmp_path / "straight")


# --- round 3: one line, in seconds, before any data work --------------------------------------------------

@pytest.mark.parametrize("devices", ["-1", "abc", "0"])
def test_estimate_refuses_a_device_count_that_is_not_one(tiny_dir, chat_data, tmp_path, capsys, devices):
    """Before: -1 a TypeError, abc a ValueError traceback, 0 silently all the devices visible."""
    cfg_file = write_config_file(tmp_path / "cfg.py", run_config(tiny_dir, chat_data, tmp_path / "run"))
    code, err = cli(["estimate", cfg_file, f"--devices={devices}"], capsys)
    one_line_error(code, err, f"--devices={devices}: a number of devices, 1 or more")


def test_a_length_past_the_model_warns_and_an_absurd_one_is_refused_before_the_data(tiny_dir, chat_data,
                                                                                    tmp_path, capsys):
    """The tiny model has max_position_embeddings=512. Before: no word at 1024, and `estimate` with
    seq_len=100000000 had no answer after 300 s (train tokenized the data first)."""
    code = main(["estimate", str(write_config_file(tmp_path / "long.py", run_config(
        tiny_dir, chat_data, tmp_path / "run", **{"data.seq_len": 1024})))])
    assert code == 0
    assert "warning: data.seq_len=1024 is above the max_position_embeddings=512" in capsys.readouterr().out
    absurd = write_config_file(tmp_path / "absurd.py", run_config(tiny_dir, chat_data, tmp_path / "run2",
                                                                  **{"data.seq_len": 100_000_000}))
    for command in ("estimate", "train"):
        start = time.monotonic()
        code, err = cli([command, absurd], capsys)
        one_line_error(code, err, "data.seq_len=100000000 is 195,312x the max_position_embeddings=512")
        assert time.monotonic() - start < 30
    assert not (tmp_path / "run2").exists()


def test_an_attention_kernel_this_platform_lacks_is_refused_before_anything_is_written(tiny_dir, chat_data,
                                                                                     tmp_path, capsys):
    """Before: model.attention=splash on CPU failed after the data preflight and left empty checkpoint
    directories behind."""
    cfg_file = write_config_file(tmp_path / "cfg.py", run_config(tiny_dir, chat_data, tmp_path / "run", **{
        "model.attention": "splash"}))
    code, err = cli(["train", cfg_file], capsys)
    one_line_error(code, err, "model.attention='splash' runs on tpu, not cpu")
    assert not (tmp_path / "run").exists()
