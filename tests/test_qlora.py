"""QLoRA: a frozen NF4 base in the model, against a dense model holding the same dequantized weights."""
import json
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jaxtune_cli, make_hf_model, rel_err, run_config, torch_logits, write_config_file
from jaxtune import from_pretrained, lora, quant
from jaxtune.export import bnb_float32_layers, reference_model
from jaxtune.models.llama import LINEAR_MODULES, NF4Kernel, parameter_count
from jaxtune.train.step import token_loss_sums

OPTIONS = quant.QuantOptions(LINEAR_MODULES)


def dequantized_twin(path, model_nf4):
    """The dense model whose kernels are exactly the NF4 model's dequantized weights."""
    dense = from_pretrained(path)
    for name in LINEAR_MODULES:
        kernel: NF4Kernel = getattr(model_nf4.layers, name).kernel
        stack = kernel.nf4()  # bitsandbytes' bytes, as quant.quantize made them
        layers = [quant.dequantize(jax.tree.map(lambda a: a[i], stack)).T for i in range(kernel.shape[0])]
        getattr(dense.layers, name).kernel.set_value(jnp.stack(layers))
    return dense


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("tiny"), num_key_value_heads=2)
    return path


def test_nf4_model_computes_its_dequantized_weights(tiny):
    model = from_pretrained(tiny, quantize=OPTIONS)
    assert isinstance(model.layers.q_proj.kernel, NF4Kernel)
    assert model.layers.q_proj.kernel.words[...].dtype == jnp.uint32
    tokens = np.arange(40)[None] % 256
    ours = np.asarray(model(tokens))
    twin = np.asarray(dequantized_twin(tiny, model)(tokens))
    assert np.linalg.norm(ours - twin) / np.linalg.norm(twin) < 1e-6
    dense = np.asarray(from_pretrained(tiny)(tokens))  # and 4 bits do change the logits, a little
    assert 1e-4 < np.linalg.norm(ours - dense) / np.linalg.norm(dense) < 0.2


def test_lora_gradients_on_nf4_equal_those_on_the_dequantized_base(tiny):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 32)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "weights": np.ones((2, 32), np.float32),
             "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(32, dtype=np.int32), (2, 1))}

    def lora_grads(model):
        lora.add_lora(model, rank=4, alpha=8, seed=1)
        for name in LINEAR_MODULES:  # non-zero B, so A gets a gradient too
            linear = getattr(model.layers, name)
            linear.lora_b[...] = jax.random.normal(jax.random.key(3), linear.lora_b.shape) * 0.1
        graphdef, trainable, frozen = lora.split_trainable(model, "qlora")
        loss = lambda t: token_loss_sums(nnx.merge(graphdef, t, frozen), batch, None, 16)[0]  # noqa: E731
        return jax.grad(loss)(trainable), frozen

    model = from_pretrained(tiny, quantize=OPTIONS)
    twin = dequantized_twin(tiny, model)
    grads_nf4, frozen = lora_grads(model)
    grads_dense, _ = lora_grads(twin)
    for a, b in zip(jax.tree.leaves(grads_nf4), jax.tree.leaves(grads_dense)):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-6
    quantized = [p for p, _ in nnx.to_flat_state(frozen) if "words" in p]
    assert len(quantized) == len(LINEAR_MODULES)  # the NF4 codes are frozen state, not trainable


