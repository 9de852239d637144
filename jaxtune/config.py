"""Every training key, its default and a one-line help, in one table. Configs are data: a preset
is a `get_config()` that starts from `base_config()` and changes values; overrides come from the
command line as `--config.train.lr=1e-4`. The config is locked, so an unknown key is an error.

Lists are comma-separated strings so that every key can be overridden from the command line.
"""
from __future__ import annotations

import json
import sys

import ml_collections

from jaxtune.errors import JaxtuneError

SCHEMA = [
    # key, default, help
    ("workdir", "runs/default", "run directory: config.json, metrics.jsonl, curves.png, summary.json, checkpoints/"),
    ("seed", 0, "seed for LoRA init, dropout and data order"),
    ("method", "lora", "'lora' (frozen base + LoRA factors) or 'full' (every weight trains)"),
    ("model.path", "", "Hugging Face model directory (config.json + safetensors), or a hub id when online"),
    ("model.dtype", "float32", "compute dtype: float32 | bfloat16"),
    ("model.param_dtype", "float32", "storage dtype of the (frozen) weights: float32 | bfloat16"),
    ("model.remat", "none", "activation recomputation per layer: none | dots | full"),
    ("model.verify", False, "before training, check jaxtune's logits against transformers on this model (needs torch)"),
    ("lora.rank", 16, "LoRA rank r"),
    ("lora.alpha", 32.0, "LoRA alpha; scale = alpha/r (alpha/sqrt(r) with rslora)"),
    ("lora.dropout", 0.05, "dropout on the LoRA input during training"),
    ("lora.targets", "all-linear", "'all-linear', HF module names 'q_proj,v_proj', or 're:REGEX'"),
    ("lora.rslora", False, "rank-stabilised scale alpha/sqrt(r)"),
    ("lora.init_from", "", "start from this PEFT adapter dir (peft/axolotl/unsloth); its r/alpha/targets win"),
    ("lora.modules_to_save", "", "modules trained in full beside LoRA: 'embed_tokens,lm_head' (new syntax/tokens)"),
    ("data.train", "", "training data: comma-separated files (.jsonl/.json/.csv/.parquet), hub names or tfds:NAME"),
    ("data.val", "", "validation data files (comma-separated); empty: hold out data.val_fraction"),
    ("data.val_fraction", 0.0, "share of training samples held out for validation when data.val is empty"),
    ("data.format", "chat", "completion | alpaca | chat | pretokenized"),
    ("data.seq_len", 2048, "tokens per packed row"),
    ("data.train_on_inputs", False, "also supervise prompts / user turns"),
    ("data.overlong", "truncate", "samples longer than seq_len: truncate | drop | split"),
    ("data.chat_template", "", "'' = the tokenizer's, 'chatml', or a jinja template"),
    ("train.micro_batch_size", 8, "rows per micro-step over the whole mesh (global, not per device)"),
    ("train.grad_accum_steps", 1, "micro-steps per optimizer update (optax.MultiSteps), token-weighted"),
    ("train.max_steps", 0, "optimizer updates; 0 = train.epochs over the data"),
    ("train.epochs", 1.0, "passes over the training data when max_steps is 0"),
    ("train.lr", "auto", "peak learning rate: a number, or 'auto' = base_lr*sqrt(supervised tokens per step / "
                         "pretrained_batch_tokens)"),
    ("train.base_lr", 3e-4, "lr='auto': the model's pretraining learning rate (Llama-2: 3e-4)"),
    ("train.pretrained_batch_tokens", 4_000_000, "lr='auto': the model's pretraining batch in tokens"),
    ("train.schedule", "cosine", "constant | linear | cosine (decay to 0 after warmup)"),
    ("train.warmup_steps", 0, "linear warmup from 0, in optimizer updates"),
    ("train.weight_decay", 0.0, "AdamW decoupled weight decay (never on norms and biases)"),
    ("train.max_grad_norm", 1.0, "clip the global gradient norm; 0 = off"),
    ("train.b1", 0.9, "AdamW beta1"),
    ("train.b2", 0.999, "AdamW beta2"),
    ("train.loss_chunk", 256, "tokens per chunk of the float32 loss, so B x T x vocab logits never exist at once"),
    ("eval.every_steps", 100, "evaluate on the validation data every N optimizer updates (0 = only at the end)"),
    ("eval.max_batches", 0, "cap on validation batches per eval (0 = all)"),
    ("eval.early_stopping_patience", 0, "stop after N evals without a new best eval loss (0 = never)"),
    ("eval.prompt", "", "a chat prompt answered before and after training (empty = none)"),
    ("eval.max_new_tokens", 48, "length of that reply"),
    ("checkpoint.every_steps", 500, "save every N optimizer updates (and at the end, on SIGTERM/SIGINT)"),
    ("checkpoint.keep", 2, "keep the last N checkpoints (the best one is kept apart)"),
    ("log.every_steps", 10, "write a metrics.jsonl line (and read the loss from the device) every N updates"),
    ("log.tensorboard", False, "also write TensorBoard events to workdir/tensorboard"),
    ("log.progress", True, "show the progress bar"),
    ("mesh.data", 1, "data-parallel mesh axis (-1 = the remaining devices)"),
    ("mesh.fsdp", -1, "fully sharded data-parallel axis (-1 = the remaining devices)"),
    ("mesh.tensor", 1, "tensor-parallel axis (heads, MLP columns)"),
]
HELP = {key: help_ for key, _, help_ in SCHEMA}


