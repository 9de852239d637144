"""What the run-protection costs on the real demo: the identity fingerprints checked on every resume
and the checksums taken at every save and checked at every restore (SmolLM2-135M, LoRA r=16
all-linear, chitchat packed at T=256). Medians of 5.

    python bench/reliability.py
"""
from pathlib import Path

import jax
import optax

from jaxtune import assets, from_pretrained, lora
from jaxtune.data import loader
from jaxtune.data.formats import FormatOptions
from jaxtune.train import optim
from jaxtune.train.checkpoint import checksums
from jaxtune.train.run_dir import data_fingerprint, model_fingerprint

from forward import timed  # bench/forward.py: median of repeats after a warm-up


def main():
    model_dir, chat = assets.smollm2(), assets.chitchat()
    data = loader.build([str(chat / "train.jsonl")], str(model_dir), FormatOptions("chat", 256))
    model = lora.add_lora(from_pretrained(model_dir), rank=16, alpha=32, targets="all-linear")
    _, trainable, _ = lora.split_trainable(model, "lora")
    tx = optim.optimizer(optax.constant_schedule(1e-4), weight_decay=0.0, max_grad_norm=1.0, b1=0.9, b2=0.999,
                         grad_accum_steps=1)
    opt_state = tx.init(trainable)
    saved = sum(x.nbytes for x in jax.tree.leaves((trainable, opt_state)))
    rows = data.train
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    print(f"model fingerprint ({size / 1e6:.0f} MB of safetensors): "
          f"{timed(lambda: model_fingerprint(model_dir), 5) * 1e3:.1f} ms")
    print(f"data fingerprint ({(rows.data.base if hasattr(rows.data, 'base') else rows.data).ids.nbytes * 5 / 4e6:.1f} MB "
          f"of tokens and weights, {len(rows)} packed rows): "
          f"{timed(lambda: data_fingerprint(rows), 5) * 1e3:.1f} ms")
    print(f"checksums of trainable + optimizer state ({saved / 1e6:.1f} MB): "
          f"{timed(lambda: checksums((trainable, opt_state)), 5) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
