"""Every attention backend against the einsum reference, forward and gradients, on packed rows with
padding, grouped-query heads and (where the backend has one) a sliding window. The GPU and TPU
kernels run here in Pallas' interpret mode; cuDNN's call runs through XLA (same arguments)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import attention, sharding
from jaxtune.errors import JaxtuneError

B, T, H, K, D = 2, 256, 4, 2, 32
BACKENDS = {
    "blocked": functools.partial(attention._blocked, block=64),
    "blocked-128": attention._blocked,  # the default block size, as training uses it
    "cudnn": functools.partial(attention._cudnn, implementation="xla"),
    "pallas": functools.partial(attention._pallas_gpu, interpret=True),
    "splash": functools.partial(attention._splash, interpret=True),
}


def on_mesh(kernel):
    """The kernel as training calls it on a mesh: rows over fsdp=2, heads over tensor=4 (the 2 KV heads
    do not split 4 ways: they are repeated to the query heads first)."""
    def run(*args):
        mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
        with sharding.use_mesh(mesh):
            return jax.jit(attention.per_shard(kernel), static_argnums=5)(*args)
    return run


BACKENDS["pallas-on-mesh"] = on_mesh(BACKENDS["pallas"])
BACKENDS["splash-on-mesh"] = on_mesh(BACKENDS["splash"])


def packed_rows():
    """Row 0: three documents and 16 padding tokens; row 1: one document filling the row."""
    segments, positions = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b, lengths in enumerate([[100, 90, 50], [T]]):
        start = 0
        for i, n in enumerate(lengths):
            segments[b, start:start + n], positions[b, start:start + n] = i + 1, np.arange(n)
            start += n
    return jnp.asarray(positions), jnp.asarray(segments)


def qkv(seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((B, T, H, D), (B, T, K, D), (B, T, K, D))]


def loss_and_grads(fn, q, k, v, positions, segments, window, cotangent):
    """Σ out · cotangent over real (non-padding) tokens, and its gradients in q, k, v."""
    real = (segments != 0)[..., None]

    def loss(q, k, v):
        out = fn(q, k, v, positions, segments, window).reshape(B, T, H * D)
        return jnp.sum(jnp.where(real, out * cotangent, 0.0)), out

    (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return jnp.where(real, out, 0.0), value, grads


def reference(q, k, v, positions, segments, window):
    return attention.masked(q, k, v, attention.mask(positions, segments, positions, segments, window))


@pytest.mark.parametrize("window", [None, 70])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_matches_the_einsum_reference(backend, window):
    if backend.startswith("pallas") and window is not None:
        with pytest.raises(ValueError, match="no sliding window"):
            BACKENDS[backend](*qkv(), *packed_rows(), window)
        return
    q, k, v = qkv()
    positions, segments = packed_rows()
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H * D)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        out, value, grads = loss_and_grads(BACKENDS[backend], q, k, v, positions, segments, window, cotangent)
        ref_out, ref_value, ref_grads = loss_and_grads(reference, q, k, v, positions, segments, window, cotangent)
    assert float(jnp.max(jnp.abs(out - ref_out))) < 1e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        err = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
        assert err < 1e-5, (name, err)


def plain_softmax_attention(q, k, v, mask_bts):
    """The textbook form, independent of `attention.masked`'s layout and arithmetic: kv heads repeated,
    scores masked with the lowest float32, `jax.nn.softmax`, all in float32."""
    k, v = (jnp.repeat(x.astype(jnp.float32), H // K, axis=2) for x in (k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) * D**-0.5
    probs = jax.nn.softmax(jnp.where(mask_bts[:, None], scores, attention.NEG_INF), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, H * D)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_the_einsum_reference_is_a_plain_masked_softmax(dtype, tolerance):
    """`masked` (bias, softmax normalised after the values) against the textbook form. Outputs: every
    row, a padding row (nothing visible) averaging all values in both. Gradients: with the cotangent
    of padding rows 0, as training gives them (no loss weight, and no real token attends to them);
    their own gradient is meaningless in either form."""
    q, k, v = (x.astype(dtype) for x in qkv())
    positions, segments = packed_rows()
    mask = attention.mask(positions, segments, positions, segments, 70)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H * D)), jnp.float32)
    cotangent = jnp.where((segments != 0)[..., None], cotangent, 0.0)
    with jax.default_matmul_precision("highest"):
        out, grads = jax.value_and_grad(lambda *a: jnp.sum(attention.masked(*a, mask).astype(jnp.float32) * cotangent),
                                        argnums=(0, 1, 2))(q, k, v)
        ref, ref_grads = jax.value_and_grad(lambda *a: jnp.sum(plain_softmax_attention(*a, mask) * cotangent),
                                            argnums=(0, 1, 2))(q, k, v)
    assert out.dtype == jnp.float32 and attention.masked(q, k, v, mask).dtype == dtype
    assert abs(float(out - ref)) <= tolerance * float(jnp.sum(jnp.abs(cotangent)))
    for name, g, r in zip("qkv", grads, ref_grads):
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
        assert err < tolerance, (name, err)
    full = attention.masked(q, k, v, mask).astype(jnp.float32)
    plain = plain_softmax_attention(q, k, v, mask)
    assert float(jnp.max(jnp.abs(full - plain))) < tolerance * float(jnp.max(jnp.abs(plain)))
    assert float(jnp.max(jnp.abs(full[0, 250] - plain[0, 250]))) < tolerance  # padding: the mean of all values


def test_the_window_and_the_documents_really_mask():
    """The reference itself: a token never sees another document, padding or beyond the window."""
    positions, segments = packed_rows()
    m = np.asarray(attention.mask(positions, segments, positions, segments, 70))
    assert not m[0, 100, 99] and m[0, 100, 100]  # the second document starts at 100
    assert m[1, 200, 131] and not m[1, 200, 130]  # 70 tokens back, not 71
    assert not m[0, 250].any()  # padding attends to nothing


def test_auto_picks_per_platform_and_explicit_choices_are_checked():
    assert attention.resolve("auto", 4096, None, "tpu")[0] == "splash"
    assert attention.resolve("auto", 4096, None, "cuda")[0] == "pallas"
    assert attention.resolve("auto", 4096, 4096, "gpu")[0] == "cudnn"  # Mistral's window: not in the Pallas kernel
    assert attention.resolve("auto", 2048, None, "cpu")[0] == "blocked"
    assert attention.resolve("auto", 512, None, "cpu")[0] == "blocked"
    assert attention.resolve("auto", 128, None, "cpu")[0] == "blocked"
    assert attention.resolve("auto", 1000, None, "cpu") == (
        "blocked", "auto: blocked causal attention (128-token blocks, the last padded: T=1000 -> 1024) on cpu")
    assert attention.resolve("auto", 100, None, "cpu")[0] == "xla"
    assert attention.resolve("xla", 512, None, "tpu") == ("xla", "xla (model.attention)")
    with pytest.raises(JaxtuneError, match="model.attention='splash' runs on tpu, not cpu; use 'auto'"):
        attention.resolve("splash", 512, None, "cpu")
    with pytest.raises(JaxtuneError, match="must be one of"):
        attention.resolve("flash", 512, None, "cpu")


def test_blocked_attention_pads_a_length_that_is_not_a_multiple_of_its_block():
    """T=1000 with 128-token blocks: before, `blocked` was logged but the whole T x T einsum ran. Now the
    last block is padded (segment 0), the scores stay about half of T x T, and output and gradients
    equal the reference at T=200 with 64-token blocks (packed documents, padding)."""
    assert len(attention._blocks(1000, None)) == 8
    assert attention.blocked_score_elements(1000, None) < 0.6 * 1000 * 1000
    assert attention.resolve("blocked", 1000, None, "cpu")[1] == (
        "blocked (model.attention): 128-token blocks, the last padded: T=1000 -> 1024")
    t = 200
    segments, positions = np.zeros((B, t), np.int32), np.zeros((B, t), np.int32)
    for b, lengths in enumerate([[90, 70, 30], [t]]):  # row 0 ends with 10 padding tokens
        start = 0
        for i, n in enumerate(lengths):
            segments[b, start:start + n], positions[b, start:start + n] = i + 1, np.arange(n)
            start += n
    positions, segments = jnp.asarray(positions), jnp.asarray(segments)
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((B, t, n, D)), jnp.float32) for n in (H, K, K))
    cotangent = jnp.asarray(rng.standard_normal((B, t, H * D)), jnp.float32)

    def run(fn):
        real = (segments != 0)[..., None]

        def loss(q, k, v):
            out = fn(q, k, v, positions, segments, None).reshape(B, t, H * D)
            return jnp.sum(jnp.where(real, out * cotangent, 0.0)), jnp.where(real, out, 0.0)

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    with jax.default_matmul_precision("highest"):
        (_, out), grads = run(functools.partial(attention._blocked, block=64))
        (_, ref_out), ref_grads = run(reference)
    assert float(jnp.max(jnp.abs(out - ref_out))) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r))) < 1e-5
