"""Training: exact accumulation, exact resume, mesh equivalence, frozen base, NaN halt, SIGTERM, config errors."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import make_hf_model, run_config
from jaxtune import JaxtuneError, config, from_pretrained, lora
from jaxtune.data import loader
from jaxtune.train import optim
from jaxtune.train.loop import train
from jaxtune.train.step import make_train_step, token_loss_sums


def losses(workdir):
    return [(m["step"], m.get("loss"), m.get("eval_loss")) for m in map(json.loads, open(workdir / "metrics.jsonl"))]


# --- the step -----------------------------------------------------------------------------------

def rows_with_uneven_supervision(seq_len=32, n=4, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (n, seq_len)).astype(np.int32)
    weights = np.zeros((n, seq_len), np.float32)
    for r, keep in enumerate([30, 3, 17, 9]):  # very different supervised counts per row
        weights[r, :keep] = 1
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "weights": weights,
            "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(seq_len, dtype=np.int32), (n, 1))}


@pytest.mark.parametrize("method, attention", [("lora", "xla"), ("full", "xla"), ("lora", "blocked")])
def test_accumulation_equals_one_big_batch(tmp_path, method, attention):
    path, _ = make_hf_model(tmp_path, num_key_value_heads=2)
    batch = rows_with_uneven_supervision()
    total = batch["weights"].sum()

    def one_update(k):
        model = from_pretrained(path, attention=attention)
        if method == "lora":
            lora.add_lora(model, rank=4, alpha=8, dropout=0.0, seed=1)
            for name in lora.LINEAR_MODULES:  # non-zero B so both factors get gradients
                linear = getattr(model.layers, name)
                linear.lora_b[...] = jax.random.normal(jax.random.key(2), linear.lora_b.shape) * 0.1
        graphdef, trainable, frozen = lora.split_trainable(model, method)
        tx = optim.optimizer(optax.constant_schedule(1e-2), weight_decay=0.1, max_grad_norm=1.0, b1=0.9, b2=0.999,
                             grad_accum_steps=k)
        opt_state = tx.init(trainable)
        step = jax.jit(make_train_step(graphdef, tx, loss_chunk=8))
        micro = 4 // k
        for i in range(k):
            chunk = {name: v[i * micro:(i + 1) * micro] for name, v in batch.items()}
            trainable, opt_state, metrics = step(trainable, frozen, opt_state, chunk, jnp.float32(total / k), None)
        return trainable, float(metrics["grad_norm"])

    (big, big_norm), (accumulated, accumulated_norm) = one_update(1), one_update(2)
    for x, y in zip(jax.tree.leaves(big), jax.tree.leaves(accumulated)):
        err = float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x))
        assert err < 1e-5, err
    # the logged grad_norm is the accumulated gradient's (what the update uses), not the last micro-batch's
    assert abs(accumulated_norm - big_norm) / big_norm < 1e-5, (accumulated_norm, big_norm)
    # and the update did something (the identity is not trivially true)
    before = lora.split_trainable(from_pretrained(path), "full")[1] if method == "full" else None
    if before is not None:
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(big)))


def test_chunked_loss_equals_full_logits(tmp_path):
    path, _ = make_hf_model(tmp_path, num_key_value_heads=2)
    model = from_pretrained(path)
    batch = rows_with_uneven_supervision()
    total, count = token_loss_sums(model, batch, None, loss_chunk=8)
    logits = model(batch["tokens"]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    np.testing.assert_allclose(float(total), float((ce * batch["weights"]).sum()), rtol=1e-6)
    assert float(count) == batch["weights"].sum()


def test_lora_with_zero_b_is_exactly_the_base(tmp_path):
    path, _ = make_hf_model(tmp_path, num_key_value_heads=2)
    tokens = np.arange(40)[None] % 256
    base = np.asarray(from_pretrained(path)(tokens))
    model = lora.add_lora(from_pretrained(path), rank=8, alpha=16, targets="all-linear")
    assert model.layers.q_proj.lora_a.shape == (2, 64, 8) and float(jnp.abs(model.layers.q_proj.lora_a[...]).max()) <= 1 / 8
    np.testing.assert_array_equal(np.asarray(model(tokens)), base)
    graphdef, trainable, frozen = lora.split_trainable(model, "lora", "embed_tokens")
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert "embed" in names and "layers/q_proj/lora_a" in names and "layers/q_proj/kernel" not in names


def test_lora_targets_and_errors():
    assert lora.resolve_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert lora.resolve_targets("re:^(gate|up)_") == ["gate_proj", "up_proj"]
    assert len(lora.resolve_targets("all-linear")) == 7
    with pytest.raises(JaxtuneError, match=r"unknown module\(s\) \['qproj'\]"):
        lora.resolve_targets("qproj")


def test_auto_lr_arithmetic():
    lr, text = optim.auto_lr(3e-4, supervised_tokens_per_epoch=400_000, steps=100, epochs=1.0,
                             pretrained_batch_tokens=4_000_000)
    assert lr == pytest.approx(3e-4 * (4_000 / 4_000_000) ** 0.5)
    assert "sqrt(4,000 / 4,000,000)" in text


def test_no_decay_on_norms_and_biases():
    mask = optim.decay_mask({"layers": {"attn_norm": 1, "q_proj": {"kernel": 1, "bias": 1}}, "final_norm": 1, "embed": 1})
    assert mask == {"layers": {"attn_norm": False, "q_proj": {"kernel": True, "bias": False}}, "final_norm": False,
                    "embed": True}


# --- the loop -------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["xla", "blocked"])
def test_resume_is_exact_and_sigterm_checkpoints(tiny_dir, chat_data, tmp_path, monkeypatch, attention):
    straight = tmp_path / "straight"
    train(run_config(tiny_dir, chat_data, straight, **{"model.attention": attention}))
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 6 and (straight / "curves.png").stat().st_size > 10_000

    resumed = tmp_path / "resumed"
    real_next = loader.Batches.next_step

    def next_step_then_sigterm(self):
        if self.state["position"] == 4:  # a preemption notice arrives during step 5
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self)

    monkeypatch.setattr(loader.Batches, "next_step", next_step_then_sigterm)
    first = train(run_config(tiny_dir, chat_data, resumed, **{"model.attention": attention}))
    assert first["steps"] == 5 and "SIGTERM received: checkpoint saved at step 5" in first["stopped"]
    assert sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())[-1] == 5
    monkeypatch.setattr(loader.Batches, "next_step", real_next)
    train(run_config(tiny_dir, chat_data, resumed, **{"model.attention": attention}))  # the same command again: resumes at step 5
    assert losses(resumed) == losses(straight)  # bitwise, train and eval


def test_frozen_base_unchanged_and_single_compile(tiny_dir, chat_data, tmp_path, caplog):
    import logging

    base = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(from_pretrained(tiny_dir)))}
    captured = {}
    real_split = lora.split_trainable

    def keep_frozen(*args, **kwargs):
        out = real_split(*args, **kwargs)
        captured["frozen"] = out[2]
        return out

    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            import jaxtune.train.loop as loop_module

            loop_module.lora.split_trainable = keep_frozen
            train(run_config(tiny_dir, chat_data, tmp_path / "w", **{"checkpoint.every_steps": 100}))
    finally:
        jax.config.update("jax_log_compiles", False)
        loop_module.lora.split_trainable = real_split
    for path, var in nnx.to_flat_state(captured["frozen"]):
        np.testing.assert_array_equal(np.asarray(var[...]), base["/".join(map(str, path))])
    compiles = [r.getMessage() for r in caplog.records if "train_step" in r.getMessage() and "ompil" in r.getMessage()]
    assert len([m for m in compiles if m.startswith("Finished XLA compilation")]) == 1, compiles


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_same_losses_on_one_device_and_meshes(tiny_dir, chat_data, tmp_path, capfd, fresh_compiles):
    """Full fine-tuning (tied embeddings: the lookup and the loss share the vocabulary-parallel table)
    on meshes that shard the vocabulary over tensor and the hidden size over fsdp: the 1-device losses,
    and XLA never falls back to gathering a whole table ("involuntary full rematerialization")."""
    results = {}
    for mesh in [(1, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)]:
        workdir = tmp_path / "x".join(map(str, mesh))
        train(run_config(tiny_dir, chat_data, workdir, **{
            "train.micro_batch_size": 8, "train.max_steps": 3, "eval.every_steps": 0, "mesh.data": mesh[0],
            "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2], "method": "full", "checkpoint.every_steps": 100}))
        results[mesh] = np.array([loss for _, loss, _ in losses(workdir) if loss is not None])
    for mesh in [(2, 2, 2), (1, 8, 1), (1, 1, 8)]:
        np.testing.assert_allclose(results[mesh], results[(1, 1, 1)], rtol=1e-5)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_nan_halts_and_keeps_the_last_good_checkpoint(tiny_dir, chat_data, tmp_path):
    workdir = tmp_path / "nan"
    train(run_config(tiny_dir, chat_data, workdir, **{"train.max_steps": 3, "eval.every_steps": 0}))
    ckpt = workdir / "checkpoints" / "3"
    before = {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    with pytest.raises(JaxtuneError, match=r"the parameters became (nan|inf) at step 4: training stopped. The last "
                                           r"good checkpoint \(step 3\)"):
        train(run_config(tiny_dir, chat_data, workdir, **{"train.max_steps": 6, "train.lr": "1e30",
                                                          "eval.every_steps": 0, "checkpoint.every_steps": 1,
                                                          "resume.allow_changes": "train.max_steps,train.lr"}))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    assert {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


def test_unknown_config_key_is_an_error(capsys, tmp_path):
    from jaxtune.cli import main

    assert main(["train", "configs/quickstart.py", "--config.train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert "stpes" in err and "Traceback" not in err
    preset = tmp_path / "bad.py"
    preset.write_text("from jaxtune.config import base_config\n\ndef get_config():\n    c = base_config()\n"
                      "    c.unlock()\n    c.train.learning_rate = 1.0\n    return c\n")
    with pytest.raises(JaxtuneError, match=r"unknown config key\(s\) \['train.learning_rate'\]"):
        config.load(str(preset), [])
    with pytest.raises(JaxtuneError, match=r"method='lroa': must be one of"):
        config.load("configs/quickstart.py", ["--config.method=lroa"])


def test_every_preset_loads():
    import glob

    for preset in sorted(glob.glob("configs/*.py")):
        if not preset.endswith("base.py"):
            cfg = config.load(preset, [])
            assert cfg.model.path and cfg.data.train, preset


def test_fused_cross_entropy_value_and_gradients_equal_the_plain_loss():
    """The loss whose gradient is formed in the forward pass (one device) against full float32 logits:
    the same value, d hidden and d unembed (when it trains), and d hidden alone when it does not."""
    from jaxtune.train.step import fused_cross_entropy

    rng = np.random.default_rng(0)
    n, b, c, d, v = 3, 2, 8, 16, 50
    hidden = jnp.asarray(rng.standard_normal((n, b, c, d)), jnp.float32)
    unembed = jnp.asarray(rng.standard_normal((d, v)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (n, b, c)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (n, b, c)), jnp.float32)

    def plain(h, u):
        logits = jnp.einsum("NBCD,DV->NBCV", h, u)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weights)

    with jax.default_matmul_precision("highest"):
        value, (dh, du) = jax.value_and_grad(lambda h, u: 3.0 * fused_cross_entropy(h, u, targets, weights),
                                             argnums=(0, 1))(hidden, unembed)
        ref_value, (ref_dh, ref_du) = jax.value_and_grad(lambda h, u: 3.0 * plain(h, u), argnums=(0, 1))(hidden, unembed)
        dh_frozen = jax.grad(lambda h: 3.0 * fused_cross_entropy(h, unembed, targets, weights))(hidden)
    assert abs(float(value - ref_value)) < 1e-5 * abs(float(ref_value))
    for ours, ref in [(dh, ref_dh), (du, ref_du), (dh_frozen, ref_dh)]:
        assert float(jnp.max(jnp.abs(ours - ref)) / jnp.max(jnp.abs(ref))) < 1e-5
