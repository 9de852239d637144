"""`jaxtune compile`: the real train step compiled by the TPU compiler (libtpu) for slices this machine
does not have, and the fixes it showed: splash attention under a shard_map on multi-chip meshes, NF4
codes a TPU does not pad 64x, the vocabulary matrices gathered once per step."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jaxtune_cli, run_config
from jaxtune import aot, hlo

pytest.importorskip("libtpu", reason="the TPU compiler: pip install 'jaxtune[tpu]'")

TINY = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True}
# Llama-3-8B's widths (vocabulary, hidden size, MLP, heads) with 2 of its 32 layers
SLICE_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5}
SETTINGS = {  # per method: what the presets do (QLoRA on one chip, LoRA and full sharded over the slice)
    "lora": {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16", "mesh.fsdp": -1},
    "qlora": {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16", "mesh.fsdp": 1},
    "full": {"model.dtype": "bfloat16", "model.param_dtype": "float32", "mesh.fsdp": -1},
}


@pytest.fixture(autouse=True)
def own_compile_cache(tmp_path, monkeypatch):
    """Each test compiles for real (a cache of the user's would answer from an earlier run)."""
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path / "cache"))


def architecture(tmp_path_factory, name, values):
    path = tmp_path_factory.mktemp(name)
    (path / "config.json").write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    return architecture(tmp_path_factory, "tiny", TINY)


@pytest.fixture(scope="module")
def slice_8b(tmp_path_factory):
    return architecture(tmp_path_factory, "slice8b", SLICE_8B)


def compiled(model_dir, tmp_path, method, topology, seq_len, micro_batch, eval_step=False, **overrides):
    cfg = run_config(model_dir, tmp_path, tmp_path / "run", method=method, **{
        "data.seq_len": seq_len, "train.micro_batch_size": micro_batch, "model.remat": "full",
        "model.attention": "auto", "mesh.data": 1, "mesh.tensor": 1, **SETTINGS[method], **overrides})
    with jax.default_matmul_precision("default"):  # conftest asks for "highest": Mosaic rejects it for bf16
        return aot.compile_run(cfg, aot.target(topology), eval_step=eval_step)


def check(report, vocab_matrices: int):
    """Compiles with splash on every chip of the mesh, fits, and the HLO checks hold."""
    assert not report.error, report.error
    assert report.attention == "splash" and report.stats.kernels > 0
    assert report.fits, report.text()
    assert report.remat_warnings == 0
    text = report.text()
    assert f"whole [vocab, hidden] matrices gathered per micro-step: {vocab_matrices}" in text or (
        vocab_matrices == 0 and "gathered per micro-step: 0" in text), text
    assert "float32 [B, T, vocab] buffers: none" in text
    assert report.stats.flops > 0  # (the tiny model's small dots may become element-wise code: no MFU check)


def test_hlo_counts_each_loop_body_by_its_trip_count():
    """XLA's cost_analysis counts a loop body once; hlo.analyze multiplies it by the trip count."""
    def body(x, w):
        return jnp.tanh(x @ w), None

    def f(x, ws, vs):
        x, _ = jax.lax.scan(body, x, ws)  # 6 iterations
        y, _ = jax.lax.scan(lambda y, v: (jax.lax.scan(body, y, v)[0], None), x, vs)  # 3 x 4 iterations
        return y

    x, ws, vs = jnp.ones((8, 32)), jnp.ones((6, 32, 32)), jnp.ones((3, 4, 32, 32))
    text = jax.jit(f).lower(x, ws, vs).compile().as_text()
    assert hlo.analyze(text).flops == (6 + 12) * 2 * 8 * 32 * 32


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("topology", ["v4-8", "v5e-8", "v6e-8"])
def test_tiny_model_compiles_for_tpu_slices(tiny_arch, tmp_path, topology, method):
    """attention='auto' is splash on TPU: before the shard_map, every mesh of more than one chip failed
    with "Mosaic kernels cannot be automatically partitioned". The tied embedding is gathered once per
    step in the lookup and once for the loss (before: once per loss chunk in the backward as well)."""
    report = compiled(tiny_arch, tmp_path, method, topology, 1024, 8, eval_step=method == "lora")
    check(report, vocab_matrices=0 if method == "qlora" else 2)
    assert (report.eval_memory is not None) == (method == "lora")


