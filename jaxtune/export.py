"""Fine-tunes out of jaxtune: a merged HF model directory or a PEFT adapter, each checked by the
library that will load it (the parity gate), written to a temporary directory and renamed."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from jaxtune import lora, quant
from jaxtune.atomic import check_replaceable, write_dir
from jaxtune.errors import JaxtuneError
from jaxtune.paths import is_remote, run_path
from jaxtune.models.hf import (HF_MODEL_KIND, bnb_4bit_options, from_pretrained, is_bnb_4bit,
                               copy_tokenizer_files, load_tokenizer, read_hf_config, refuse_custom_code,
                               set_chat_template, write_hf_files)
from jaxtune.models.llama import LINEAR_MODULES, Llama

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
EXPORT_KINDS = {"merged": HF_MODEL_KIND, "adapter": "peft-adapter"}  # --merged/--adapter -> marker kind


def load_run(workdir, *, step: int | None = None, best: bool = False) -> tuple[Llama, dict, int]:
    """The trained model of a workdir (float32, LoRA unmerged), its resolved config and the step."""
    from jaxtune.train.checkpoint import Checkpoints

    workdir = run_path(workdir)
    cfg = read_run_config(workdir)
    base = cfg["model"]["path"]
    # The model as trained: a QLoRA base in NF4 (a bitsandbytes base as stored, a dense one quantized
    # again as the run did, bit for bit), so that merging folds the delta into what was trained.
    cfg["quant_effective"], _ = lora.quant_options(cfg, read_hf_config(base), base)
    model = from_pretrained(base, dtype="float32", param_dtype="float32", quantize=cfg["quant_effective"])
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
            copy_tokenizer_files(Path(base_dir), tmp)  # as trl and axolotl save it: the template may be the run's
        else:
            lora.merge_lora(model)
            _cast(model, dtype)
            write_hf_files(model, tmp, tokenizer_from=base_dir)
        write_run_chat_template(tmp, base_dir, cfg)
        (tmp / "README.md").write_text(model_card(kind, out.name, cfg, step, workdir, lora_shape))
        if verify:
            result["parity_rel_err"] = verify_export(tmp, kind, base_dir, samples, expected, dtype, name=out,
                                                     quantize_base=_requantized_base(cfg))

    write_dir(out, build, kind=EXPORT_KINDS[kind], overwrite=overwrite, flag="--overwrite")
    return result


def write_run_chat_template(out: Path, base_dir, cfg: dict) -> None:
    """The chat template the run rendered its records with, where it is not the base tokenizer's own
    (jaxtune's ChatML for a tokenizer without one, data.chat_template): `generate --chat`, transformers'
    apply_chat_template and vLLM then prompt the model as it was trained."""
    from jaxtune.data.formats import Formatter, FormatOptions, end_of_turn_ids

    tokenizer = load_tokenizer(base_dir)
    source = Formatter(tokenizer, FormatOptions.from_config(cfg)).template_source
    if source and source != tokenizer.chat_template:
        ends = sorted(i for i in end_of_turn_ids(tokenizer) if tokenizer.convert_ids_to_tokens(i) in source)
        set_chat_template(out, source, ends)


def model_card(kind: str, name: str, cfg: dict, step: int, workdir, lora_shape: str | None) -> str:
    """README.md as the hub and peft write it: YAML front matter (base model, library, tags) and
    how to load the export, what trained and the losses of the run (from summary.json)."""
    base = cfg["model"]["path"]
    adapter = kind == "adapter"
    tags = [f"base_model:{'adapter' if adapter else 'finetune'}:{base}", cfg["method"], "jaxtune"]
    front = ["---", f"base_model: {base}", f"library_name: {'peft' if adapter else 'transformers'}",
             "pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags], "---", ""]
    nf4 = _requantized_base(cfg) if adapter else None
    skip = [m for m in LINEAR_MODULES if m not in nf4.modules] if nf4 else []
    if nf4 is not None and nf4.blocksize == quant.BLOCKSIZE:  # trained on the base in NF4: load it so
        load = ["import torch", "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, BitsAndBytesConfig", "",
                "nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", "
                f"bnb_4bit_use_double_quant={nf4.double_quant}, bnb_4bit_compute_dtype=torch.float32"
                + (f", llm_int8_skip_modules={['lm_head', *skip]}" if skip else "") + ")",
                f'base = AutoModelForCausalLM.from_pretrained("{base}", quantization_config=nf4)',
                f'model = PeftModel.from_pretrained(base, "{name}")']
    elif adapter:
        base_dir = base if nf4 is None else f"{base}-nf4"  # another block size: `jaxtune quantize` writes it
        load = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                *([f"# {base_dir}: jaxtune quantize {base} --out {base_dir} --block-size {nf4.blocksize}"
                   + " --no-double-quant" * (not nf4.double_quant)
                   + (f" --dense-modules {','.join(skip)}" if skip else "")] if nf4 else []),
                f'base = AutoModelForCausalLM.from_pretrained("{base_dir}")',
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


def _requantized_base(cfg: dict) -> quant.QuantOptions | None:
    """A QLoRA run on a dense base trained on that base in NF4: its adapter is checked on the base
    quantized the same way (bitsandbytes' format, bit for bit), as QLoRA users load it."""
    opts = cfg["quant_effective"]
    return opts if opts and not is_bnb_4bit(read_hf_config(cfg["model"]["path"])) else None


BNB_CPU_FAST_PATH = "support_avx512bf16_for_cpu"  # bitsandbytes' private per-module switch (0.49, 0.50)


def bnb_4bit_layers(model) -> list:
    """The bitsandbytes `Linear4bit` modules of a torch model."""
    bnb = sys.modules.get("bitsandbytes")  # no Linear4bit can exist before bitsandbytes is imported
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)] if bnb is not None else []


