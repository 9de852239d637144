"""Config values are checked against their SCHEMA domain before any data or model loads; bad config
files and bad values are one line on the command line."""
import re

import ml_collections
import pytest

from jaxtune import JaxtuneError, config
from jaxtune.cli import main

REQUIRED = {"model.path", "data.train"}  # empty by default: every preset sets them


def make(**values) -> ml_collections.ConfigDict:
    """A config with any value of any type, as a preset could build it (past ml_collections' type lock)."""
    flat = {key: default for key, default, *_ in config.SCHEMA}
    flat.update({"model.path": "model", "data.train": "train.jsonl"}, **values)
    root: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return ml_collections.ConfigDict(root)


def test_a_complete_config_passes():
    config.validate(make(**{"train.lr": "2e-4", "mesh.data": -1, "mesh.fsdp": 1, "data.val_fraction": 0.1,
                            "resume.allow_changes": "train.max_steps, train.lr", "train.max_grad_norm": 0.0}))


@pytest.mark.parametrize("key, value", [
    ("train.lr", "-1e-4"), ("train.lr", "0"), ("train.lr", "inf"), ("train.lr", "nan"), ("train.lr", "fast"),
    ("train.micro_batch_size", 0), ("train.micro_batch_size", True), ("train.micro_batch_size", 2.0),
    ("train.grad_accum_steps", 0), ("log.every_steps", 0), ("checkpoint.every_steps", 0), ("checkpoint.keep", 0),
    ("eval.every_steps", -1), ("eval.max_new_tokens", 0), ("data.seq_len", 0), ("data.seq_len", 1),
    ("train.max_steps", -1), ("train.epochs", 0.0), ("train.epochs", float("nan")), ("train.warmup_steps", -1),
    ("data.val_fraction", 1.0), ("data.val_fraction", -0.1), ("lora.dropout", 1.0), ("lora.rank", 0),
    ("lora.alpha", 0.0), ("train.b1", 1.0), ("train.b2", -0.1), ("train.weight_decay", -0.1),
    ("train.max_grad_norm", float("inf")), ("train.base_lr", 0.0), ("train.pretrained_batch_tokens", 0),
    ("train.loss_chunk", 0), ("mesh.tensor", 0), ("mesh.data", -2), ("seed", -1), ("log.progress", "yes"),
    ("method", "lroa"), ("data.format", "sharegpt"), ("model.path", ""), ("data.train", ""), ("workdir", ""),
])
def test_a_value_out_of_its_domain_is_an_error(key, value):
    with pytest.raises(JaxtuneError, match=rf"^{re.escape(key)}={re.escape(repr(value))}: must be "):
        config.validate(make(**{key: value}))


def test_every_default_is_in_its_domain():
    bad = {key for key, default, _, domain in config.SCHEMA if domain.check(default)}
    assert bad == REQUIRED


def test_at_most_one_mesh_axis_takes_the_remaining_devices():
    with pytest.raises(JaxtuneError, match=r"mesh.data=-1, mesh.fsdp=-1, mesh.context=1, mesh.tensor=1: at most one"):
        config.validate(make(**{"mesh.data": -1, "mesh.fsdp": -1}))


def test_resume_allow_changes_names_known_keys():
    with pytest.raises(JaxtuneError, match=r"^resume.allow_changes='train.lr,train.stpes': unknown key\(s\) "
                                           r"\['train.stpes'\]"):
        config.validate(make(**{"resume.allow_changes": "train.lr,train.stpes"}))


def test_keys_shows_each_domain():
    lines = {line.split()[0]: line for line in config.describe().splitlines()}
    assert "a finite number > 0 or 'auto'" in lines["train.lr"]
    assert "a number in [0, 1)" in lines["lora.dropout"]
    assert "comma-separated config keys" in lines["resume.allow_changes"]


PRESET = ("from jaxtune.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
          "    c.model.path = 'model'\n    c.data.train = 'train.jsonl'\n    return c\n")


@pytest.mark.parametrize("text, overrides, expected", [
    (PRESET, ["--config.train.lr=-1e-4"], "train.lr='-1e-4': must be a finite number > 0 or 'auto'"),
    (PRESET, ["--config.train.micro_batch_size=0"], "train.micro_batch_size=0: must be an integer >= 1"),
    (PRESET, ["--config.train.max_steps=abc"], "--config.train.max_steps=abc"),
    (PRESET, ["--config.train.stpes=3"], "unknown config key(s) ['train.stpes']"),
    (None, [], "{file}: no such config file"),
    (PRESET.replace("def get_config()", "def get_config(:"), [], "{file}:4: syntax error"),
    ("x = 1\n", [], "{file}: defines no get_config()"),
    ("def get_config():\n    return 1 / 0\n", [], "{file}:2: ZeroDivisionError: division by zero"),
    ("def get_config():\n    pass\n", [], "{file}: get_config() returned NoneType, not a ConfigDict"),
])
def test_cli_bad_config_is_one_line(text, overrides, expected, tmp_path, capsys, monkeypatch):
    import jaxtune.train.loop

    monkeypatch.setattr(jaxtune.train.loop, "train", lambda cfg: pytest.fail("a bad config reached training"))
    path = tmp_path / "preset.py"
    if text is not None:
        path.write_text(text)
    assert main(["train", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert expected.format(file=path) in err
    assert len(err.strip().splitlines()) <= 3 and "Traceback" not in err