def test_an_identical_compile_is_answered_from_the_cache(tiny_arch, tmp_path):
    """The same program for the same target by the same compiler: the second `jaxtune compile` costs the
    lowering only (an 8B row takes minutes to compile), with the same figures; another target compiles."""
    first = compiled(tiny_arch, tmp_path, "lora", "v4-8", 1024, 8)
    again = compiled(tiny_arch, tmp_path, "lora", "v4-8", 1024, 8)
    assert not first.cached and again.cached and "earlier identical compile" in again.text()
    assert (again.peak, again.flops, again.seconds, again.stats.collectives) == (
        first.peak, first.flops, first.seconds, first.stats.collectives)
    assert not compiled(tiny_arch, tmp_path, "lora", "v4-8", 512, 8).cached  # another program


@pytest.mark.parametrize("method, topology", [("qlora", "v5e-8")])  # about 5 minutes each on 2 cores
def test_llama3_8b_widths_compile_fit_and_match_the_estimate(slice_8b, tmp_path, method, topology):
    """Two layers of Llama-3-8B at its real widths. QLoRA on one v5e chip: the NF4 unpack no longer makes
    [n, 2] arrays padded to 128 lanes (the whole 8B model needed 21.7 GiB of temporaries there and did not
    compile). The estimate is within 15% of the compiler."""
    report = compiled(slice_8b, tmp_path, method, topology, 2048, 1 if method == "qlora" else 8)
    check(report, vocab_matrices=0 if method == "qlora" else 2)
    assert 0.5 < report.mfu < 1, report.text()  # remat recomputes the forward: the HLO does more than the model
    assert abs(report.estimate.total / report.peak - 1) <= 0.15, report.text()


def test_a_run_that_does_not_fit_names_the_cause_and_the_keys(slice_8b, tmp_path):
    """Full fine-tuning of 8B widths on one v5e chip (16 GiB): the compiler's out-of-memory error becomes
    one paragraph with the keys that would help (not those already at their floor)."""
    report = compiled(slice_8b, tmp_path, "full", "v5e-8", 2048, 1, **{"mesh.fsdp": 1})
    assert "out of device memory" in report.error and "mesh.fsdp=-1" in report.error, report.error
    assert "method='qlora'" in report.error and "data.seq_len=2048" in report.error, report.error
    # only the levers not already pulled: the micro-batch is 1 and remat is already full
    assert "micro_batch_size" not in report.error and "remat" not in report.error, report.error
    assert not report.fits


def test_a_batch_the_slice_does_not_split_is_that_rows_error_with_the_value_that_would(tiny_arch, tmp_path):
    report = compiled(tiny_arch, tmp_path, "lora", "v4-32", 1024, 8)  # 16 chips, 8 rows
    assert not report.fits and "must be a multiple of mesh data x fsdp = 16" in report.error, report.error
    assert "set train.micro_batch_size=16" in report.error
    assert "| no: train.micro_batch_size=8 must be a multiple of mesh data x fsdp = 16 |" in aot.markdown_table(
        [("c.py", report)])


