"""NF4 with double quantization against bitsandbytes itself (CPU), bit for bit."""
import dataclasses

import numpy as np
import pytest

from jaxtune import quant

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")


def bnb_quantize(weight: np.ndarray, double_quant: bool, dtype=None):
    w = torch.from_numpy(np.ascontiguousarray(weight))
    if dtype is not None:
        w = w.to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return packed, state


def weights(dtype: str):
    rng = np.random.default_rng(0)
    cases = {"random": rng.normal(0, 0.02, (96, 128)).astype(np.float32),
             "heavy tails": (rng.standard_t(2, (64, 64)) * 0.01).astype(np.float32)}
    edge = rng.normal(0, 1, (8, 64)).astype(np.float32)
    edge[0] = 0.0  # an all-zero block
    edge[1, :4] = [3.0, -3.0, 1.5, -1.5]  # values at +-absmax and half of it
    midpoints = (quant.NF4_CODE[:-1] + quant.NF4_CODE[1:]) / np.float32(2.0)
    edge[2, 0], edge[2, 1:16] = 1.0, midpoints  # exactly on the thresholds between two codes (absmax 1)
    cases["edge"] = edge
    cases["not a multiple of 64"] = rng.normal(0, 1, (3, 50)).astype(np.float32)
    if dtype == "bfloat16":
        cases = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in cases.items()}
    return cases


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_equals_bitsandbytes_bytes_and_absmax(dtype):
    for name, w in weights(dtype).items():
        packed, state = bnb_quantize(w, False, torch.bfloat16 if dtype == "bfloat16" else None)
        ours = quant.quantize(w, double_quant=False)
        np.testing.assert_array_equal(ours.packed, packed.numpy().reshape(-1), err_msg=name)
        np.testing.assert_array_equal(ours.absmax, state.absmax.numpy(), err_msg=name)


def test_dynamic_map_is_bitsandbytes():
    np.testing.assert_array_equal(quant.dynamic_map(), F.create_dynamic_map().numpy())


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_bitsandbytes_arrays_bitwise(double_quant):
    """jaxtune's dequantization of bitsandbytes' own arrays equals bitsandbytes' dequantize_4bit."""
    for name, w in weights("float32").items():
        packed, state = bnb_quantize(w, double_quant)
        nf4 = quant.NF4(packed.numpy().reshape(-1), state.absmax.numpy(), tuple(w.shape))
        if double_quant:
            nf4.nested_absmax, nf4.offset = state.state2.absmax.numpy(), float(state.offset)
        expected = F.dequantize_4bit(packed, state).numpy()
        np.testing.assert_array_equal(np.asarray(quant.dequantize(nf4)), expected, err_msg=name)


def bnb_reference_quantize_blockwise(values: np.ndarray, code: np.ndarray, blocksize: int):
    """bitsandbytes' device-independent reference kernel for 8-bit blockwise quantization (its
    `default` backend: nearest code by bucketize over the code midpoints), called directly although
    the CPU C kernel is registered for CPU tensors."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    codes, absmax = op.redispatch(keys, torch.from_numpy(values), torch.from_numpy(code), blocksize)
    return codes.numpy(), absmax.numpy()


def test_double_quantization_matches_bitsandbytes():
    """Same offset and nested absmax as bitsandbytes; nested 8-bit codes equal to bitsandbytes'
    reference kernel code for code. Its CPU C kernel (a lookup-table binary search) lands one code off
    for ~0.1-0.2% of them: there ours is the nearer code, and wherever the codes agree the dequantized
    weights are bitwise equal."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (512, 1024)).astype(np.float32)  # 8,192 absmax values: 32 nested blocks
    packed, state = bnb_quantize(w, True)
    ours = quant.quantize(w, double_quant=True)
    np.testing.assert_array_equal(ours.packed, packed.numpy().reshape(-1))
    assert ours.offset == float(state.offset)
    np.testing.assert_array_equal(ours.nested_absmax, state.state2.absmax.numpy())
    code = quant.dynamic_map()
    exact = quant.quantize(w, double_quant=False).absmax - np.float32(ours.offset)
    reference_codes, reference_nested = bnb_reference_quantize_blockwise(exact, code, 256)
    np.testing.assert_array_equal(ours.absmax, reference_codes)
    np.testing.assert_array_equal(ours.nested_absmax, reference_nested)
    cpu_codes = state.absmax.numpy()
    assert np.mean(ours.absmax == cpu_codes) >= 0.998
    scaled = exact / np.repeat(ours.nested_absmax, 256)[:exact.size]
    assert np.all(np.abs(scaled - code[ours.absmax]) <= np.abs(scaled - code[cpu_codes]))
    theirs = F.dequantize_4bit(packed, state).numpy().reshape(-1, 64)
    mine = np.asarray(quant.dequantize(ours)).reshape(-1, 64)
    agree = ours.absmax == cpu_codes
    np.testing.assert_array_equal(mine[agree], theirs[agree])  # bitwise wherever the nested codes agree
    # and the scheme keeps what NF4 promises: a small error against the dense weight
    assert np.linalg.norm(mine.reshape(w.shape) - w) / np.linalg.norm(w) < 0.11


