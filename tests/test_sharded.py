"""Loading onto a (data, fsdp, tensor) mesh of 8 forced CPU devices: really sharded, same logits."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import make_hf_model, rel_err
from jaxtune import JaxtuneError, from_pretrained, lora, sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced CPU) devices")


def test_mesh_2x2x2_shards_parameters_and_matches_one_device(tmp_path):
    path, _ = make_hf_model(tmp_path, num_key_value_heads=2)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    model = from_pretrained(path, mesh=mesh)
    q = model.layers.q_proj.kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 32, 32)  # [layers, 64/2, 64/2]
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.layers.down_proj.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
    for var in jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        assert len(var[...].sharding.device_set) == 8

    tokens = np.random.RandomState(0).randint(0, 256, (4, 32))
    single = np.asarray(from_pretrained(path)(tokens))

    @nnx.jit
    def forward(m, t):
        with sharding.use_mesh(mesh):
            return m(t)

    batch = jax.device_put(tokens, sharding.named_sharding(("batch", "length"), tokens.shape, mesh))
    logits = forward(model, batch)
    assert logits.sharding.spec[0] == ("data", "fsdp")
    assert rel_err(logits, single) < 1e-5


def test_mesh_sizes_and_errors():
    assert dict(sharding.make_mesh(data=1, fsdp=-1, tensor=2).shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    with pytest.warns(UserWarning, match="uses 2 of 8 devices"):
        assert sharding.make_mesh(data=1, fsdp=2, tensor=1).devices.size == 2
    with pytest.raises(JaxtuneError, match="needs 12 devices, but 8 are visible"):
        sharding.make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(JaxtuneError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_indivisible_dims_stay_replicated():
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    # 3 KV heads x 64 = 192 is divisible by 4, 6 is not; 9 (the vocab here) divides by neither
    assert sharding.spec(("embed", "kv_heads"), (64, 6), mesh) == P("fsdp", None)
    assert sharding.spec(("vocab", "embed"), (9, 64), mesh) == P(None, "fsdp")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_optimizer_state_sharded_like_its_parameters(tmp_path, method):
    """Every moment and accumulator lies where the parameter it follows lies (found by path, the way a
    reader would check it); step counters are replicated."""
    import optax

    from jaxtune.train import optim

    path, _ = make_hf_model(tmp_path, num_key_value_heads=2)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model = lora.add_lora(from_pretrained(path, mesh=mesh), rank=4, alpha=8) if method == "lora" else from_pretrained(
        path, mesh=mesh)
    _, trainable, _ = lora.split_trainable(model, method, "embed_tokens" if method == "lora" else "")
    tx = optim.optimizer(optax.constant_schedule(1e-3), weight_decay=0.1, max_grad_norm=1.0, b1=0.9, b2=0.999,
                         grad_accum_steps=2)
    param_shardings = sharding.state_shardings(trainable, mesh)
    by_path = {p: s for (p, _), s in zip(jax.tree_util.tree_flatten_with_path(trainable)[0],
                                         jax.tree.leaves(param_shardings))}
    assert any(s.spec != P() for s in by_path.values())
    opt_shardings = sharding.state_shardings(jax.eval_shape(tx.init, trainable), mesh)
    followed = 0
    for (leaf_path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(jax.eval_shape(tx.init, trainable))[0],
                                    jax.tree.leaves(opt_shardings)):
        param = next((by_path[leaf_path[-len(p):]] for p in by_path if leaf_path[-len(p):] == p), None)
        if param is None:
            assert leaf.ndim == 0 and s.spec == P(), leaf_path
        else:
            assert s == param, leaf_path
            followed += 1
    assert followed == 3 * len(by_path)  # Adam's mu and nu, MultiSteps' accumulated gradients
    state = jax.jit(tx.init, out_shardings=opt_shardings)(jax.device_put(trainable, param_shardings))
    assert all(x.sharding.spec == s.spec for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(opt_shardings)))


def test_vocab_parallel_lookup_and_loss_equal_the_plain_ones_with_gradients():
    """On a 2x2x2 mesh (vocabulary over tensor, hidden size over fsdp, rows over data x fsdp) the
    shard_map lookup and loss give the 1-device values and gradients, and logsumexp stays exact for
    logits far from zero (the max is agreed across the vocabulary slices)."""
    from jaxtune import vocab_parallel

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1, (64, 32)).astype(np.float32)
    unembed = rng.normal(0, 3, (32, 64)).astype(np.float32)
    tokens = rng.integers(0, 64, (8, 16)).astype(np.int32)
    targets = rng.integers(0, 64, (8, 16)).astype(np.int32)
    weights = rng.random((8, 16)).astype(np.float32)

    def loss(table, unembed):
        hidden = vocab_parallel.embed(table, tokens) * 2.0 + 40.0  # large logits: an unshifted exp overflows
        return vocab_parallel.chunked_cross_entropy_sum(hidden.reshape(8, 2, 8, 32).swapaxes(0, 1), unembed,
                                                        targets.reshape(8, 2, 8).swapaxes(0, 1),
                                                        weights.reshape(8, 2, 8).swapaxes(0, 1))

    plain_value, plain_grads = jax.value_and_grad(loss, argnums=(0, 1))(table, unembed)

    @jax.jit
    def sharded(table, unembed):
        with sharding.use_mesh(mesh):
            return jax.value_and_grad(loss, argnums=(0, 1))(table, unembed)

    put = lambda x, axes: jax.device_put(x, sharding.named_sharding(axes, x.shape, mesh))
    value, grads = sharded(put(table, ("vocab", "embed")), put(unembed, ("embed", "vocab")))
    assert np.isfinite(float(plain_value))
    np.testing.assert_allclose(float(value), float(plain_value), rtol=1e-6)
    for ours, theirs in zip(grads, plain_grads):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
