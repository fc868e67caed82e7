"""The import graph of emq/, read with `ast` (nothing is imported): no cycles, stages never reach up into
the runner or the command-line tools, and no private name crosses a module boundary.

Function-level imports count as edges too: they are allowed for heavy optional dependencies (torch,
vLLM, bitsandbytes), so a lazy `from emq.x import y` that only dodges a cycle still shows up as one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "emq"
# may import anything: the entry point, the map, the command-line tools, the public facade and its drop-ins
TOP = {"emq.__main__", "emq.runner", "emq.api", "emq.quant_utils", "emq.memory_config"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def resolve(node: ast.ImportFrom, here: str) -> str | None:
    if node.level == 0:
        return node.module
    base = here.split(".")
    is_pkg = MODULES[here].name == "__init__.py"
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str) -> list[tuple[str, int, list[str]]]:
    """(imported emq module, line, names imported from it) for every import in the module, at any depth."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] == "emq"]
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(node, name)
            if not mod or mod.split(".")[0] != "emq":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                # `from emq import cache` imports a module; `from emq.checkpoint.cache import key_of` a name
                out.append((sub, node.lineno, []) if sub in MODULES else (mod, node.lineno, [a.name]))
    return [(m, line, names) for m, line, names in out if m in MODULES]


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in imports_of(m):
            if target != m:
                edges[m].add(target)
    # importing emq.a.b runs emq/a/__init__.py first (a package's own modules are already inside it)
    for m in MODULES:
        for target in list(edges[m]):
            parent = target.rsplit(".", 1)[0]
            while "." in parent and parent != m and not m.startswith(parent + "."):
                edges[m].add(parent)
                parent = parent.rsplit(".", 1)[0]
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_the_package():
    assert {"emq.runner", "emq.plan", "emq.detect", "emq.cli"} <= set(MODULES)
    assert "emq.plan" in graph()["emq.runner"]


def test_no_import_cycles():
    assert cycles(graph()) == []


def folder(m: str) -> str:
    """A module's folder: emq.checkpoint.merge -> emq.checkpoint; a top-level module is its own."""
    parts = m.split(".")
    return ".".join(parts[:2])


def test_no_folder_level_cycles():
    """Packages import each other one way only (detect read checkpoint's safetensors header while the checkpoint
    package imports detect: the header reader is emq/safetensors_header.py now)."""
    edges: dict[str, set[str]] = {}
    for m, targets in graph().items():
        if m in TOP:
            continue
        edges.setdefault(folder(m), set()).update(folder(t) for t in targets if folder(t) != folder(m) and t not in TOP)
    for targets in list(edges.values()):
        for t in targets:
            edges.setdefault(t, set())
    assert cycles(edges) == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_never_import_the_runner_or_the_cli():
    bad = []
    for m in MODULES:
        if m in TOP or m == "emq.cli" or m.startswith("emq.cli."):
            continue
        for target, line, _ in imports_of(m):
            if target == "emq.runner" or target == "emq.cli" or target.startswith("emq.cli."):
                bad.append(f"{MODULES[m].relative_to(PKG.parent)}:{line} imports {target}")
    assert bad == []


def test_nothing_imports_the_entry_point():
    bad = [f"{m}:{line}" for m in MODULES for target, line, _ in imports_of(m) if target == "emq.__main__"]
    assert bad == []


