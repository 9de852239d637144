"""Every notebook runs top to bottom on CPU in a smoke mode, as a user would run it (nbclient, a real
kernel, the `jaxtune` command on PATH); cells tagged "colab" (install, Drive, hub login) are skipped.
The repository keeps notebooks without outputs."""
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLAB_ONLY = "colab"


def tags(cell) -> list:
    return cell.metadata.get("tags", [])


def run_notebook(path: Path, parameters: dict, cwd: Path) -> nbformat.NotebookNode:
    """Run `path` in `cwd` with `parameters` set in a cell after its `parameters` cell, colab cells left out."""
    nb = nbformat.read(path, as_version=4)
    (at,) = [i for i, cell in enumerate(nb.cells) if "parameters" in tags(cell)]
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items())))
    nb.cells = [cell for cell in nb.cells if COLAB_ONLY not in tags(cell)]
    nb.cells.append(nbformat.v4.new_code_cell(KERNEL_BACKENDS))
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    assert text_output(nb).endswith("JAX backends in the kernel: []\n"), \
        f"{path.name}: the kernel initialised JAX, so on a TPU the `!jaxtune` processes could not open it"
    return nb


# The kernel must not hold the accelerator: JAX initialised there keeps the TPU (the `!jaxtune` processes cannot
# open it) and preallocates 75% of a GPU. Importing jax is harmless; a backend is what holds the device.
KERNEL_BACKENDS = ('import sys\nprint("JAX backends in the kernel:", '
                   'sorted(getattr(sys.modules.get("jax._src.xla_bridge"), "_backends", None) or []))')


def text_output(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
    return "".join(out)


@pytest.fixture
def kernel_env(monkeypatch):
    """A Colab-like CPU: one device (not the suite's 8), and `jaxtune` on PATH for the `!` commands."""
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def test_quickstart_notebook_trains_shows_curves_and_exports(tiny_dir, chat_data, tmp_path, kernel_env):
    smoke = {"MODEL": str(tiny_dir), "DATA": str(chat_data / "train.jsonl"), "MAX_STEPS": 4, "SEQ_LEN": 128,
             "EVAL_EVERY": 2, "WORKDIR": "runs/smoke"}  # the tiny model, a few steps
    nb = run_notebook(ROOT / "notebooks" / "01_quickstart.ipynb", smoke, tmp_path)
    text = text_output(nb)
    assert "runtime: 1 x cpu (cpu)" in text.lower() and "dtype float32, 4 rows x 128 tokens" in text
    assert "diagnosis: " in text and "held-out loss" in text
    assert any("image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", []))
    run = tmp_path / "runs" / "smoke"
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert (tmp_path / "runs" / "smoke-merged" / "config.json").is_file()
    assert (tmp_path / "runs" / "smoke-adapter" / "adapter_config.json").is_file()
    assert text.count("verify: ") >= 2 and "parity check failed" not in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean_and_runs_in_ci(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"
    assert sum("parameters" in tags(cell) for cell in nb.cells) == 1, f"{path.name}: one cell tagged 'parameters'"
    assert f"def test_{path.stem.split('_', 1)[1]}_notebook" in Path(__file__).read_text(), \
        f"{path.name} has no smoke test here"


def test_prepare_data_notebook_cleans_and_shows_the_trained_end_of_turn(tmp_path, kernel_env):
    # tokenizer work only: the real SmolLM2 tokenizer, as on Colab
    nb = run_notebook(ROOT / "notebooks" / "03_prepare_data.ipynb", {"SEQ_LEN": 256}, tmp_path)
    text = text_output(nb)
    questions = [json.loads(line)["instruction"] for line in (tmp_path / "qa_clean.jsonl").read_text().splitlines()]
    assert len(questions) == 7 - 1 - 1  # 4 CSV rows with text + 3 SQL rows, less the slop and the near duplicate
    assert not any("rye" in q for q in questions) and sum("become active" in q for q in questions) == 1
    assert "Sourdough starter basics" in (tmp_path / "guide.jsonl").read_text() and "Buy our flour" not in text
    assert "the EOS token '<|im_end|>' is trained: +       2 '<|im_end|>'" in text
    assert "lr = base_lr * sqrt(supervised_tokens_per_step / pretrained_batch_tokens)" in text


def test_qlora_gpu_notebook_estimates_trains_and_exports_the_adapter(tiny_dir, chat_data, tmp_path, kernel_env):
    smoke = {"MODEL": str(tiny_dir), "DATA": str(chat_data / "train.jsonl"), "SEQ_LEN": 128, "MAX_STEPS": 4,
             "EVAL_EVERY": 2, "WORKDIR": "runs/smoke"}  # the tiny model quantized while loading, 4 x 16 rows
    nb = run_notebook(ROOT / "notebooks" / "02_qlora_gpu.ipynb", smoke, tmp_path)
    text = text_output(nb)
    assert "frozen" in text and "fits" in text.lower()  # the estimate's breakdown and the devices it fits
    assert "diagnosis: " in text and "parity check failed" not in text
    adapter = json.loads((tmp_path / "runs" / "smoke-adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and len(adapter["target_modules"]) == 7
    assert json.loads((tmp_path / "runs" / "smoke" / "config.json").read_text())["method"] == "qlora"
