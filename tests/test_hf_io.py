"""HF checkpoints in and out: round trip through transformers, sharded files, and bad input."""
import json

import numpy as np
import pytest

from conftest import make_hf_model
from jaxtune import JaxtuneError, from_pretrained, save_pretrained


def load_with_transformers(path):
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_bitwise(tmp_path, tied):
    from safetensors.numpy import load_file

    src, ref = make_hf_model(tmp_path / "src", num_key_value_heads=2, tie_word_embeddings=tied, attention_bias=True)
    out = save_pretrained(from_pretrained(src), tmp_path / "out")
    reloaded = load_with_transformers(out)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    for name, tensor in reloaded.state_dict().items():
        assert np.array_equal(tensor.numpy(), theirs[name]), name
    assert set(load_file(out / "model.safetensors")) == set(load_file(src / "model.safetensors"))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_sharded_save_and_load(tmp_path):
    src, ref = make_hf_model(tmp_path / "src", num_key_value_heads=2)
    out = save_pretrained(from_pretrained(src), tmp_path / "out", shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    load_with_transformers(out)
    tokens = np.arange(20)[None]
    np.testing.assert_array_equal(np.asarray(from_pretrained(out)(tokens)), np.asarray(from_pretrained(src)(tokens)))


def test_bfloat16_params_save_as_bfloat16(tmp_path):
    import torch

    src, _ = make_hf_model(tmp_path / "src")
    out = save_pretrained(from_pretrained(src, dtype="bfloat16"), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_with_transformers(out)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 or model.dtype == torch.bfloat16


def test_model_built_from_a_config_saves_from_that_config(tmp_path):
    """No source directory: config.json is written from the ModelConfig, and transformers still loads it."""
    from flax import nnx

    from jaxtune import Llama

    src, ref = make_hf_model(tmp_path / "src", num_key_value_heads=2)
    loaded = from_pretrained(src)
    assert loaded.source_path == str(src)
    fresh = Llama(loaded.cfg, rngs=nnx.Rngs(1))
    assert fresh.source_path is None
    nnx.update(fresh, nnx.state(loaded))
    out = save_pretrained(fresh, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    for name, tensor in load_with_transformers(out).state_dict().items():
        assert np.array_equal(tensor.numpy(), theirs[name]), name


def test_save_never_leaves_half_a_directory(tmp_path, monkeypatch):
    from jaxtune.models import hf

    src, _ = make_hf_model(tmp_path / "src")
    model = from_pretrained(src)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- bad input: the message names the file or field and says what to do -----------------------

def run_cli(args, capsys):
    from jaxtune.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def test_missing_config_json(tmp_path, capsys):
    code, err = run_cli(["generate", str(tmp_path), "--prompt", "hi"], capsys)
    assert code == 2 and f"{tmp_path}/config.json: not found" in err and "Traceback" not in err


def test_unsupported_model_type(tmp_path, capsys):
    src, _ = make_hf_model(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(JaxtuneError, match=r"config.json: model_type 'gpt2' is not supported"):
        from_pretrained(src)
    code, err = run_cli(["generate", str(src), "--prompt", "hi"], capsys)
    assert code == 2 and "'gpt2' is not supported" in err


def test_missing_safetensors(tmp_path):
    src, _ = make_hf_model(tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(JaxtuneError, match=r"no \*\.safetensors files"):
        from_pretrained(src)


def test_truncated_safetensors(tmp_path):
    src, _ = make_hf_model(tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(JaxtuneError, match=r"model.safetensors: truncated .* fetch the file again"):
        from_pretrained(src)


def test_garbage_safetensors(tmp_path):
    src, _ = make_hf_model(tmp_path)
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(JaxtuneError, match=r"model.safetensors"):
        from_pretrained(src)


def test_wrong_shape_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    src, _ = make_hf_model(tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(JaxtuneError, match=r"tensor model.layers.1.mlp.up_proj.weight has shape \[100, 64\], "
                                           r"config.json implies \[128, 64\]"):
        from_pretrained(src)


def test_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    src, _ = make_hf_model(tmp_path)
    tensors = load_file(src / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(JaxtuneError, match=r"lm_head.weight is missing .*tie_word_embeddings=false"):
        from_pretrained(src)


def test_sharded_index_names_missing_file(tmp_path):
    src, _ = make_hf_model(tmp_path / "src")
    out = save_pretrained(from_pretrained(src), tmp_path / "out", shard_bytes=100_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(JaxtuneError, match=rf"lists {victim.name}, which is missing"):
        from_pretrained(out)
