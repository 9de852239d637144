"""Every training key, its default, a one-line help and its domain (the values it accepts), in one
table; `validate` checks every value against it before any data or model loads. Configs are data: a preset
is a `get_config()` that starts from `base_config()` and changes values; overrides come from the
command line as `--config.train.lr=1e-4`. The config is locked, so an unknown key is an error.

Lists are comma-separated strings so that every key can be overridden from the command line.
"""
from __future__ import annotations

import json
import math
import runpy
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

import ml_collections

from jaxtune.data.formats import FORMATS, OVERLONG
from jaxtune.errors import JaxtuneError
from jaxtune.attention import BACKENDS as ATTENTION_BACKENDS
from jaxtune.models.llama import DTYPES, LINEAR_MODULES, REMAT_POLICIES


class Domain(NamedTuple):
    """The values a key accepts: `text` names them (in errors and `jaxtune keys`), `check` returns
    what is wrong with a value, or None."""
    text: str
    check: Callable[[object], str | None]


def _domain(text: str, ok: Callable[[object], bool]) -> Domain:
    return Domain(text, lambda v: None if ok(v) else f"must be {text}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not a batch size


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _positive_number_text(v) -> bool:
    """'2e-4' yes; '-1e-4', '0', 'inf', 'nan', 'fast' no."""
    try:
        return 0 < float(v) < math.inf
    except ValueError:
        return False


def integer(lo: int) -> Domain:
    return _domain(f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo)


def one_of(*choices: str) -> Domain:
    return _domain(f"one of {' | '.join(choices)}", lambda v: isinstance(v, str) and v in choices)


def text(what: str = "a string", *, empty: bool = True) -> Domain:
    return _domain(what, lambda v: isinstance(v, str) and (empty or bool(v.strip())))


def _known_keys(v) -> str | None:
    if not isinstance(v, str):
        return "must be comma-separated config keys"
    unknown = [k for k in split_list(v) if k not in HELP]
    return f"unknown key(s) {unknown}; see `jaxtune keys`" if unknown else None


POSITIVE = _domain("a finite number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE = _domain("a finite number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = _domain("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
FLAG = _domain("true or false", lambda v: isinstance(v, bool))


def one_of_ints(*choices: int) -> Domain:
    return _domain(f"one of {' | '.join(map(str, choices))}", lambda v: _is_int(v) and v in choices)


def _linear_modules(v) -> str | None:
    if not isinstance(v, str):
        return "must be comma-separated module names"
    unknown = [m for m in split_list(v) if m not in LINEAR_MODULES]
    return f"unknown module(s) {unknown}; linear modules are {', '.join(LINEAR_MODULES)}" if unknown else None


KEYS_OF_MODULES = Domain("comma-separated linear module names", _linear_modules)
LR = _domain("a finite number > 0 or 'auto'", lambda v: isinstance(v, str) and (v == "auto" or _positive_number_text(v)))
MESH_AXIS = _domain("-1 or an integer >= 1", lambda v: _is_int(v) and (v == -1 or v >= 1))
KEYS = Domain("comma-separated config keys", _known_keys)
DTYPE = one_of(*DTYPES)

SCHEMA = [
    # key, default, help, domain
    ("workdir", "runs/default", "run directory (a local path, or gs://bucket/run for a pod: every host reaches it): "
                              "config.json, metrics.jsonl, curves.png, summary.json, checkpoints/",
     text("a non-empty path", empty=False)),
    ("seed", 0, "seed for LoRA init, dropout and data order", integer(0)),
    ("method", "lora", "'lora' (frozen base + LoRA factors), 'qlora' (LoRA on a frozen NF4 base) or 'full' "
                       "(every weight trains)", one_of("lora", "qlora", "full")),
    ("model.path", "", "Hugging Face model directory (config.json + safetensors), or a hub id when online",
     text("a model directory or hub id", empty=False)),
    ("model.dtype", "float32", "compute dtype", DTYPE),
    ("model.param_dtype", "float32", "storage dtype of the (frozen) weights", DTYPE),
    ("model.remat", "auto", "activation recomputation per layer: 'auto' ('dots' on CPU; on an accelerator the least "
                            "that fits, by the estimate; the run log says which), 'none', 'dots' (keep the outputs of "
                            "matmuls and attention), 'full' (keep only each layer's input), 'offload' (as 'full', that input in "
                            "host memory: TPU/GPU)", one_of("auto", *REMAT_POLICIES)),
    ("model.attention", "auto", "attention backend: 'auto' (the best this platform runs; the run log says which), "
                                "'xla' (einsum, any platform), 'blocked' (skips masked blocks), 'cudnn' or 'pallas' "
                                "(GPU), 'splash' (TPU)", one_of(*ATTENTION_BACKENDS)),
    ("model.verify", False, "before training, check jaxtune's logits against transformers on this model (needs torch)",
     FLAG),
    ("lora.rank", 16, "LoRA rank r", integer(1)),
    ("lora.alpha", 32.0, "LoRA alpha; scale = alpha/r (alpha/sqrt(r) with rslora)", POSITIVE),
    ("lora.dropout", 0.05, "dropout on the LoRA input during training", FRACTION),
    ("lora.targets", "all-linear", "'all-linear', HF module names 'q_proj,v_proj', or 're:REGEX'",
     text("a non-empty string", empty=False)),
    ("lora.rslora", False, "rank-stabilised scale alpha/sqrt(r)", FLAG),
    ("lora.init_from", "", "start from this PEFT adapter dir (peft/axolotl/unsloth); its r/alpha/targets win", text()),
    ("lora.modules_to_save", "", "modules trained in full beside LoRA: 'embed_tokens,lm_head' (new syntax/tokens)",
     text()),
    ("quant.block_size", 64, "qlora: NF4 block size (weights per float32 scale), as bitsandbytes",
     one_of_ints(64, 128, 256)),
    ("quant.double_quant", True, "qlora: quantize the block scales too (8-bit, blocks of 256): 0.127 bits/param "
                                 "instead of 0.5", FLAG),
    ("quant.dense_modules", "", "qlora: linear modules kept dense (e.g. 'down_proj'); embeddings, norms and "
                                "lm_head always are", KEYS_OF_MODULES),
    ("data.train", "", "training data: comma-separated files (.jsonl/.json/.csv/.parquet), hub names or tfds:NAME",
     text("one or more training data files", empty=False)),
    ("data.val", "", "validation data files (comma-separated); empty: hold out data.val_fraction", text()),
    ("data.val_fraction", 0.0, "share of training samples held out for validation when data.val is empty", FRACTION),
    ("data.format", "chat", "record format", one_of(*FORMATS)),
    ("data.seq_len", 2048, "tokens per packed row (a row of one token predicts nothing)", integer(2)),
    ("data.train_on_inputs", False, "also supervise prompts / user turns", FLAG),
    ("data.overlong", "truncate", "samples longer than seq_len", one_of(*OVERLONG)),
    ("data.chat_template", "", "'' = the tokenizer's, 'chatml', or a jinja template", text()),
    ("train.micro_batch_size", 8, "rows per micro-step over the whole mesh (global, not per device)", integer(1)),
    ("train.grad_accum_steps", 1, "micro-steps per optimizer update (optax.MultiSteps), token-weighted", integer(1)),
    ("train.max_steps", 0, "optimizer updates; 0 = train.epochs over the data", integer(0)),
    ("train.epochs", 1.0, "passes over the training data when max_steps is 0", POSITIVE),
    ("train.lr", "auto", "peak learning rate: a number, or 'auto' = base_lr*sqrt(supervised tokens per step / "
                         "pretrained_batch_tokens)", LR),
    ("train.base_lr", 3e-4, "lr='auto': the model's pretraining learning rate (Llama-2: 3e-4)", POSITIVE),
    ("train.pretrained_batch_tokens", 4_000_000, "lr='auto': the model's pretraining batch in tokens", integer(1)),
    ("train.schedule", "cosine", "learning-rate shape after warmup (linear and cosine decay to 0)",
     one_of("constant", "linear", "cosine")),
    ("train.warmup_steps", 0, "linear warmup from 0, in optimizer updates", integer(0)),
    ("train.weight_decay", 0.0, "AdamW decoupled weight decay (never on norms and biases)", NON_NEGATIVE),
    ("train.max_grad_norm", 1.0, "clip the global gradient norm; 0 = off", NON_NEGATIVE),
    ("train.b1", 0.9, "AdamW beta1", FRACTION),
    ("train.b2", 0.999, "AdamW beta2", FRACTION),
    ("train.loss_chunk", 256, "tokens per chunk of the float32 loss, so B x T x vocab logits never exist at once",
     integer(1)),
    ("eval.every_steps", 100, "evaluate on the validation data every N optimizer updates (0 = only at the end)",
     integer(0)),
    ("eval.max_batches", 0, "cap on validation batches per eval (0 = all)", integer(0)),
    ("eval.early_stopping_patience", 0, "stop after N evals without a new best eval loss (0 = never)", integer(0)),
    ("eval.prompt", "", "a chat prompt answered before and after training (empty = none)", text()),
    ("eval.max_new_tokens", 48, "length of that reply", integer(1)),
    ("checkpoint.every_steps", 500, "save every N optimizer updates (and at the end, on SIGTERM/SIGINT/SIGHUP)", integer(1)),
    ("checkpoint.keep", 2, "keep the last N checkpoints (the best one is kept apart)", integer(1)),
    ("log.every_steps", 10, "write a metrics.jsonl line (and read the loss from the device) every N updates",
     integer(1)),
    ("log.tensorboard", False, "also write TensorBoard events to workdir/tensorboard", FLAG),
    ("log.progress", True, "show the progress bar", FLAG),
    ("mesh.data", 1, "data-parallel mesh axis (-1 = the remaining devices)", MESH_AXIS),
    ("mesh.fsdp", -1, "fully sharded data-parallel axis (-1 = the remaining devices)", MESH_AXIS),
    ("mesh.context", 1, "context-parallel axis: each row's tokens split over this many devices, for rows too "
                        "long for one (docs/long-context.md)", MESH_AXIS),
    ("mesh.tensor", 1, "tensor-parallel axis (heads, MLP columns)", MESH_AXIS),
    ("resume.allow_changes", "", "comma-separated keys whose change is accepted when resuming a run "
                                 "(e.g. 'train.max_steps,train.lr'); others that change are refused", KEYS),
]
HELP = {key: help_ for key, _, help_, _ in SCHEMA}
MESH_KEYS = ("mesh.data", "mesh.fsdp", "mesh.context", "mesh.tensor")


def base_config() -> ml_collections.ConfigDict:
    """Every key at its default (see SCHEMA for the help of each)."""
    root: dict = {}
    for key, default, _, _ in SCHEMA:
        node = root
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = default
    return ml_collections.ConfigDict(root)


def describe() -> str:
    """All keys with defaults, allowed values and help, for `jaxtune keys`."""
    width = max(len(k) for k, *_ in SCHEMA)
    domain_width = max(len(d.text) for *_, d in SCHEMA)
    return "\n".join(f"{k:<{width}}  {json.dumps(v):<14} {d.text:<{domain_width}}  {h}" for k, v, h, d in SCHEMA)


def describe_markdown() -> str:
    """docs/configs.md: the same table as Markdown, a section per group (`jaxtune keys --markdown`)."""
    lines = ["# Config keys", "", "Generated from `jaxtune/config.py` by `jaxtune keys --markdown > docs/configs.md`",
             "(a test fails when this page is stale). Set a key in a config file (`cfg.train.lr = 1e-4`) or on",
             "the command line (`--config.train.lr=1e-4`); an unknown key is an error."]
    group = None
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731 (a pipe would end the table cell)
    for key, default, help_, domain in SCHEMA:
        head = key.split(".")[0] if "." in key else "run"
        if head != group:
            group = head
            lines += ["", f"## {group}", "", "| key | default | accepts | what it does |", "|---|---|---|---|"]
        lines.append(f"| `{key}` | `{json.dumps(default)}` | {cell(domain.text)} | {cell(help_)} |")
    return "\n".join(lines) + "\n"


def load(config_file: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """A config file with `get_config()` plus `--config.key=value` overrides, locked, validated."""
    from absl import flags
    from ml_collections import config_flags

    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise JaxtuneError(f"unexpected argument(s) {bad}: overrides look like --config.train.lr=1e-4")
    unknown = sorted({o.removeprefix("--config.").split("=")[0] for o in overrides} - HELP.keys())
    if unknown:  # ml_collections would only say "'stpes'"
        raise JaxtuneError(f"unknown config key(s) {unknown}; see `jaxtune keys` for the valid ones")
    cfg = _run_config_file(config_file)
    _check_keys(cfg)  # before overrides: an override of a key the preset lacks would fail obscurely
    argv = ["jaxtune train", *overrides]
    try:
        values = flags.FlagValues()
        config_flags.DEFINE_config_dict("config", cfg, flag_values=values, lock_config=True, sys_argv=argv)
        values(argv)
    except flags.Error as e:  # a value that does not parse as the key's type
        raise JaxtuneError(str(e).strip()) from None
    validate(values.config)
    return values.config


def _run_config_file(config_file: str) -> ml_collections.ConfigDict:
    """`get_config()` of a Python file; whatever goes wrong in it is one line naming the file (and line)."""
    if not Path(config_file).is_file():
        raise JaxtuneError(f"{config_file}: no such config file")
    try:
        get_config = runpy.run_path(config_file).get("get_config")
        if not callable(get_config):
            raise JaxtuneError(f"{config_file}: defines no get_config()")
        cfg = get_config()
    except JaxtuneError:
        raise
    except SyntaxError as e:
        raise JaxtuneError(f"{e.filename}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # the config file is user input: a bug in it is bad input, not a crash
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == config_file]
        where = f"{config_file}:{lines[-1]}" if lines else config_file
        raise JaxtuneError(f"{where}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise JaxtuneError(f"{config_file}: get_config() returned {type(cfg).__name__}, not a ConfigDict "
                           "(start from jaxtune.config.base_config())")
    return cfg


def _check_keys(cfg: ml_collections.ConfigDict):
    """Every key of SCHEMA and no other (a preset that added one has a typo)."""
    flat = flatten(cfg.to_dict())
    unknown, missing = sorted(flat.keys() - HELP.keys()), sorted(HELP.keys() - flat.keys())
    if unknown:
        raise JaxtuneError(f"unknown config key(s) {unknown}; see `jaxtune keys` for the valid ones")
    if missing:
        raise JaxtuneError(f"missing config key(s) {missing}: start the config from jaxtune.config.base_config()")


def validate(cfg: ml_collections.ConfigDict):
    """Unknown or missing keys and values out of their SCHEMA domain are errors, caught before any
    data or model loads."""
    _check_keys(cfg)
    flat = flatten(cfg.to_dict())
    for key, _, _, domain in SCHEMA:
        problem = domain.check(flat[key])
        if problem and key == "model.param_dtype":
            problem += ("; for a 4-bit frozen base set method='qlora' (quant.* configures it), and model.param_dtype "
                        "is then the dtype of what stays dense: embeddings, norms, lm_head")
        if problem:
            raise JaxtuneError(f"{key}={flat[key]!r}: {problem}")
    if [flat[k] for k in MESH_KEYS].count(-1) > 1:
        raise JaxtuneError(", ".join(f"{k}={flat[k]}" for k in MESH_KEYS) +
                           ": at most one mesh axis may be -1 (the remaining devices)")


def flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def split_list(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]