def test_qlora_run_trains_and_keeps_its_base_frozen(tiny_dir, chat_data, tmp_path, monkeypatch, capsys):
    import jaxtune.train.loop as loop

    captured = {}
    real_split = lora.split_trainable

    def keep_frozen(*args, **kwargs):
        out = real_split(*args, **kwargs)
        captured["frozen"] = out[2]  # the arrays the loop trains against (donation would delete them)
        return out

    monkeypatch.setattr(loop.lora, "split_trainable", keep_frozen)
    summary = loop.train(run_config(tiny_dir, chat_data, tmp_path / "q", method="qlora",
                                    **{"eval.every_steps": 0, "train.max_steps": 4}))
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    dense = parameter_count(lora.add_lora(from_pretrained(tiny_dir), rank=16, alpha=32))  # LoRA's count of it
    log = capsys.readouterr().out
    assert f": {dense:,} parameters, " in log, log  # NF4 weights count as the dense weights they stand for
    assert "frozen base in NF4: blocks of 64, double quantization, on q_proj, k_proj" in log
    recorded = json.loads((tmp_path / "q" / "config.json").read_text())["resolved"]["quant"]
    assert recorded == {"block_size": 64, "double_quant": True, "modules": list(LINEAR_MODULES)}
    model = from_pretrained(tiny_dir, quantize=OPTIONS)  # the base, quantized again from the same files
    _, _, frozen = real_split(lora.add_lora(model, rank=16, alpha=32), "qlora")
    for (path, before), (_, after) in zip(nnx.to_flat_state(frozen), nnx.to_flat_state(captured["frozen"])):
        np.testing.assert_array_equal(np.asarray(before[...]), np.asarray(after[...]), err_msg=str(path))


