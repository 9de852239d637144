"""Export and import: merged HF dirs and PEFT adapters, checked by transformers and peft themselves."""
import json
import warnings

import numpy as np
import pytest
from flax import nnx

from conftest import make_hf_model, rel_err, run_config, torch_logits
from jaxtune import JaxtuneError, from_pretrained, lora
from jaxtune.export import export, load_run
from jaxtune.train.loop import train


@pytest.fixture(scope="module")
def lora_run(tiny_dir, chat_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_run")
    train(run_config(tiny_dir, chat_data, workdir, **{"train.max_steps": 3, "eval.every_steps": 0,
                                                      "lora.modules_to_save": "embed_tokens", "lora.rslora": True}))
    return workdir


def peft_load_warnings(base_dir, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return model, [str(w.message) for w in caught if "key" in str(w.message).lower()]


def test_merged_and_adapter_exports_match(lora_run, tiny_dir, tmp_path):
    import transformers

    model, _, step = load_run(lora_run)
    assert step == 3
    b = np.asarray(model.layers.q_proj.lora_b[...])
    assert np.abs(b).max() > 0  # training moved B away from zero, so the check below means something
    tokens = np.random.RandomState(0).randint(0, 49152, (1, 50))
    ours = np.asarray(model(tokens))

    merged = export(lora_run, tmp_path / "merged", kind="merged")
    assert merged["parity_rel_err"] < 1e-4
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert rel_err(torch_logits(ref.eval(), tokens), ours) < 1e-4
    assert (tmp_path / "merged" / "chat_template.jinja").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    # older readers (transformers 4, llama.cpp's converter) find the rope base and the chat template
    hf = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert hf["rope_theta"] == hf["rope_parameters"]["rope_theta"] == 10000.0 and hf["rope_scaling"] is None
    tokenizer_config = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == (tmp_path / "merged" / "chat_template.jinja").read_text()
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"base_model: {tiny_dir}" in card and "library_name: transformers" in card and "| 3 |" in card

    adapter = export(lora_run, tmp_path / "adapter", kind="adapter")
    assert adapter["parity_rel_err"] < 1e-4
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is True and cfg["r"] == 16
    assert cfg["modules_to_save"] == ["embed_tokens"] and len(cfg["target_modules"]) == 7
    from peft import LoraConfig

    assert set(LoraConfig(task_type="CAUSAL_LM").to_dict()) <= set(cfg)  # every field peft itself writes
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert card.startswith("---\n") and f"base_model: {tiny_dir}" in card and "library_name: peft" in card
    assert "LoRA r=16, alpha=32, on down_proj, gate_proj" in card and 'PeftModel.from_pretrained(base, "adapter")' in card
    peft_model, key_warnings = peft_load_warnings(tiny_dir, tmp_path / "adapter")
    assert key_warnings == []
    assert rel_err(torch_logits(peft_model, tokens), ours) < 1e-4


def test_bfloat16_merged_export(lora_run, tmp_path):
    result = export(lora_run, tmp_path / "bf16", kind="merged", dtype="bfloat16")
    assert 0 < result["parity_rel_err"] < 2e-2
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_peft_made_adapter_imports_exactly(tiny_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)  # non-zero A and B
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    tokens = np.random.RandomState(1).randint(0, 49152, (1, 40))
    theirs = torch_logits(peft_model.eval(), tokens)

    model = from_pretrained(tiny_dir)
    cfg = lora.load_peft_adapter(model, tmp_path / "peft_adapter")
    assert cfg["r"] == 4 and model.layers.k_proj.lora_a is None and model.layers.q_proj.lora_scale == 3.0
    assert rel_err(np.asarray(model(tokens)), theirs) < 1e-4


def test_init_from_starts_a_run_from_the_adapter(tiny_dir, chat_data, lora_run, tmp_path):
    export(lora_run, tmp_path / "adapter", kind="adapter", verify=False)
    workdir = tmp_path / "continued"
    train(run_config(tiny_dir, chat_data, workdir, **{"train.max_steps": 1, "eval.every_steps": 0,
                                                      "lora.init_from": str(tmp_path / "adapter"),
                                                      "lora.modules_to_save": "embed_tokens"}))
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    trained = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    # the imported adapter starts where the first run ended, not from the base model's loss
    assert first["eval_loss"] == pytest.approx(trained[-1]["eval_loss"], rel=1e-4)


def test_full_fine_tune_export_reloads_bitwise(tiny_dir, chat_data, tmp_path):
    workdir = tmp_path / "full"
    train(run_config(tiny_dir, chat_data, workdir, **{"method": "full", "train.max_steps": 2, "eval.every_steps": 0}))
    model, _, _ = load_run(workdir)
    export(workdir, tmp_path / "out", kind="merged")
    reloaded = from_pretrained(tmp_path / "out")
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    changed = 0
    for path, var in nnx.to_flat_state(nnx.state(reloaded, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(ours[path][...]))
    base = dict(nnx.to_flat_state(nnx.state(from_pretrained(tiny_dir), nnx.Param)))
    changed = sum(not np.array_equal(np.asarray(v[...]), np.asarray(base[p][...])) for p, v in ours.items())
    assert changed > 5  # a full fine-tune moved the weights


def test_bad_exports(lora_run, tiny_dir, chat_data, tmp_path, capsys):
    from jaxtune.cli import main

    code = main(["export", str(lora_run), "--out", str(tmp_path / "x"), "--merged", "--step", "7"])
    assert code == 2 and "no checkpoint for step 7; available: [3]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((lora_run / "config.json").read_text())
    with pytest.raises(JaxtuneError, match="no checkpoints; train first"):
        export(empty, tmp_path / "y", kind="adapter")
    with pytest.raises(JaxtuneError, match=r"nowhere/config.json: not found; is .* a jaxtune workdir"):
        export(tmp_path / "nowhere", tmp_path / "z", kind="merged")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_failed_parity_gate_writes_nothing(lora_run, tmp_path, monkeypatch):
    from jaxtune import export as export_module

    monkeypatch.setitem(export_module.TOLERANCE, "float32", 1e-12)
    with pytest.raises(JaxtuneError, match=r"parity check failed, relative error .* > 1e-12"):
        export(lora_run, tmp_path / "gated", kind="merged")
    assert list(tmp_path.iterdir()) == []


def test_adapter_for_another_base_is_refused(tmp_path):
    small, _ = make_hf_model(tmp_path / "small")
    other, _ = make_hf_model(tmp_path / "other", hidden_size=32, num_attention_heads=2, num_key_value_heads=2)
    model = lora.add_lora(from_pretrained(other), rank=4, alpha=8)
    from safetensors.numpy import save_file

    (tmp_path / "adapter").mkdir()
    save_file(lora.adapter_tensors(model), str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(lora.adapter_config(
        model, alpha=8, dropout=0.0, rslora=False, modules_to_save="", base_model="other")))
    with pytest.raises(JaxtuneError, match=r"layers.0.mlp.down_proj has lora_A \[4, 128\] / lora_B \[32, 4\], "
                                           r"the base model needs \[4, 128\] / \[64, 4\]: .*different base model"):
        lora.load_peft_adapter(from_pretrained(small), tmp_path / "adapter")


def test_verify_command(tiny_dir, capsys):
    from jaxtune.cli import main

    assert main(["verify", str(tiny_dir)]) == 0
    assert "jaxtune vs transformers" in capsys.readouterr().out


@pytest.mark.slow
def test_real_smollm2_lora_export(smollm2_dir, chat_data, tmp_path):
    workdir = tmp_path / "smol"
    train(run_config(smollm2_dir, chat_data, workdir, **{"train.max_steps": 2, "eval.every_steps": 0,
                                                         "data.seq_len": 64, "train.micro_batch_size": 2,
                                                         "lora.rank": 8, "lora.targets": "q_proj,v_proj"}))
    assert export(workdir, tmp_path / "merged", kind="merged")["parity_rel_err"] < 1e-4
    assert export(workdir, tmp_path / "adapter", kind="adapter")["parity_rel_err"] < 1e-4


def test_classic_rope_keys_say_what_rope_parameters_say():
    """A llama3-scaled rope written both ways; transformers reads the classic keys alone (as an old
    config) to the same rope as the new ones alone."""
    import transformers

    from jaxtune.models.hf import with_classic_rope_keys

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = with_classic_rope_keys({"model_type": "llama", "rope_parameters": dict(rope)})
    assert hf["rope_theta"] == 500000.0 and hf["rope_scaling"]["factor"] == 32.0 and "rope_theta" not in hf["rope_scaling"]
    classic = transformers.LlamaConfig(rope_theta=hf["rope_theta"], rope_scaling=hf["rope_scaling"])
    both = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    assert classic.rope_parameters == both.rope_parameters == transformers.LlamaConfig(rope_parameters=rope).rope_parameters


def test_a_run_on_a_tokenizer_without_a_template_exports_the_chatml_it_trained_on(tiny_dir, chat_data, tmp_path,
                                                                                  capsys):
    """A base model (no chat template, EOS <|endoftext|>) trained on chat data: the log says jaxtune's ChatML
    is used; both exports carry it, transformers renders a conversation to the ids the run trained on,
    generation stops at <|im_end|>, and `generate --chat` answers."""
    import shutil

    from transformers import AutoTokenizer

    from jaxtune.cli import main
    from jaxtune.data.formats import Formatter, FormatOptions

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    (base / "chat_template.jinja").unlink()
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 0}))
    assert AutoTokenizer.from_pretrained(base).chat_template is None

    train(run_config(base, chat_data, tmp_path / "run", **{"train.max_steps": 1, "eval.every_steps": 0}))
    assert ("warning: chat template: ChatML, because the tokenizer in " f"{base} has none"
            in capsys.readouterr().out)
    record = json.loads((chat_data / "train.jsonl").read_text().splitlines()[0])
    trained_ids = Formatter(AutoTokenizer.from_pretrained(base), FormatOptions("chat")).tokenize([record]).sample(0)[0]
    for kind in ("merged", "adapter"):
        export(tmp_path / "run", tmp_path / kind, kind=kind)
        tok = AutoTokenizer.from_pretrained(tmp_path / kind)
        assert "<|im_start|>" in tok.chat_template
        assert json.loads((tmp_path / kind / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
        rendered = tok.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert list(rendered) == trained_ids.tolist()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"] == [0, im_end]
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "merged"), "--chat", "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    assert "tokens in" in capsys.readouterr().err
