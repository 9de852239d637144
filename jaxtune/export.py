"""Fine-tunes out of jaxtune: a merged HF model directory or a PEFT adapter, each checked by the
library that will load it (the parity gate), written to a temporary directory and renamed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from jaxtune import lora, quant
from jaxtune.atomic import check_replaceable, write_dir
from jaxtune.errors import JaxtuneError
from jaxtune.paths import is_remote, run_path
from jaxtune.models.hf import (HF_MODEL_KIND, from_pretrained, is_bnb_4bit, load_tokenizer, read_hf_config,
                               refuse_custom_code, write_hf_files)
from jaxtune.models.llama import Llama

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
EXPORT_KINDS = {"merged": HF_MODEL_KIND, "adapter": "peft-adapter"}  # --merged/--adapter -> marker kind


def load_run(workdir, *, step: int | None = None, best: bool = False) -> tuple[Llama, dict, int]:
    """The trained model of a workdir (float32, LoRA unmerged), its resolved config and the step."""
    from jaxtune.train.checkpoint import Checkpoints

    workdir = run_path(workdir)
    cfg = read_run_config(workdir)
    base = cfg["model"]["path"]
    # A bitsandbytes 4-bit base stays NF4, as transformers + peft will run it; a QLoRA run on a dense
    # base exports against that dense base (the adapter applies to it; merging folds into it).
    stored_4bit = is_bnb_4bit(read_hf_config(base))
    model = from_pretrained(base, dtype="float32", param_dtype="float32",
                            quantize=quant.QuantOptions(()) if stored_4bit else None)
    cfg["lora_effective"] = lora.attach_from_config(model, cfg)
    graphdef, trainable, frozen = lora.split_trainable(model, cfg["method"], cfg["lora"]["modules_to_save"])
    checkpoints = Checkpoints(workdir, cfg["checkpoint"]["keep"], read_only=True)  # a training may be saving
    try:
        trainable, step = checkpoints.restore_trainable(trainable, step, best=best)
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, trainable, frozen), cfg, step


def read_run_config(workdir: Path) -> dict:
    cfg_file = workdir / "config.json"
    if not cfg_file.is_file():
        raise JaxtuneError(f"{cfg_file}: not found; is {workdir} a jaxtune workdir?")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise JaxtuneError(f"{cfg_file}: not valid JSON ({e}); is {workdir} a jaxtune workdir?") from None


def sample_tokens(tokenizer_dir, cfg: dict | None, n: int = 3, length: int = 96) -> list[list[int]]:
    """A few validation samples (or fixed prompts when there is no data) to compare logits on."""
    from jaxtune.config import split_list
    from jaxtune.data.formats import Formatter, FormatOptions
    from jaxtune.data.loader import load_records

    tokenizer = load_tokenizer(tokenizer_dir)
    if cfg:
        sources = split_list(cfg["data"]["val"]) or split_list(cfg["data"]["train"])
        if sources and Path(sources[0]).is_file():
            opts = FormatOptions.from_config(cfg, seq_len=length, overlong="truncate")
            data = Formatter(tokenizer, opts).tokenize(load_records(sources[0])[:n])
            return [data.sample(i)[0].tolist() for i in range(len(data))]
    prompts = ["The capital of France is", "def fibonacci(n):", "Hello! How are you today?"]
    return [tokenizer(p)["input_ids"] for p in prompts[:n]]


def max_rel_err(expected: list, reference, samples: list[list[int]]) -> float:
    """Max over samples of ||ours - theirs|| / ||theirs|| on the logits, compared in float64."""
    import torch

    errs = []
    for ids, mine in zip(samples, expected):
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits.double().numpy()
        errs.append(float(np.linalg.norm(np.asarray(mine, np.float64) - theirs) / np.linalg.norm(theirs)))
    return max(errs)


def _gate(what: str, err: float, dtype: str, advice: str) -> float:
    limit = TOLERANCE[dtype]
    print(f"verify: {what}: logits relative error {err:.2e} (limit {limit:g})")
    if not err <= limit:
        raise JaxtuneError(f"{what}: parity check failed, relative error {err:.2e} > {limit:g}; {advice}")
    return err


def check_out(out: Path, kind: str, workdir: Path, cfg: dict, overwrite: bool) -> None:
    """Before any work: `out` may not hold (or contain) the run or its base model, and may replace
    only an earlier export of the same kind, when the user says --overwrite."""
    resolved = out.resolve()
    for what, path in (("the run's workdir", workdir), ("the run's base model", Path(cfg["model"]["path"]))):
        if is_remote(path):
            continue  # --out is local: it cannot be inside a bucket
        if resolved == path.resolve() or resolved in path.resolve().parents:
            raise JaxtuneError(f"--out {out}: is (or contains) {what} {path}; choose a new directory")
    check_replaceable(out, EXPORT_KINDS[kind], overwrite=overwrite, flag="--overwrite")


def export(workdir, out, *, kind: str, step: int | None = None, best: bool = False, dtype: str = "float32",
           verify: bool = True, overwrite: bool = False) -> dict:
    """Write a merged HF dir (kind='merged') or a PEFT adapter dir (kind='adapter'); check it.
    An existing `out` is replaced only if it is an earlier export of the same kind and `overwrite`."""
    if kind not in EXPORT_KINDS:
        raise JaxtuneError(f"export kind must be 'merged' or 'adapter', got {kind!r}")
    out, workdir = Path(out), run_path(workdir)
    cfg = read_run_config(workdir)
    check_out(out, kind, workdir, cfg, overwrite)
    if kind == "adapter" and cfg["method"] not in lora.LORA_METHODS:
        raise JaxtuneError("--adapter needs a LoRA run; this one trained every weight (method=full): use --merged")
    model, cfg, step = load_run(workdir, step=step, best=best)
    base_dir = cfg["model"]["path"]
    samples = sample_tokens(base_dir, cfg) if verify else []
    expected = [np.asarray(model(np.array([ids]))) for ids in samples]  # before merging mutates the model
    result = {"out": str(out), "kind": kind, "step": step, "dtype": dtype}
    lora_shape = lora.describe(model, cfg["lora_effective"]["alpha"]) if cfg["lora_effective"] else None

    def build(tmp: Path):
        """Write, then check the files where they are: a failed check leaves nothing at `out`."""
        if kind == "adapter":
            from safetensors.numpy import save_file

            c, eff = cfg["lora"], cfg["lora_effective"]
            save_file(lora.adapter_tensors(model, c["modules_to_save"]), str(tmp / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            config = lora.adapter_config(model, alpha=eff["alpha"], dropout=eff["dropout"], rslora=eff["rslora"],
                                         modules_to_save=c["modules_to_save"], base_model=base_dir)
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        else:
            lora.merge_lora(model)
            _cast(model, dtype)
            write_hf_files(model, tmp, tokenizer_from=base_dir)
        (tmp / "README.md").write_text(model_card(kind, out.name, cfg, step, workdir, lora_shape))
        if verify:
            result["parity_rel_err"] = verify_export(tmp, kind, base_dir, samples, expected, dtype, name=out)

    write_dir(out, build, kind=EXPORT_KINDS[kind], overwrite=overwrite, flag="--overwrite")
    return result


def model_card(kind: str, name: str, cfg: dict, step: int, workdir, lora_shape: str | None) -> str:
    """README.md as the hub and peft write it: YAML front matter (base model, library, tags) and
    how to load the export, what trained and the losses of the run (from summary.json)."""
    base = cfg["model"]["path"]
    adapter = kind == "adapter"
    tags = [f"base_model:{'adapter' if adapter else 'finetune'}:{base}", cfg["method"], "jaxtune"]
    front = ["---", f"base_model: {base}", f"library_name: {'peft' if adapter else 'transformers'}",
             "pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags], "---", ""]
    if adapter:
        load = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{name}")']
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")']
    what = f"{cfg['method']} fine-tune of `{base}` with jaxtune, step {step}"
    if lora_shape:
        what += f"; {lora_shape}"
    data = cfg["data"]["train"]
    lines = [*front, f"# {name}", "", f"A {what}, trained on `{data}`.", "", "```python", *load, "```", ""]
    summary_file = run_path(workdir) / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        lines += ["| steps | final train loss | first / best eval loss | diagnosis |", "|---|---|---|---|",
                  f"| {summary.get('steps')} | {_fmt(summary.get('final_loss'))} | "
                  f"{_fmt(summary.get('first_eval_loss'))} / {_fmt(summary.get('best_eval_loss'))} | "
                  f"{summary.get('diagnosis')} |", ""]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _cast(model: Llama, dtype: str) -> None:
    import dataclasses

    import jax.numpy as jnp

    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(var[...].astype(jnp.dtype(dtype)))
    model.cfg = dataclasses.replace(model.cfg, param_dtype=dtype)


def verify_export(out: Path, kind: str, base_dir, samples, expected, dtype: str, name=None) -> float:
    """Load the export with transformers (and peft) and compare logits; fail above the tolerance."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("verify: torch/transformers not installed; skipped (pip install 'jaxtune[test]')")
        return float("nan")
    if kind == "merged":
        reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=False).eval()
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=False)
        reference = PeftModel.from_pretrained(base, out).eval()
    return _gate(f"{name or out} ({kind}, loaded by {'peft' if kind == 'adapter' else 'transformers'})",
                 max_rel_err(expected, reference, samples), dtype,
                 "the export does not reproduce the trained model; keep the checkpoint and report this")


def verify_model(model_dir, dtype="float32") -> float:
    """`jaxtune verify MODEL_DIR`: jaxtune's logits against transformers' on the same directory."""
    import torch
    from transformers import AutoModelForCausalLM

    ours = from_pretrained(model_dir, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(refuse_custom_code(Path(model_dir)), dtype=getattr(torch, dtype),
                                                     trust_remote_code=False).float().eval()
    samples = sample_tokens(model_dir, None)
    expected = [np.asarray(ours(np.array([ids])), np.float32) for ids in samples]
    return _gate(f"{model_dir} (jaxtune vs transformers)", max_rel_err(expected, reference, samples), dtype,
                 "jaxtune does not compute this checkpoint as transformers does; please report it")
