"""Sampling with a KV cache, entirely on device: one prefill, then a `while_loop` of one-token steps
that stops when every row has produced a stop token (EOS / end of turn)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import KVCache, Llama


def sample(logits_bv, key, temperature: float, top_p: float):
    """Greedy at temperature 0; otherwise temperature then nucleus (top-p) sampling."""
    if temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keep a token while the mass before it < p
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate(graphdef, state, tokens, positions, segments, stop_ids, key, *, max_new_tokens, temperature, top_p):
    model: Llama = nnx.merge(graphdef, state)
    b, p = tokens.shape
    cache = KVCache.empty(model.cfg, b, p + max_new_tokens)
    logits, cache = model(tokens, positions, segments, cache=cache)
    key, sub = jax.random.split(key)
    first = sample(logits[:, -1], sub, temperature, top_p)
    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    last_pos = jnp.max(positions, axis=1)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, out, key = carry
        out = out.at[:, i].set(jnp.where(done, 0, token))
        done = done | jnp.isin(token, stop_ids)
        pos = (last_pos + 1 + i)[:, None]
        logits, cache = model(token[:, None], pos, jnp.ones_like(pos), cache=cache)
        key, sub = jax.random.split(key)
        return i + 1, sample(logits[:, -1], sub, temperature, top_p), cache, done, out, key

    done = jnp.zeros((b,), bool)
    n, _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), first, cache, done, out, key))
    return out, n


def generate(model: Llama, prompts: list[list[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids=(), seed: int = 0) -> list[list[int]]:
    """New tokens for each prompt (left-padded into one batch), each ending at its first stop token."""
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    segments = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        segments[row, width - len(prompt):] = 1
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    graphdef, state = nnx.split(model)
    out, n = _generate(graphdef, state, tokens, positions, segments, jnp.asarray(list(stop_ids) or [-1], jnp.int32),
                       jax.random.key(seed), max_new_tokens=max_new_tokens, temperature=float(temperature),
                       top_p=float(top_p))
    results = []
    for row in np.asarray(out)[:, : int(n)].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[:cut])
    return results


def stop_token_ids(tokenizer, model_dir: str | Path) -> list[int]:
    """EOS ids from the tokenizer and generation_config.json (which often adds end-of-turn ids), and the
    end-of-turn tokens the chat template writes (ChatML's <|im_end|> on a base model whose EOS is another)."""
    from jaxtune.data.formats import END_OF_TURN_TOKENS

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    template, vocab = getattr(tokenizer, "chat_template", None) or "", tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab)
    gen_file = Path(model_dir) / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids for a prompt: raw, or as one user turn through the tokenizer's chat template."""
    if chat:
        if not tokenizer.chat_template:
            raise JaxtuneError("--chat: this tokenizer has no chat template; drop --chat to prompt raw text")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt)["input_ids"]
