"""KV-cache generation equals re-running the whole prefix; sampling respects top-p and stops."""
import jax.numpy as jnp
import numpy as np

from conftest import make_hf_model
from jaxtune import from_pretrained
from jaxtune.generate import generate, sample


def naive_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(np.asarray(model(np.array([ids])))[0, -1])))
    return ids[len(prompt):]


def test_cached_greedy_equals_recompute_and_batches(tmp_path):
    path, _ = make_hf_model(tmp_path, "mistral", num_key_value_heads=2, sliding_window=8)
    model = from_pretrained(path)
    prompts = [[5, 9, 33, 41, 7, 100, 12], [77, 3, 8]]
    expected = [naive_greedy(model, p, 12) for p in prompts]
    assert generate(model, prompts, max_new_tokens=12) == expected  # left-padded batch
    assert generate(model, prompts[1:], max_new_tokens=12) == expected[1:]


def test_stops_at_stop_token(tmp_path):
    path, _ = make_hf_model(tmp_path)
    model = from_pretrained(path)
    full = generate(model, [[5, 6, 7]], max_new_tokens=10)[0]
    stop = full[3]
    cut = generate(model, [[5, 6, 7]], max_new_tokens=10, stop_ids=[stop])[0]
    assert cut == full[: full.index(stop) + 1]


def test_top_p_keeps_only_the_nucleus():
    import jax

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)}
    assert draws == {0, 1}  # 0.5 alone < 0.7, with 0.3 it reaches 0.8: the rest is cut
    draws = {int(sample(logits, jax.random.key(i), 1.0, 1.0)[0]) for i in range(400)}
    assert draws == {0, 1, 2, 3}