def test_unknown_topology_is_a_clear_error(tiny_arch, tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text("from jaxtune.config import base_config\n\ndef get_config():\n    c = base_config()\n"
                           f"    c.model.path = {str(tiny_arch)!r}\n    c.data.train = 'x.jsonl'\n    return c\n")
    process = jaxtune_cli("compile", str(config_file), "--topology", "v4-6")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "v4-6: no such slice; v4 comes in 8, 16, 32" in stderr, stderr
    process = jaxtune_cli("compile", str(config_file), "--topology=v7-8")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "expected a TPU type as gcloud names it" in stderr, stderr


def test_gpu_topology_compiles_with_xla_gpu_when_its_plugin_is_installed(tiny_arch, tmp_path):
    """XLA:GPU compiles for a card it is only told about (jaxtune's description of an H100): Pallas
    (Triton) attention in its shard_map on 8 GPUs, the embedding's gradient reduce-scattered. Runs where
    `jaxtune[gpu]` (the CUDA plugin, about 5 GB) is installed; CI has only the TPU compiler."""
    pytest.importorskip("jax_cuda12_plugin", reason="XLA:GPU: pip install 'jaxtune[gpu]'")
    report = compiled(tiny_arch, tmp_path, "lora", "h100-8", 1024, 8)
    assert not report.error and report.fits and report.attention == "pallas", report.text()
    assert report.stats.kernels > 0 and report.stats.collectives["reduce-scatter"][0] > 0
    assert "whole [vocab, hidden] matrices gathered per micro-step: 2" in report.text()


def test_no_tpu_probe_where_there_is_no_tpu_chip(monkeypatch):
    """libtpu is installed (the test extra, jaxtune[tpu]): on a machine with no TPU chip (no PCI device of
    Google's) and no GPU plugin, the command line tells JAX to use the CPU instead of letting libtpu probe
    (a screen of warnings at the top of `make demo`); JAX_PLATFORMS, when set, wins."""
    from pathlib import Path

    from jaxtune import cli

    import importlib.util

    if any(v.read_text().strip() == "0x1ae0" for v in Path("/sys/bus/pci/devices").glob("*/vendor")) or \
            importlib.util.find_spec("jax_cuda12_plugin"):
        pytest.skip("a TPU host, or a GPU plugin installed")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    cli.no_tpu_probe()
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    cli.no_tpu_probe()
    assert os.environ["JAX_PLATFORMS"] == "tpu,cpu"


def test_tpu_v3_gets_blocked_attention_because_splash_does_not_compile_there(tiny_arch, tmp_path):
    """Mosaic has no bfloat16 matmul on TPU v2/v3 (E2001 CompileTimeMosaicUnsupportedRhsType, found by
    compiling the 8B QLoRA preset for v3-8): `auto` picks the blocked attention there, and an explicit
    'splash' is refused with the reason."""
    from jaxtune import attention
    from jaxtune.errors import JaxtuneError

    report = compiled(tiny_arch, tmp_path, "lora", "v3-8", 1024, 8)
    assert not report.error and report.fits and report.attention == "blocked", report.text()
    with pytest.raises(JaxtuneError, match="does not compile on TPU v3"):
        attention.resolve("splash", 1024, None, "tpu", "TPU v3")
    assert attention.resolve("auto", 1024, None, "tpu", "TPU v4")[0] == "splash"


def test_context_parallel_splash_compiles_for_a_v4_slice_and_offload_moves_the_stream_to_host(tiny_arch, tmp_path):
    """mesh.context=4 on a v4-8: the TPU compiler takes splash under the load-balanced mask on each chip's
    quarter of the row; model.remat='offload' puts exactly the layer inputs in host memory, where 'full'
    keeps them on the chip (what that saves on the chip shows at 8B scale: docs/long-context.md)."""
    cp = {"mesh.fsdp": 1, "mesh.context": 4}
    full = compiled(tiny_arch, tmp_path, "lora", "v4-8", 4096, 1, **cp)
    offload = compiled(tiny_arch, tmp_path, "lora", "v4-8", 4096, 1, **cp, **{"model.remat": "offload"})
    for report in (full, offload):
        assert not report.error, report.error
        assert report.attention == "splash" and report.stats.kernels > 0 and report.fits and report.chips == 4
    stream = TINY["num_hidden_layers"] * 1024 * TINY["hidden_size"] * 2  # per chip: 1,024 tokens, bfloat16
    assert full.memory.host_temp_size_in_bytes == 0
    assert offload.memory.host_temp_size_in_bytes == stream  # every layer's input, and nothing else
    assert "in host memory (model.remat='offload'): " in offload.text()