def private_uses(name: str) -> list[str]:
    """`from emq.x import _y`, and `x._y` where x is an emq module imported by name."""
    bad = [f"{MODULES[name].relative_to(PKG.parent)}:{line} imports {n} from {target}"
           for target, line, names in imports_of(name) for n in names
           if target != name and n.startswith("_") and not n.startswith("__")]
    tree = ast.parse(MODULES[name].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = resolve(node, name)
            for a in node.names:
                if f"{mod}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{mod}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and aliases[node.value.id] != name and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{MODULES[name].relative_to(PKG.parent)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return bad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_crosses_a_module(name):
    assert private_uses(name) == []


def test_the_layerwise_driver_names_no_algorithm():
    """checkpoint/layerwise.py loads, captures, asks the quantizer, writes: no calibrated algorithm's name in its code
    (its prose may explain them) and no algorithm module imported (they are found by name: emq.checkpoint.quantizers).
    Round to nearest stays: it is the W4A16 format's own rounding, which every layer's error is compared to."""
    from emq.checkpoint.quantizers import names, quantizer

    tree = ast.parse(MODULES["emq.checkpoint.layerwise"].read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    algos = {n for n in names() if quantizer(n).calibrated}
    bad = [f"line {n.lineno}: {n.value!r}" for n in ast.walk(tree) if isinstance(n, ast.Constant)
           and isinstance(n.value, str) and id(n) not in docstrings and any(a in n.value.lower().split() or
                                                                          n.value.lower() == a for a in algos)]
    bad += [f"line {n.lineno}: {n.id}" for n in ast.walk(tree) if isinstance(n, ast.Name)
            and any(a in n.id.lower() for a in algos)]
    bad += [f"imports {t}" for t, _, _ in imports_of("emq.checkpoint.layerwise")
            if t.rsplit(".", 1)[-1] in algos]
    assert algos >= {"gptq", "awq"} and bad == []


def judge_kind_switches(name: str) -> list[str]:
    """`JudgeKind.<member>` and a judge kind compared with a kind's name ("none", "local", "openai"): a switch on
    the judge's kind."""
    from emq.judge.backends import names

    kinds = set(names())
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "JudgeKind"
                and node.attr in kinds):
            out.append(f"line {node.lineno}: JudgeKind.{node.attr}")
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            literal = any(isinstance(s, ast.Constant) and s.value in kinds for s in sides)
            kind = any(isinstance(s, ast.Attribute) and s.attr in ("kind", "judge_kind") or
                       isinstance(s, ast.Name) and s.id in ("kind", "judge_kind") for s in sides)
            if literal and kind:
                out.append(f"line {node.lineno}: compares a kind with a judge kind's name")
    return out


def test_only_the_judge_backends_switch_on_the_judge_kind():
    """A new kind of judge is one module in emq/judge/backends (found by name), one JudgeKind value and one
    conf/judge/*.yaml: nothing else asks which kind a judge is; it asks the backend (judges, shared_by_sweep,
    config_problems, prepare, endpoint, api_key)."""
    bad = [f"{m}: {hit}" for m in MODULES if not m.startswith("emq.judge.backends") for hit in judge_kind_switches(m)]
    assert bad == []


def test_the_judge_kind_check_sees_a_switch(tmp_path):
    src = "def f(plan, cfg):\n    if plan.kind == 'local':\n        return JudgeKind.openai\n"
    MODULES["emq._probe"] = tmp_path / "probe.py"
    (tmp_path / "probe.py").write_text(src)
    try:
        assert len(judge_kind_switches("emq._probe")) == 2
    finally:
        del MODULES["emq._probe"]


# what the runner may import: each stage's public module and the run's records, never a stage's internals
STAGE_MODULES = {
    "emq.detect", "emq.plan", "emq.checkpoint.merge", "emq.checkpoint.quantize", "emq.checkpoint.quantizers",
    "emq.checkpoint.cache", "emq.checkpoint.identity", "emq.calibration", "emq.fidelity", "emq.engine",
    "emq.prompts", "emq.evaluate", "emq.metrics", "emq.judge", "emq.report.tables", "emq.report.sweep", "emq.demo",
    "emq.machine", "emq.monitor", "emq.watchdog", "emq.records", "emq.errors", "emq.schema",
}


def test_the_runner_imports_only_the_stage_modules():
    extra = sorted({t for t, _, _ in imports_of("emq.runner")} - STAGE_MODULES)
    assert extra == []