def bnb_float32_layers(model) -> int:
    """Make every bitsandbytes `Linear4bit` of a torch model compute in float32, as its
    `bnb_4bit_compute_dtype` says, and return how many there are. On a CPU with AVX512-BF16,
    bitsandbytes >= 0.49 repacks a 4-bit weight on its first eval forward without gradients and computes
    it in bfloat16 whatever that dtype (1e-2 off float32; a model saved afterwards has re-quantized scales).
    No public switch exists, so the per-module attribute that enables the repack is cleared, before the
    first forward; tests/test_quant.py fails naming it if a release renames it."""
    layers = bnb_4bit_layers(model)
    for layer in layers:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("bnb_float32_layers: a Linear4bit already ran its bfloat16 CPU path; call it first")
        if not hasattr(layer, BNB_CPU_FAST_PATH):
            print(f"verify: bitsandbytes {sys.modules['bitsandbytes'].__version__} has no Linear4bit."
                  f"{BNB_CPU_FAST_PATH}; its 4-bit layers may compute in bfloat16 on this CPU")
            break
        setattr(layer, BNB_CPU_FAST_PATH, False)
    return len(layers)


def reference_model(model_dir, adapter=None, dtype: str = "float32"):
    """transformers' model of `model_dir` computing in float32 (weights stored in `dtype`; a bitsandbytes
    4-bit one on its float32 path), with the PEFT `adapter` applied if given; no code from the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(refuse_custom_code(Path(model_dir)), dtype=getattr(torch, dtype),
                                                 trust_remote_code=False)
    if dtype != "float32":
        model = model.float()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    bnb_float32_layers(model)
    return model.eval()


def _advice(reference, what: str) -> str:
    """What a failed gate says: with bitsandbytes in the reference, the likely cause is its arithmetic."""
    if not bnb_4bit_layers(reference):
        return what
    return (f"{what}. The reference runs bitsandbytes {sys.modules['bitsandbytes'].__version__} 4-bit layers, the "
            "likely cause: a bitsandbytes release computing them other than in float32 on this CPU (jaxtune turns "
            "off the bfloat16 CPU path of 0.49-0.50); --no-verify writes the export without this check")


def verify_export(out: Path, kind: str, base_dir, samples, expected, dtype: str, name=None,
                  quantize_base: quant.QuantOptions | None = None) -> float:
    """Load the export with transformers (and peft) and compare logits; fail above the tolerance.
    `quantize_base`: check an adapter on the base quantized so (a QLoRA run on a dense base)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("verify: torch/transformers not installed; skipped (pip install 'jaxtune[test]')")
        return float("nan")

    def check(reference) -> float:
        return _gate(f"{name or out} ({kind}, loaded by {'peft' if kind == 'adapter' else 'transformers'})",
                     max_rel_err(expected, reference, samples), dtype,
                     _advice(reference, "the export does not reproduce the trained model; keep the checkpoint "
                                        "and report this"))

    if kind == "merged":
        return check(reference_model(out))
    if quantize_base is None:
        return check(reference_model(base_dir, adapter=out))
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        print("verify: the adapter of a QLoRA run is checked on its base in 4 bits, which transformers computes with "
              "bitsandbytes; not installed, so skipped (pip install bitsandbytes)")
        return float("nan")
    from jaxtune.models.bnb import quantize_checkpoint

    with tempfile.TemporaryDirectory(prefix=".nf4-base.", dir=out.parent) as tmp:
        return check(reference_model(quantize_checkpoint(base_dir, Path(tmp) / "base", quantize_base), adapter=out))


def verify_model(model_dir, dtype="float32") -> float:
    """`jaxtune verify MODEL_DIR`: jaxtune's logits against transformers' on the same directory (a
    bitsandbytes 4-bit one as stored, against transformers + bitsandbytes on its float32 path)."""
    model_dir = refuse_custom_code(Path(model_dir))
    stored = bnb_4bit_options(read_hf_config(model_dir), model_dir)
    if stored:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise JaxtuneError(f"{model_dir}: a bitsandbytes 4-bit checkpoint; transformers needs bitsandbytes to "
                               "compute it (pip install bitsandbytes), so it cannot be compared here")
    ours = from_pretrained(model_dir, dtype=dtype, quantize=stored)
    reference = reference_model(model_dir, dtype="float32" if stored else dtype)
    samples = sample_tokens(model_dir, None)
    expected = [np.asarray(ours(np.array([ids])), np.float32) for ids in samples]
    return _gate(f"{model_dir} (jaxtune vs transformers)", max_rel_err(expected, reference, samples), dtype,
                 _advice(reference, "jaxtune does not compute this checkpoint as transformers does; please report it"))