def test_compiled_qlora_step_holds_no_dense_stack_of_a_quantized_kernel(tmp_path):
    """The jitted LoRA train step on an NF4 base: no buffer of a dense stacked kernel ([layers, in, out]
    or its transpose) anywhere in the optimized program, forward or backward (a dense residual per layer
    would be stacked by the scan)."""
    import optax

    from jaxtune.train import optim
    from jaxtune.train.step import make_train_step

    path, _ = make_hf_model(tmp_path, num_key_value_heads=2, intermediate_size=192)
    model = lora.add_lora(from_pretrained(path, quantize=OPTIONS), rank=4, alpha=8)
    graphdef, trainable, frozen = lora.split_trainable(model, "qlora")
    tx = optim.optimizer(optax.constant_schedule(1e-3), weight_decay=0.0, max_grad_norm=1.0, b1=0.9, b2=0.999,
                         grad_accum_steps=1)
    tokens = np.zeros((2, 48), np.int32)  # B x T = 96: no activation [layers, B x T, 192] looks like a kernel
    batch = {"tokens": tokens, "targets": tokens, "weights": np.ones((2, 48), np.float32),
             "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(48, dtype=np.int32), (2, 1))}
    step = jax.jit(make_train_step(graphdef, tx, 16))
    hlo = step.lower(trainable, frozen, tx.init(trainable), batch, jnp.float32(96), None).compile().as_text()
    dense_mlp_kernel = ["f32[2,64,192]", "f32[2,192,64]"]  # gate/up [in, out] and down, stacked over 2 layers
    assert not [s for s in dense_mlp_kernel if s in hlo]
    twin = lora.add_lora(from_pretrained(path), rank=4, alpha=8)  # the check can fail: a dense base has them
    graphdef, trainable, frozen = lora.split_trainable(twin, "lora")
    hlo = jax.jit(make_train_step(graphdef, tx, 16)).lower(trainable, frozen, tx.init(trainable), batch,
                                                         jnp.float32(96), None).compile().as_text()
    assert [s for s in dense_mlp_kernel if s in hlo]


@pytest.fixture(scope="module")
def smollm2_bnb4(smollm2_dir, tmp_path_factory):
    """The real SmolLM2-135M quantized by transformers + bitsandbytes (NF4, double quant) and saved."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=config, dtype=torch.float32,
                                                 device_map="cpu")
    out = tmp_path_factory.mktemp("smollm2-bnb-4bit")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(smollm2_dir / name, out / name)
    bnb_float32_layers(model)  # the reference: bitsandbytes' float32 path on any CPU
    return out, model


def test_bitsandbytes_checkpoint_loads_as_is_and_computes_like_transformers(smollm2_bnb4, smollm2_dir):
    from safetensors.numpy import load_file

    import torch

    path, reference = smollm2_bnb4
    model = from_pretrained(path, quantize=quant.QuantOptions(()))  # the checkpoint says what is 4-bit
    stored = load_file(str(path / "model.safetensors"))
    kernel = model.layers.q_proj.kernel
    np.testing.assert_array_equal(kernel.nf4().packed[3], stored["model.layers.3.self_attn.q_proj.weight"][:, 0])
    np.testing.assert_array_equal(np.asarray(kernel.absmax[...][3]), stored["model.layers.3.self_attn.q_proj.weight.absmax"])
    tokens = np.array([[1, 504, 3458, 282, 4649, 314, 21, 3458, 4649, 314, 216, 23]])
    ours = np.asarray(model(tokens))
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens)).logits.float().numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4
    with pytest.raises(Exception, match="bitsandbytes 4-bit checkpoint .* method='qlora'"):
        from_pretrained(path)


@pytest.mark.parametrize("damage, needle", [
    ("missing absmax", "tensor model.layers.0.self_attn.q_proj.weight.absmax is missing"),
    ("fp4", "quantized as 'fp4'; jaxtune trains NF4 bases only"),
    ("wrong shape", "is a 4-bit weight of shape [576, 1152]"),
])
def test_bad_bitsandbytes_checkpoints_are_one_clear_error(smollm2_bnb4, tmp_path, damage, needle):
    import json

    from safetensors.numpy import load_file, save_file

    from jaxtune import JaxtuneError

    path = tmp_path / "bad"
    shutil.copytree(smollm2_bnb4[0], path)
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    if damage == "missing absmax":
        del tensors[f"{name}.absmax"]
    else:
        state = json.loads(bytes(tensors[f"{name}.quant_state.bitsandbytes__nf4"]).decode())
        state.update({"quant_type": "fp4"} if damage == "fp4" else {"shape": [576, 1152]})
        tensors[f"{name}.quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(JaxtuneError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        from_pretrained(path, quantize=quant.QuantOptions(()))


def test_qlora_run_on_a_bitsandbytes_base_exports_for_peft_and_merged(smollm2_bnb4, chat_data, tmp_path):
    """Train on the bnb-4bit SmolLM2 as it is; the adapter, loaded by peft on that same bnb base in
    transformers, and the merged export (dequantized base + delta), both pass the parity gate."""
    from jaxtune.export import export
    from jaxtune.train.loop import train

    workdir = tmp_path / "run"
    train(run_config(smollm2_bnb4[0], chat_data, workdir, method="qlora", **{
        "train.max_steps": 2, "eval.every_steps": 0, "data.seq_len": 64, "train.micro_batch_size": 2}))
    adapter = export(workdir, tmp_path / "adapter", kind="adapter")
    assert adapter["parity_rel_err"] < 1e-4
    merged = export(workdir, tmp_path / "merged", kind="merged")
    assert merged["parity_rel_err"] < 1e-4
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


def test_jaxtune_quantize_writes_what_transformers_writes_and_loads(smollm2_bnb4, smollm2_dir, tmp_path):
    """`jaxtune quantize` of the dense SmolLM2 gives transformers' own bnb-4bit save of it: the same
    tensors, dtypes and shapes, the same packed codes, code tables and quantization_config; nested codes
    as bitsandbytes' reference kernel computes them (its CPU kernel is one code off for a few, see
    test_quant); transformers + bitsandbytes loads it into Linear4bit modules and computes what jaxtune does."""
    import torch
    from safetensors.numpy import load_file

    from jaxtune.models.bnb import BNB_MODEL_KIND

    theirs_dir, _ = smollm2_bnb4
    out = tmp_path / "q"
    proc = jaxtune_cli("quantize", smollm2_dir, "--out", out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(theirs_dir / "model.safetensors"))
    assert set(ours) == set(theirs)
    nested_equal = nested_total = 0
    for name, array in ours.items():
        if name.endswith(".quant_state.bitsandbytes__nf4"):
            mine, their = json.loads(bytes(array)), json.loads(bytes(theirs[name]))
            assert mine.pop("nested_offset") == pytest.approx(their.pop("nested_offset"), rel=1e-6), name
            assert mine == their, name  # everything but the float32 mean's last bits (torch's summation order)
            continue
        assert (array.dtype, array.shape) == (theirs[name].dtype, theirs[name].shape), name
        if name.endswith(".absmax"):
            nested_equal, nested_total = nested_equal + np.sum(array == theirs[name]), nested_total + array.size
        elif name.endswith(".nested_absmax"):
            np.testing.assert_allclose(array, theirs[name], rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(array, theirs[name], err_msg=name)
    assert nested_equal / nested_total >= 0.995
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((theirs_dir / "config.json").read_text())["quantization_config"]
    assert json.loads((out / "jaxtune_export.json").read_text())["kind"] == BNB_MODEL_KIND

    reference = reference_model(out)
    assert type(reference.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    tokens = np.array([[1, 504, 3458, 282, 4649, 314, 21, 3458, 4649, 314, 216, 23]])
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.float().numpy()
    model = from_pretrained(out, quantize=quant.QuantOptions(()))
    assert np.linalg.norm(np.asarray(model(tokens)) - expected) / np.linalg.norm(expected) < 1e-4


def test_jaxtune_quantize_keeps_named_modules_dense_and_refuses_bad_input(smollm2_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from jaxtune.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(smollm2_dir), "--out", str(out), "--dense-modules", "down_proj",
                 "--no-double-quant"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == [
        "lm_head", "down_proj"]
    for args, needle in [
        ([str(out), "--out", str(tmp_path / "again")], "already a bitsandbytes 4-bit checkpoint"),
        ([str(smollm2_dir), "--out", str(out)], "already holds a jaxtune bnb-4bit-model export; pass --overwrite"),
        ([str(smollm2_dir), "--out", str(tmp_path / "b"), "--block-size", "256"],
         "has rows of 576 values, which NF4 block size 256 does not divide: use --block-size 64, or keep q_proj "
         "dense with --dense-modules q_proj"),
        ([str(smollm2_dir), "--out", str(tmp_path / "c"), "--dense-modules", "mlp"], "mlp is not a linear module"),
    ]:
        assert main(["quantize", *args]) == 2
        assert needle in capsys.readouterr().err


def test_qlora_run_on_a_dense_base_exports_what_it_trained(smollm2_dir, chat_data, tmp_path):
    """A QLoRA run on the dense SmolLM2 trains on its NF4 quantization: --merged writes the dequantized NF4
    base plus the delta, and --adapter is checked by peft on the base as bitsandbytes quantizes it."""
    from jaxtune.export import export
    from jaxtune.train.loop import train

    workdir = tmp_path / "run"
    train(run_config(smollm2_dir, chat_data, workdir, method="qlora", **{
        "train.max_steps": 2, "eval.every_steps": 0, "data.seq_len": 64, "train.micro_batch_size": 2,
        "train.lr": "3e-3"}))
    adapter = export(workdir, tmp_path / "adapter", kind="adapter")
    merged = export(workdir, tmp_path / "merged", kind="merged")
    assert adapter["parity_rel_err"] < 1e-4 and merged["parity_rel_err"] < 1e-4
    assert "quantization_config=nf4" in (tmp_path / "adapter" / "README.md").read_text()  # how to load its base
    # Independently of export's own gate: the trained model is the NF4 base plus the adapter.
    tokens = np.array([[1, 504, 3458, 282, 4649, 314, 21, 3458, 4649, 314, 216, 23]])
    def with_adapter(model):
        lora.load_peft_adapter(model, tmp_path / "adapter")
        return np.asarray(model(tokens))

    trained = with_adapter(from_pretrained(smollm2_dir, quantize=OPTIONS))
    assert rel_err(trained, torch_logits(reference_model(tmp_path / "merged"), tokens)) < 1e-4
    on_dense = with_adapter(from_pretrained(smollm2_dir))
    print(f"trained (NF4 base + LoRA) vs the dense base + LoRA: {rel_err(trained, on_dense):.3g}")
    assert rel_err(trained, on_dense) > 1e-3  # the check above can fail: the dense base is another model


@pytest.fixture(scope="module")
def tiny_bnb(tiny_dir, tmp_path_factory):
    """The tiny Llama with the SmolLM2 tokenizer, written as a bitsandbytes 4-bit directory."""
    from jaxtune.models.bnb import quantize_checkpoint

    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("bnb") / "tiny-bnb", OPTIONS)


def test_a_bitsandbytes_base_trains_as_stored_and_says_which_quant_keys_do_not_apply(tiny_bnb, chat_data, tmp_path,
                                                                                    capsys):
    from jaxtune.train.loop import train

    train(run_config(tiny_bnb, chat_data, tmp_path / "run", method="qlora", **{
        "quant.block_size": 128, "quant.double_quant": False, "quant.dense_modules": "down_proj",
        "train.max_steps": 1, "eval.every_steps": 0}))
    log = capsys.readouterr().out
    assert ("quant: the base is already NF4 (blocks of 64, double quantization, on q_proj, k_proj, v_proj, o_proj, "
            "gate_proj, up_proj, down_proj); it trains as stored; these keys do not apply to it: quant.block_size=128 "
            "(the checkpoint's: 64), quant.double_quant=False (the checkpoint's: True), quant.dense_modules='down_proj' "
            "(the checkpoint's: '')") in log, log
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["quant"]
    assert recorded == {"block_size": 64, "double_quant": True, "modules": list(LINEAR_MODULES)}


def test_estimate_refuses_lora_on_a_bitsandbytes_base_as_train_does_and_verify_compares_it(
        tiny_bnb, chat_data, tmp_path, capsys):
    from jaxtune import JaxtuneError
    from jaxtune.cli import main
    from jaxtune.train.loop import train

    cfg = run_config(tiny_bnb, chat_data, tmp_path / "run", method="lora")
    needle = f"{tiny_bnb}: a bitsandbytes 4-bit checkpoint (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj in NF4): train it with method='qlora'"
    assert main(["estimate", str(write_config_file(tmp_path / "lora.py", cfg))]) == 2
    assert needle in capsys.readouterr().err
    with pytest.raises(JaxtuneError) as refused:
        train(cfg)
    assert needle in str(refused.value)
    assert main(["verify", str(tiny_bnb)]) == 0  # compared (bitsandbytes' float32 path), not refused
    assert f"{tiny_bnb} (jaxtune vs transformers): logits relative error" in capsys.readouterr().out


def test_quantize_and_qlora_refuse_the_same_unblockable_model(smollm2_dir, chat_data, tmp_path, capsys):
    """Rows of 96 values: no NF4 block size jaxtune offers divides them. `jaxtune quantize` and a
    method='qlora' run say the same (before any weight loads), each in its own words for the fix."""
    from jaxtune import JaxtuneError
    from jaxtune.cli import main
    from jaxtune.train.loop import train

    path, _ = make_hf_model(tmp_path / "odd", vocab_size=49152, hidden_size=96, num_key_value_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, path / name)
    problem = ("model.layers.0.self_attn.q_proj.weight has rows of 96 values, which NF4 block size 64 does not divide: "
               "no NF4 block size jaxtune offers (64, 128, 256) divides it, or keep q_proj dense with ")
    assert main(["quantize", str(path), "--out", str(tmp_path / "q")]) == 2
    assert problem + "--dense-modules q_proj" in capsys.readouterr().err
    with pytest.raises(JaxtuneError) as refused:
        train(run_config(path, chat_data, tmp_path / "run", method="qlora"))
    assert problem + "quant.dense_modules=q_proj" in str(refused.value)
    assert main(["quantize", str(path), "--out", str(tmp_path / "q"), "--block-size", "128",
                 "--dense-modules", "q_proj,k_proj,v_proj,gate_proj,up_proj"]) == 2  # o_proj: rows of 96 too
    assert "o_proj.weight has rows of 96 values" in capsys.readouterr().err


def test_an_interrupted_quantize_leaves_no_scratch_behind(smollm2_dir, tmp_path):
    from jaxtune.cli import main

    out = tmp_path / "q"
    proc = jaxtune_cli("quantize", smollm2_dir, "--out", out)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".q.partial-*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.kill()  # SIGKILL mid-write: no `finally` runs
    proc.communicate()
    assert list(tmp_path.glob(".q.partial-*"))  # what the next run must clear
    assert main(["quantize", str(smollm2_dir), "--out", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
