"""The training path loads no raw-data parser, and the data modules import one another one way only."""
import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "jaxtune"
PARSERS = ("bs4", "soupsieve", "sqlparse", "datasketch")  # what only `jaxtune prepare` / `jaxtune clean` need

LOADED = """
import json, sys
def loaded(prefixes):
    return sorted(m for m in sys.modules if m.split(".")[0] in prefixes or m.startswith(prefixes))
import jaxtune.train.loop, jaxtune.data.loader
training = loaded(PARSERS + ("jaxtune.ingest",))
import jaxtune.cli
jaxtune.cli.build_parser()  # registers every subcommand, prepare and clean included
cli = loaded(PARSERS)
print(json.dumps({"training": training, "cli": cli}))
"""


def test_training_and_the_cli_load_no_raw_data_parser():
    code = f"PARSERS = {PARSERS!r}\n{LOADED}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded == {"training": [], "cli": []}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the jaxtune modules it imports anywhere in its body (function-level imports included:
    a cycle hidden inside a function is still a cycle)."""
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..data import y
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_finds_a_cycle():  # the checker itself
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_the_data_modules():
    graph = import_graph()
    data = {m: {d for d in deps if d.startswith(("jaxtune.data", "jaxtune.ingest"))}
            for m, deps in graph.items() if m.startswith(("jaxtune.data", "jaxtune.ingest"))}
    assert find_cycle(data) is None
    assert {"jaxtune.data.loader", "jaxtune.data.records", "jaxtune.ingest.prepare"} <= data.keys()


def test_training_data_never_imports_ingestion_or_the_demo_assets():
    graph = import_graph()
    wrong = {m: sorted(d for d in deps if d.startswith(("jaxtune.ingest", "jaxtune.assets", "jaxtune.cli")))
             for m, deps in graph.items() if m.startswith("jaxtune.data")}
    assert {m: deps for m, deps in wrong.items() if deps} == {}
    assert "jaxtune.data.records" in graph["jaxtune.ingest.read"]  # ingestion builds on the training-side reader