def test_gradient_through_nf4_equals_dense_and_keeps_no_dense_copy():
    """d/dx through the NF4 matmul equals d/dx through a dense matmul holding the dequantized weight,
    and the backward's residuals are the quantized arrays, not a dense [out, in] matrix."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    nf4 = quant.quantize(rng.normal(0, 0.02, (96, 128)).astype(np.float32))
    dense = quant.dequantize(nf4)
    x = jnp.asarray(rng.normal(0, 1, (4, 7, 128)).astype(np.float32))

    def loss(x, matmul):
        return jnp.sum(jnp.sin(matmul(x)))

    grad_nf4 = jax.grad(loss)(x, lambda x: quant.matmul(x, nf4))
    grad_dense = jax.grad(loss)(x, lambda x: x @ dense.T)
    assert float(jnp.linalg.norm(grad_nf4 - grad_dense) / jnp.linalg.norm(grad_dense)) < 1e-6
    _, vjp = jax.vjp(lambda x: quant.matmul(x, nf4), x)
    residual_shapes = {tuple(np.shape(leaf)) for leaf in jax.tree.leaves(vjp)}
    assert (96, 128) not in residual_shapes and (128, 96) not in residual_shapes, residual_shapes


def test_bitsandbytes_reference_layers_compute_in_float32_on_any_cpu(bnb_cpu_fast_path):
    """On a CPU with AVX512-BF16 bitsandbytes repacks a Linear4bit's weight on its first eval forward and
    computes in bfloat16 (and a save afterwards writes re-quantized scales). jaxtune turns that off on
    every reference model through a private attribute: this fails, naming it, if a release renames it."""
    import copy

    import bitsandbytes as bnb

    from jaxtune.export import BNB_CPU_FAST_PATH, bnb_float32_layers

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4", module=layer)
    layer = layer.to("cpu").eval()
    assert hasattr(layer, BNB_CPU_FAST_PATH), (
        f"bitsandbytes {bnb.__version__}: Linear4bit has no attribute {BNB_CPU_FAST_PATH!r} any more; find the switch "
        "of its bfloat16 CPU path and set it in jaxtune.export.bnb_float32_layers")
    x = torch.randn(5, 128)
    dense = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # bitsandbytes' own float32 weights
    expected = x @ dense.T
    untouched = copy.deepcopy(layer)  # the attribute still decides whether the repack happens
    with torch.no_grad():
        untouched(x)
    assert getattr(untouched.weight.quant_state, "packing_format_for_cpu", False) == (bnb_cpu_fast_path == "on")

    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    assert bnb_float32_layers(layer) == 1
    with torch.no_grad():
        y = layer(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert float((y - expected).norm() / expected.norm()) < 1e-6
    state = layer.weight.quant_state
    ours = np.asarray(quant.dequantize(quant.NF4(layer.weight.data.numpy().reshape(-1), state.absmax.numpy(), (64, 128),
                                                 state.blocksize, state.state2.absmax.numpy(), state.offset.numpy())))
    np.testing.assert_array_equal(ours, dense.numpy())  # jaxtune's dequantization is bitsandbytes' float32 path
    after = layer.state_dict()
    assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved)



@pytest.mark.parametrize("double_quant", [False, True])
def test_word_layout_dequantizes_bit_for_bit_like_bitsandbytes_bytes(double_quant):
    """The device layout (uint32 words, 8 nibble planes: no [.., 2] axis for a TPU to pad to 128 lanes)
    gives the same weights as bitsandbytes' bytes, bit for bit, in float32 and bfloat16, also sliced
    from a stack inside jit as the layer scan slices it; and from_words gives the bytes back."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    for shape in ((128, 512), (512, 128), (64, 1024)):
        layers = [quant.quantize(rng.normal(0, 0.02, shape).astype(np.float32), double_quant=double_quant)
                  for _ in range(2)]
        stack = jax.tree.map(lambda *xs: np.stack(xs), *layers)
        words = quant.to_words(stack.packed, shape)
        assert words.dtype == np.uint32 and words.shape == (2, shape[0] * shape[1] // 8)
        np.testing.assert_array_equal(quant.from_words(words, shape), stack.packed)
        as_words = dataclasses.replace(stack, packed=words, layout="words")
        for dtype in (jnp.float32, jnp.bfloat16):
            sliced = jax.jit(lambda s, i: quant.dequantize(jax.tree.map(lambda a: a[i], s), dtype))
            for i, layer in enumerate(layers):
                ours = np.asarray(sliced(as_words, i)).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32)
                theirs = np.asarray(jax.jit(lambda n: quant.dequantize(n, dtype))(layer)).view(ours.dtype)
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{shape} layer {i} {dtype}")
