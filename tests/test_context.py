"""Context parallelism on 8 CPU devices: the zigzag layout, attention and its gradients against the
one-device einsum reference, and a whole train step with mesh.context against one without."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import attention, context, sharding


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_order_is_a_permutation_with_equal_causal_work(cp):
    t = 64 * cp
    order = context.order(t, cp)
    assert sorted(order) == list(range(t))
    per_device = order.reshape(cp, t // cp)
    causal_pairs = [int((idx + 1).sum()) for idx in per_device]  # keys at or before each query
    assert max(causal_pairs) - min(causal_pairs) == 0
    contiguous = [np.flatnonzero(np.diff(idx) != 1).size for idx in per_device]
    assert max(contiguous) <= 1  # at most two runs per device (the middle one holds two adjacent chunks)


def packed_rows(b, t, seed=0):
    """Positions and segment ids of packed rows: documents of random lengths that cross every shard
    boundary, trailing padding (segment 0), and one row that is a single document."""
    rng = np.random.default_rng(seed)
    positions, segments = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for row in range(b):
        at, doc = 0, 1
        end = t if row == 0 else t - int(rng.integers(1, t // 8))
        while at < end:
            n = end - at if row == 0 else min(int(rng.integers(5, t // 3)), end - at)
            positions[row, at:at + n], segments[row, at:at + n] = np.arange(n), doc
            at, doc = at + n, doc + 1
    return positions, segments


MESHES = {"context=8": dict(data=1, fsdp=1, context=8, tensor=1),
          "fsdp=2,context=4": dict(data=1, fsdp=2, context=4, tensor=1),
          "data=2,context=2,tensor=2": dict(data=2, fsdp=1, context=2, tensor=2)}


CASES = [(mesh, backend) for mesh in MESHES for backend in ("blocked", "splash")
         if backend == "blocked" or mesh != "fsdp=2,context=4"]


@pytest.mark.parametrize("window", [None, 24], ids=["causal", "window"])
@pytest.mark.parametrize("mesh_name, backend", CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_context_attention_and_its_gradients_equal_the_reference(mesh_name, backend, window):
    """Output and dq, dk, dv (grouped-query heads: 8 query heads, 2 KV heads) of rows laid out in zigzag
    order over the mesh, un-permuted, equal the one-device einsum on the rows as they are (padding queries
    carry no gradient and are left out, as they carry no loss): the blocked einsum, and TPU splash
    attention with its load-balanced mask (in the Pallas interpreter)."""
    mesh_shape = MESHES[mesh_name]
    b, t, h, kv, d = 4, 256 if backend == "blocked" else 128 * mesh_shape["context"], 8, 2, 16  # splash: tiles of 128
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (b, t, n, d), jnp.float32) for key, n in zip(keys, (h, kv, kv)))
    positions, segments = packed_rows(b, t)
    cotangent = jax.random.normal(keys[3], (b, t, h * d)) * (segments != 0)[..., None]

    def reference(q, k, v):
        out = attention.masked(q, k, v, attention.mask(positions, segments, positions, segments, window))
        return jnp.sum(out * cotangent), out

    (_, want), want_grads = jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    mesh = sharding.make_mesh(**mesh_shape)
    cp = mesh_shape["context"]
    order = context.order(t, cp)
    shuffled = lambda x: jnp.take(x, order, axis=1)  # noqa: E731

    @jax.jit
    def parallel(q, k, v, pos, seg, cot):
        with sharding.use_mesh(mesh):
            def loss(q, k, v):
                out = context.attend(q, k, v, pos, seg, window, backend, interpret=True)
                return jnp.sum(out * cot), out
            return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, got), got_grads = parallel(*map(shuffled, (q, k, v, positions, segments, cotangent)))
    restore = np.argsort(order)
    unshuffled = lambda x: np.take(np.asarray(x), restore, axis=1)  # noqa: E731
    real = segments != 0
    np.testing.assert_allclose(unshuffled(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)
    for name, mine, theirs in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(unshuffled(mine), np.asarray(theirs), atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_training_with_mesh_context_equals_training_without_and_resumes_across_it(tiny_dir, chat_data, tmp_path):
    """The tiny Llama (GQA 4/2 heads) on packed chitchat rows: 4 steps with mesh.context=4 (fsdp=2) give the
    losses and LoRA weights of 4 steps with mesh.context=1; a run stopped at step 2 under context=4 and
    resumed under context=1 ends where both do."""
    import shutil

    from conftest import run_config

    from jaxtune.export import load_run
    from jaxtune.train.loop import train
    from jaxtune.train.metrics import read_metrics

    def run(workdir, context, steps):
        return train(run_config(tiny_dir, chat_data, workdir, **{
            "mesh.fsdp": 2, "mesh.context": context, "lora.dropout": 0.0, "train.max_steps": steps,
            "eval.every_steps": 2, "checkpoint.every_steps": 2}))

    def losses(workdir):  # {(kind, step): value}; a resumed run logs its step-2 evaluation again
        return {(k, e["step"]): e[k] for e in read_metrics(workdir) for k in ("loss", "eval_loss") if k in e}

    def lora_weights(workdir):
        from flax import nnx

        model, _, _ = load_run(workdir)
        return {path: np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}

    run(tmp_path / "plain", 1, 4)
    run(tmp_path / "split", 4, 4)
    shutil.copytree(tmp_path / "split", tmp_path / "switched")
    shutil.rmtree(tmp_path / "switched" / "checkpoints" / "4")  # as if stopped at step 2
    run(tmp_path / "switched", 1, 4)
    want = lora_weights(tmp_path / "plain")
    for name in ("split", "switched"):
        mine, theirs = losses(tmp_path / name), losses(tmp_path / "plain")
        assert sorted(mine) == sorted(theirs) and len(theirs) == 7, (mine, theirs)  # 4 steps, 3 evaluations
        np.testing.assert_allclose([mine[k] for k in sorted(theirs)], [theirs[k] for k in sorted(theirs)], rtol=1e-5)
        got = lora_weights(tmp_path / name)
        for path, value in want.items():
            np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-7, err_msg=f"{name}: {path}")


def test_the_compiled_step_gathers_keys_and_values_not_activations(tiny_dir, chat_data, tmp_path):
    """The optimized train step with mesh fsdp=2 x context=4, T=256: every all-gather of something row-sized
    is a key/value block [B, T, K, D] or a row of positions/segment ids [B, T]; no buffer is T x T, and no
    logits chunk holds more than a chunk's share of a device's tokens (loss_chunk=64: 16 per device)."""
    from conftest import run_config

    from jaxtune import aot, estimate, hlo
    from jaxtune.data import packing
    from jaxtune.train import loop

    t = 256
    cfg = run_config(tiny_dir, chat_data, tmp_path, **{"mesh.fsdp": 2, "mesh.context": 4, "data.seq_len": t,
                                                      "train.loss_chunk": 64, "model.remat": "full"})
    mesh = sharding.config_mesh(cfg.mesh)
    run = estimate.abstract_run(cfg, context=4)
    shardings = [sharding.state_shardings(s, mesh) for s in (run.trainable, run.frozen, run.opt_state)]
    steps = loop.jit_steps(cfg, mesh, run.graphdef, run.tx, *shardings, packing.ROW_FIELDS)
    text = steps.train_step.lower(*aot.train_args(cfg, steps, run.trainable, run.frozen, run.opt_state)).compile().as_text()
    comps, _ = hlo.parse(text)
    instrs = [i for body in comps.values() for i in body]
    mcfg = run.model_cfg
    gathered = [dims for i in instrs if i.op == "all-gather" for _, dims in hlo.shapes(i.shape) if t in dims]
    assert gathered, "no row-sized all-gather: is the row split at all?"
    for dims in gathered:
        kv_block = len(dims) == 4 and dims[1] == t and dims[2:] == (mcfg.num_kv_heads, mcfg.head_dim)
        assert kv_block or len(dims) == 2, f"an all-gather of {dims}: only K/V and positions/segments may be"
    every = [dims for i in instrs for _, dims in hlo.shapes(i.shape)]
    assert not [d for d in every if list(d).count(t) >= 2], "a T x T buffer"
    logits = [d for d in every if len(d) == 3 and d[-1] == mcfg.vocab_size and d[0] * d[1] > 2 * 16]  # [B, C, V]
    assert not logits, f"logits of more than a chunk's share: {logits}"


def test_the_backend_under_context_parallelism_and_what_is_refused():
    from jaxtune.errors import JaxtuneError

    assert attention.resolve("auto", 131072, None, "tpu", "TPU v4", context=4)[0] == "splash"
    assert attention.resolve("auto", 4096, 4096, "tpu", "TPU v4", context=4)[1].endswith("sliding window 4096")
    assert attention.resolve("auto", 4096, None, "tpu", "TPU v3", context=4)[0] == "blocked"  # no splash there
    assert attention.resolve("auto", 2 * 4 * 100, None, "tpu", "TPU v4", context=4)[0] == "blocked"  # 200 per chip
    assert attention.resolve("xla", 1024, None, "cpu", context=2)[0] == "blocked"
    with pytest.raises(JaxtuneError, match=r"^data.seq_len=1000 must be a multiple of 2 x mesh.context = 16 .* "
                                           r"set data.seq_len=1008$"):
        attention.resolve("auto", 1000, None, "cpu", context=8)
    with pytest.raises(JaxtuneError, match=r"needs data.seq_len / 4 to be a multiple of 128, got 800: set "
                                           r"data.seq_len=1024"):
        attention.resolve("splash", 800, None, "tpu", "TPU v4", context=4)
    with pytest.raises(JaxtuneError, match="model.attention='cudnn' does not run with mesh.context=2; use 'auto'"):
        attention.resolve("cudnn", 1024, None, "gpu", context=2)
    with pytest.raises(JaxtuneError, match="model.attention='splash' runs on tpu, not cpu"):
        attention.resolve("splash", 1024, None, "cpu", context=2)


def test_processes_holding_the_same_rows_are_fed_the_same_rows():
    """A context group inside each host: every process its own rows. One spanning the hosts: its processes
    are given the same rows. A layout where a host would hold pieces of two groups' rows is one line."""
    from types import SimpleNamespace

    from jaxtune.errors import JaxtuneError

    def mesh(hosts, fsdp=2, context=2):
        devices = np.array([SimpleNamespace(process_index=h) for h in hosts], object).reshape(1, fsdp, context, 1)
        return SimpleNamespace(devices=devices, shape={"data": 1, "fsdp": fsdp, "context": context, "tensor": 1})

    assert [sharding.row_feeds(mesh([0, 0, 1, 1]), p) for p in (0, 1)] == [(0, 2), (1, 2)]  # context in each host
    assert [sharding.row_feeds(mesh([0, 1, 0, 1]), p) for p in (0, 1)] == [(0, 1), (0, 1)]  # both rows on both hosts: one feed
    assert [sharding.row_feeds(mesh([0, 1, 2, 3], 2, 2), p) for p in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert sharding.row_feeds(mesh([0] * 4 + [1] * 4, 1, 8), 1) == (0, 1)  # one row over both hosts
    with pytest.raises(JaxtuneError, match=r"no host can be given whole rows .* put mesh.context inside a host"):
        sharding.row_feeds(mesh([0, 0, 0, 1, 1, 1], 3, 2), 0)  # host 0 holds all of row 0 and half of row 1


def test_offload_is_refused_on_cpu_before_anything_is_written(tiny_dir, chat_data, tmp_path):
    from conftest import run_config

    from jaxtune.errors import JaxtuneError
    from jaxtune.train.loop import train

    with pytest.raises(JaxtuneError, match=r"^model.remat='offload' keeps each layer's input in host memory, and on "
                                           r"CPU .*: use 'full'$"):
        train(run_config(tiny_dir, chat_data, tmp_path / "run", **{"model.remat": "offload"}))
    assert not (tmp_path / "run").exists()
