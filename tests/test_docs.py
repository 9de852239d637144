"""The docs say what the code does: generated pages are current, links resolve."""
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


def doc_commands(page: Path) -> list[str]:
    """The `jaxtune ...` lines of a page's ```bash blocks (comments dropped, continuation lines joined)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("jaxtune "):
                commands.append(line)
    return commands


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