def base_config() -> ml_collections.ConfigDict:
    """Every key at its default (see SCHEMA for the help of each)."""
    root: dict = {}
    for key, default, _ in SCHEMA:
        node = root
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = default
    return ml_collections.ConfigDict(root)


def describe() -> str:
    """All keys with defaults and help, for `jaxtune keys`."""
    width = max(len(k) for k, _, _ in SCHEMA)
    return "\n".join(f"{k:<{width}}  {json.dumps(d):<12} {h}" for k, d, h in SCHEMA)


def load(config_file: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """A config file with `get_config()` plus `--config.key=value` overrides, locked, validated."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["jaxtune train", f"--config={config_file}", *overrides]
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise JaxtuneError(f"unexpected argument(s) {bad}: overrides look like --config.train.lr=1e-4")
    saved, sys.argv = sys.argv, argv  # config_flags reads sys.argv to know which overrides to define
    try:
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
        values(argv)
        cfg = values.config
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise JaxtuneError(f"{config_file}: {str(e).strip()}") from None
    except FileNotFoundError:
        raise JaxtuneError(f"{config_file}: no such config file") from None
    finally:
        sys.argv = saved
    validate(cfg)
    return cfg


def validate(cfg: ml_collections.ConfigDict):
    """Unknown keys (a preset that added one) and values out of their domain are errors."""
    known = {k for k, _, _ in SCHEMA}
    flat = _flatten(cfg.to_dict())
    unknown = sorted(set(flat) - known)
    if unknown:
        raise JaxtuneError(f"unknown config key(s) {unknown}; see `jaxtune keys` for the valid ones")
    choices = {"method": ("lora", "full"), "model.dtype": ("float32", "bfloat16"),
               "model.param_dtype": ("float32", "bfloat16"), "model.remat": ("none", "dots", "full"),
               "train.schedule": ("constant", "linear", "cosine"),
               "data.format": ("completion", "alpaca", "chat", "pretokenized"),
               "data.overlong": ("truncate", "drop", "split")}
    for key, allowed in choices.items():
        if flat[key] not in allowed:
            raise JaxtuneError(f"{key}={flat[key]!r}: must be one of {allowed}")
    if flat["train.lr"] != "auto":
        try:
            float(flat["train.lr"])
        except ValueError:
            raise JaxtuneError(f"train.lr={flat['train.lr']!r}: a number (e.g. '2e-4') or 'auto'") from None
    if not flat["model.path"]:
        raise JaxtuneError("model.path is empty: point it at a Hugging Face model directory")
    if not flat["data.train"]:
        raise JaxtuneError("data.train is empty: give one or more training data files")


def _flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def split_list(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]
