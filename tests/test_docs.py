"""The docs say what the code does: generated pages are current, links resolve."""
import json
import re
import subprocess
import sys
from pathlib import Path

from jaxtune import config

ROOT = Path(__file__).resolve().parents[1]


def test_configs_page_is_generated_from_the_config_table():
    page = (ROOT / "docs" / "configs.md").read_text()
    assert page == config.describe_markdown(), "docs/configs.md is stale: run `jaxtune keys --markdown > docs/configs.md`"
    for key, default, _, domain in config.SCHEMA:  # every key, its default and what it accepts, on one row
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
        assert domain.text.replace("|", "\\|") in row


def test_keys_markdown_command_prints_the_page():
    out = subprocess.run([sys.executable, "-m", "jaxtune.cli", "keys", "--markdown"], capture_output=True, text=True,
                         check=True).stdout
    assert out == config.describe_markdown()


def test_relative_links_in_docs_resolve():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "notebooks").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def test_troubleshooting_quotes_messages_jaxtune_raises():
    source = "".join(p.read_text() for p in (ROOT / "jaxtune").rglob("*.py"))
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    messages = re.findall(r"^\| `([^`]+)` \|", page, re.M)
    assert len(messages) >= 30
    for message in messages:
        for fragment in message.split("…"):
            assert fragment.strip() in source, f"troubleshooting.md quotes {message!r}, which jaxtune no longer says"


def bash_lines(page: Path) -> list[str]:
    """Every command line of a page's ```bash blocks (comments dropped, continuation lines joined)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.M | re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def doc_commands(page: Path) -> list[str]:
    """The `jaxtune ...` lines of a page's ```bash blocks."""
    return [line for line in bash_lines(page) if line.startswith("jaxtune ")]


def test_every_jaxtune_command_in_the_docs_parses():
    """Flags and subcommands the docs show exist (the CLI's own parser reads each line)."""
    import shlex

    from jaxtune.cli import build_parser

    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    commands = [c for page in pages for c in doc_commands(page)]
    assert len(commands) > 10
    for command in commands:
        argv = shlex.split(re.sub(r"\[[^\]]*\]", "", command))[1:]  # [optional parts] left out
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"the docs show `{command}`, which jaxtune's parser rejects") from e


def test_export_page_commands_run(tiny_dir, chat_data, tmp_path):
    """docs/export.md's jaxtune commands, as written, on a (tiny) runs/quickstart."""
    from conftest import run_config
    from jaxtune.train.loop import train

    train(run_config(tiny_dir, chat_data, tmp_path / "runs" / "quickstart", **{"train.max_steps": 2}))
    commands = doc_commands(ROOT / "docs" / "export.md")
    assert len(set(commands)) == 2
    for command in dict.fromkeys(commands):
        subprocess.run([sys.executable, "-m", "jaxtune.cli", *command.split()[1:]], cwd=tmp_path, check=True)
    assert (tmp_path / "smollm2-chitchat" / "README.md").is_file()
    assert (tmp_path / "smollm2-chitchat-lora" / "adapter_config.json").is_file()


def test_data_page_commands_run_on_its_examples(tmp_path):
    """docs/data.md's commands, as written, in a copy of docs/examples/ (a shell expands $(jaxtune assets ...))."""
    import os
    import shutil

    work = shutil.copytree(ROOT / "docs" / "examples", tmp_path / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = doc_commands(ROOT / "docs" / "data.md")
    assert len(commands) == 5
    outputs = [subprocess.run(["bash", "-c", c], cwd=work, env=env, check=True, capture_output=True, text=True).stdout
               for c in commands]
    assert "+       2 '<|im_end|>'" in outputs[0] and "preflight: OK" in "".join(outputs)
    assert len((work / "qa_clean.jsonl").read_text().splitlines()) == 5
    assert "Sourdough starter basics" in (work / "guide.jsonl").read_text()


def test_lora_page_commands_run_as_written(tiny_dir, chat_data, tmp_path):
    """docs/lora.md's commands as written, from a copy of configs/, with $JAXTUNE_CACHE holding a stand-in for
    the assets (the tiny model as smollm2-135m-instruct, 100 chitchat records) and each `jaxtune train` capped
    at 2 steps without the chat prompt (appended overrides win): the quickstart preset, the page's overrides,
    the overfit recipe and the export of its best checkpoint all run. The page's curves are the real runs'."""
    import os
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_dir, cache / "smollm2-135m-instruct")
    shutil.copytree(chat_data, cache / "chitchat")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "JAXTUNE_CACHE": str(cache), "XLA_FLAGS": "",  # one CPU device, as on a user's machine
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    lines = bash_lines(ROOT / "docs" / "lora.md")
    assert sum(line.startswith("jaxtune train") for line in lines) == 6
    for line in lines:
        command = f"{line} --config.train.max_steps=2 --config.eval.prompt=" if line.startswith("jaxtune train") else line
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"docs/lora.md: `{line}` failed:\n{done.stderr[-2000:]}"
    summary = json.loads((tmp_path / "runs" / "few" / "summary.json").read_text())
    assert (tmp_path / "few-best" / "adapter_config.json").is_file() and summary["steps"] == 2
    assert len((tmp_path / "few.jsonl").read_text().splitlines()) == 8
    for image in ("well-fit", "underfit", "overfit"):
        assert (ROOT / "docs" / "images" / f"{image}.png").stat().st_size > 10_000


def test_one_place_says_where_jaxtune_is_published():
    """setup.cfg's `url` is the source of truth; the README and every notebook's pip install name it."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    url = cfg["metadata"]["url"]
    assert url.startswith("https://github.com/")
    texts = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "notebooks").glob("*.ipynb"))]}
    for name, text in texts.items():
        named = set(re.findall(r"git\+(https://[\w./-]+)", text))
        assert named == {url}, f"{name} installs from {named or 'nowhere'}, setup.cfg's url is {url}"


def test_readme_reference_commands_run(tiny_dir, tmp_path, capsys):
    """The README's one-line commands that need no training run, as written (optional [parts] left out):
    MODEL_DIR is the tiny model with SmolLM2's tokenizer and chat template. (Those on a run are the export
    page's, run above; prepare/clean/preflight are the data page's.)"""
    import shlex
    import shutil

    from jaxtune.cli import main

    model = shutil.copytree(tiny_dir, tmp_path / "MODEL_DIR")
    commands = [c for c in doc_commands(ROOT / "README.md")
                if c.split()[1] in ("keys", "assets", "generate", "estimate", "quantize", "verify")]
    assert len(commands) == 6, commands
    for command in commands:
        argv = shlex.split(re.sub(r"\[[^\]]*\]", "", command).replace("MODEL_DIR", str(model)))[1:]
        assert main(argv) == 0, f"README: `{command}` failed:\n{capsys.readouterr().err[-2000:]}"
    out = capsys.readouterr().out
    assert "16 devices" in out and "verify:" in out
    assert (tmp_path / "MODEL_DIR-bnb-4bit" / "config.json").is_file()
