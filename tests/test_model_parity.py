"""Logits of jaxtune's Flax Llama against transformers (torch CPU, float32) on tiny random checkpoints."""
import numpy as np
import pytest

from conftest import make_hf_model, rel_err, torch_logits
from jaxtune import from_pretrained

VARIANTS = {
    "llama2_multi_head": dict(),
    "llama3_gqa": dict(num_key_value_heads=2, rope_theta=500000.0),
    "llama31_rope_llama3": dict(num_key_value_heads=2, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "rope_linear": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "tied_embeddings": dict(tie_word_embeddings=True, num_key_value_heads=1),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "explicit_head_dim": dict(head_dim=32, num_key_value_heads=2),
}


ATTENTION_ON_CPU = ["xla", "blocked"]  # the backends that run on CPU (the kernels: tests/test_attention.py)


@pytest.mark.parametrize("attention", ATTENTION_ON_CPU)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_llama_variants_match_transformers(tmp_path, name, attention):
    path, ref = make_hf_model(tmp_path, "llama", **VARIANTS[name])
    tokens = np.random.RandomState(1).randint(0, 256, (2, 96))
    err = rel_err(from_pretrained(path, attention=attention)(tokens), torch_logits(ref, tokens))
    assert err < 1e-5, f"{name}: relative error {err:.2e}"


def test_llama3_scaling_changes_the_model(tmp_path):
    """Guards the test above: rope scaling must actually be applied, not ignored."""
    scaled, _ = make_hf_model(tmp_path / "a", **VARIANTS["llama31_rope_llama3"])
    plain, _ = make_hf_model(tmp_path / "b", num_key_value_heads=2)
    tokens = np.arange(96)[None] % 256
    assert rel_err(from_pretrained(scaled)(tokens), from_pretrained(plain)(tokens)) > 1e-3


@pytest.mark.parametrize("attention", ATTENTION_ON_CPU)
def test_mistral_sliding_window_longer_sequence(tmp_path, attention):
    path, ref = make_hf_model(tmp_path, "mistral", num_key_value_heads=2, sliding_window=16)
    model = from_pretrained(path, attention=attention)
    assert model.cfg.sliding_window == 16
    tokens = np.random.RandomState(2).randint(0, 256, (2, 80))
    err = rel_err(model(tokens), torch_logits(ref, tokens))
    assert err < 1e-5, err
    # the window matters: without it the later positions differ
    no_window, _ = make_hf_model(tmp_path / "nw", "mistral", num_key_value_heads=2, sliding_window=None)
    assert rel_err(from_pretrained(no_window)(tokens)[:, 20:], model(tokens)[:, 20:]) > 1e-3


def test_padded_batch_right_and_left(tmp_path):
    path, ref = make_hf_model(tmp_path, num_key_value_heads=2)
    model = from_pretrained(path)
    rs = np.random.RandomState(3)
    tokens = rs.randint(3, 256, (3, 40))
    lengths = np.array([40, 25, 9])
    # right padding: segment 0 marks padding
    right = (np.arange(40)[None] < lengths[:, None]).astype(np.int32)
    ours = np.asarray(model(tokens * right, None, right))
    theirs = torch_logits(ref, tokens * right, attention_mask=right)
    for row, n in enumerate(lengths):
        assert rel_err(ours[row, :n], theirs[row, :n]) < 1e-5
    # left padding with explicit positions (what generation uses)
    left = right[:, ::-1].copy()
    positions = np.maximum(np.cumsum(left, axis=1) - 1, 0)
    ours = np.asarray(model(tokens * left, positions, left))
    theirs = torch_logits(ref, tokens * left, attention_mask=left, position_ids=positions)
    for row, n in enumerate(lengths):
        assert rel_err(ours[row, -n:], theirs[row, -n:]) < 1e-5
        # and the same as the unpadded row alone
        alone = np.asarray(model((tokens * left)[row:row + 1, 40 - n:]))
        assert rel_err(ours[row, -n:], alone[0]) < 1e-5


@pytest.mark.parametrize("attention", ATTENTION_ON_CPU)
def test_packed_segments_do_not_attend_across(tmp_path, attention):
    """Two documents packed into one row give the same logits as each alone (positions restart)."""
    path, _ = make_hf_model(tmp_path, num_key_value_heads=2)
    model = from_pretrained(path, attention=attention)
    rs = np.random.RandomState(4)
    a, b = rs.randint(0, 256, 30), rs.randint(0, 256, 20)
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 30 + [2] * 20])
    positions = np.array([list(range(30)) + list(range(20))])
    out = np.asarray(model(packed, positions, segments))[0]
    assert rel_err(out[:30], np.asarray(model(a[None]))[0]) < 1e-5
    assert rel_err(out[30:], np.asarray(model(b[None]))[0]) < 1e-5


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_same_logits_and_grads(tmp_path, remat):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    path, _ = make_hf_model(tmp_path, num_key_value_heads=2)
    tokens = np.random.RandomState(5).randint(0, 256, (2, 24))

    def grads(model):
        def loss(m):
            return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 7])
        return nnx.grad(loss)(model)

    base, other = from_pretrained(path), from_pretrained(path, remat=remat)
    g0, g1 = jax.tree.leaves(grads(base)), jax.tree.leaves(grads(other))
    for x, y in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_close(tmp_path):
    path, ref = make_hf_model(tmp_path, num_key_value_heads=2)
    tokens = np.random.RandomState(6).randint(0, 256, (2, 32))
    model = from_pretrained(path, dtype="bfloat16")
    assert model.embed[...].dtype.name == "bfloat16"
    err = rel_err(np.asarray(model(tokens), np.float32), torch_logits(ref, tokens))
    assert err < 2e-2, err
