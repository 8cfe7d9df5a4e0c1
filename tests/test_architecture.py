"""The architecture rules of the README's "Architecture" section, checked on the package's imports.

Every import is read from the AST, including imports inside functions (a lazy import is still a door
between rooms). Rules:
- Ray only in `actors/`, the driver (`trainer.py`) and the CLI entry points that start a cluster;
- `learner/` never imports the agent or the sandbox; `rewards/` never imports models or the learner;
- the in-box kernel (`sandbox/kernel.py`) imports nothing from the package (it runs inside the container);
- no import circle between the package's modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pyvision_rl"
RAY_ALLOWED = ("pyvision_rl.actors", "pyvision_rl.trainer", "pyvision_rl.train_cli")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, mod: str | None = None) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, resolved to absolute names."""
    mod = mod or _module_name(path)
    pkg_parts = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg_parts[: len(pkg_parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.append((name, node.lineno))
            # `from pyvision_rl.x import y` may import the submodule y
            out += [(f"{name}.{a.name}", node.lineno) for a in node.names if name.startswith("pyvision_rl")]
    return out


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _package_deps(mod: str) -> set[str]:
    """The package modules `mod` imports (a name that is a symbol, not a module, resolves to its module)."""
    deps = set()
    for name, _ in _imports(MODULES[mod]):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("pyvision_rl") and name != mod and name != "pyvision_rl":
            deps.add(name)
    return deps


def _violations(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for mod, path in MODULES.items():
        if mod == prefix or mod.startswith(prefix + "."):
            for name, line in _imports(path):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {name}")
    return bad


def test_ray_only_in_actors_and_driver():
    bad = []
    for mod, path in MODULES.items():
        if any(mod == a or mod.startswith(a + ".") for a in RAY_ALLOWED):
            continue
        bad += [
            f"{path.relative_to(PKG.parent)}:{line} imports {name}"
            for name, line in _imports(path)
            if name == "ray" or name.startswith("ray.")
        ]
    assert not bad, "Ray outside actors/ and the driver:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        ("pyvision_rl.learner", ("pyvision_rl.agent", "pyvision_rl.sandbox", "pyvision_rl.actors")),
        ("pyvision_rl.rewards", ("pyvision_rl.models", "pyvision_rl.learner")),
        ("pyvision_rl.sandbox.kernel", ("pyvision_rl",)),
    ],
)
def test_rooms_keep_their_doors(room, forbidden):
    bad = _violations(room, forbidden)
    assert not bad, f"{room} must not import {forbidden}:\n" + "\n".join(bad)


def test_no_import_circles():
    graph = {m: _package_deps(m) for m in MODULES}
    # A package's __init__ re-exporting its children is not a circle of design; skip edges parent -> child.
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not d.startswith(m + ".")}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checker_sees_violations(tmp_path):
    """The rules above are only as good as the import reader: it must see lazy and relative imports."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    import ray\n    from ..agent import loop\n    from . import losses\n")
    names = {n for n, _ in _imports(f, "pyvision_rl.learner.probe")}
    assert {"ray", "pyvision_rl.agent", "pyvision_rl.agent.loop", "pyvision_rl.learner.losses"} <= names


CODE_LINE_BUDGET = 9_000  # the house rule: the package stays lean (README, "Architecture")


def _code_lines(src: str) -> int:
    """Lines holding code: blank lines, comments and docstrings (bare string statements) are free."""
    import io
    import tokenize

    skip = (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER)
    starts = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    lines: set[int] = set()
    prev = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in skip:
            continue
        if tok.type not in starts and not (tok.type == tokenize.STRING and prev in starts):
            lines.update(range(tok.start[0], tok.end[0] + 1))
        prev = tok.type
    return len(lines)


def test_code_line_counter_counts_code_only():
    src = (
        'def f(x):\n    """Doc\n    string."""\n    # a comment\n\n    return (x +\n            1)  # tail\n'
    )
    assert _code_lines(src) == 3


def test_package_stays_within_its_code_line_budget():
    sizes = {str(p.relative_to(PKG)): _code_lines(p.read_text()) for p in MODULES.values()}
    total = sum(sizes.values())
    biggest = ", ".join(f"{k} {v}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:5])
    assert total <= CODE_LINE_BUDGET, (
        f"pyvision_rl/ has {total} code lines (budget {CODE_LINE_BUDGET}; largest: {biggest}): delete or merge "
        "code before adding more, or raise CODE_LINE_BUDGET in a reviewed change that says why"
    )
