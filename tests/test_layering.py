"""The package's import graph: acyclic, and the library never imports a stage or the CLI (issue 12)."""

from __future__ import annotations

import ast
from pathlib import Path

import resofilter

PACKAGE = Path(resofilter.__file__).resolve().parent
LIBRARY = {"data", "models", "features", "selection", "training", "evaluation", "reporting"}
ABOVE_THE_LIBRARY = {"stages", "commands", "cli"}


def module_name(path: Path) -> str:
    parts = ["resofilter", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module → the resofilter modules it imports anywhere in its body (function-level imports too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resofilter"):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:  # `from a.b import c`: c is a module or a name in a.b
                target = name if name in modules else name.rsplit(".", 1)[0]
                if target in modules and target != mod and target != "resofilter":
                    graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_import_graph_is_acyclic():
    graph = imports()
    assert len(graph) > 30
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_library_never_imports_a_stage_or_the_cli():
    bad = []
    for mod, targets in imports().items():
        parts = mod.split(".")
        if len(parts) > 1 and parts[1] in LIBRARY:
            bad += [f"{mod} → {t}" for t in targets if t.split(".")[1] in ABOVE_THE_LIBRARY]
    assert not bad, bad


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_never_reads_a_dictconfig():
    """Below the command layer a stage gets typed specs: no library package and no stage imports omegaconf.
    Those that do are the command layer (cli, commands, configs) and the config readers it calls: the
    validation of a composed config (config_check), the resolution of its inputs — paths, models, data
    (context) — and the one module that builds the specs (specs). A new one is a regression."""
    readers = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m.split(".")[0] == "omegaconf" for m in mods):
                readers.add(module_name(path))
    library = {m for m in readers if m.split(".")[1] in LIBRARY}
    assert not library, f"library modules import omegaconf: {sorted(library)}"
    assert readers == {
        "resofilter.cli", "resofilter.commands", "resofilter.configs",  # the command layer
        "resofilter.stages.config_check", "resofilter.stages.context", "resofilter.stages.specs",  # its readers
    }, sorted(readers)


def _comments(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment of a .py or .yaml file: after `#` (a .py file's docstrings too)."""
    text = path.read_text()
    out = [(i, line.split("#", 1)[1]) for i, line in enumerate(text.splitlines(), 1) if "#" in line]
    if path.suffix == ".py":
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef | ast.Module):
                doc = ast.get_docstring(node, clean=False)
                if doc and node.body:
                    out.append((node.body[0].lineno, doc))
    return out


def test_code_and_config_comments_say_why_not_when():
    """Issue 37: measurements with their dates and the project's issue numbers live in experiments/README.md;
    a comment in resofilter/ or conf/ that dates a measurement or cites one of our issues goes stale."""
    import re

    root = Path(resofilter.__file__).parent
    dated = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b(?!_)")  # a date, not a run dir's timestamp (…_22-44-09)
    ours = re.compile(r"(?<!Lightning )\bissue \d+", re.IGNORECASE)
    found = [f"{p.relative_to(root.parent)}:{i}: {m.group(0)}"
             for p in [*root.rglob("*.py"), *(root.parent / "conf").rglob("*.yaml")]
             for i, text in _comments(p) for m in [dated.search(text), ours.search(text)] if m]
    assert not found, found
    assert dated.search("measured 2026-12-02 here") and ours.search("(issue 22)")  # the patterns do match


def test_the_readme_is_a_guide_first():
    """Issue 37: a newcomer meets the first command within 40 lines and the commands section within the first
    third, after the quick start and their own data."""
    lines = (Path(resofilter.__file__).parent.parent / "README.md").read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines, 1) if line.startswith("python3 -m venv"))
    heads = [line for line in lines if line.startswith("## ")]
    commands = lines.index(next(h for h in heads if h.startswith("## Commands"))) + 1
    assert first_command <= 40 and commands <= len(lines) / 3, (first_command, commands, len(lines))
    assert [h.split()[1] for h in heads[:3]] == ["Quick", "Your", "Commands"]
