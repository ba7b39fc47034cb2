"""The dependency rule, read from the source with ``ast`` (every import, also those inside
functions): pure protocol at the bottom, NATS I/O and the client above it, the agent above
that, the gateway and the CLI on top and never importing each other. docs/architecture.md
draws the same layers.

A failure lists each import that breaks the rule, with its file and line, and the rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent

#: where each package's source is (the repository keeps them at the top level)
PACKAGES: Final = {
    "runctl.bus": "bus",
    "runctl.agent": "agent",
    "runctl.gateway": "gateway",
    "runctl.cli": "cli",
}

#: the bottom layer: what runctl says on the wire and how it reads it, with no I/O
PROTOCOL: Final = frozenset(
    f"runctl.bus.{name}"
    for name in (
        "errors",
        "subjects",
        "messages",
        "paths",
        "canonical",
        "steps.records",
        "steps.forget",
        "steps.explain",
        "formatting",
        "defaults",
        "artifact_codec",
        "tlserrors",
        "results",
    )
)

#: (what, may not import, why): checked for every module ``what`` matches
RULES: Final[tuple[tuple[str, tuple[str, ...], str], ...]] = (
    (
        "protocol",
        ("runctl.bus", "runctl.agent", "runctl.gateway", "runctl.cli"),
        "pure protocol imports only other protocol modules",
    ),
    (
        "protocol",
        ("nats", "anyio", "asyncio", "fastapi", "starlette", "uvicorn"),
        "pure protocol does no I/O (nats.errors, the exception classes, is allowed)",
    ),
    ("runctl.bus", ("runctl.agent", "runctl.gateway", "runctl.cli"), "the bus is below them all"),
    ("runctl.agent", ("runctl.gateway", "runctl.cli"), "the agent runs in users' programs"),
    ("runctl.gateway", ("runctl.cli",), "the gateway and the CLI never import each other"),
    ("runctl.cli", ("runctl.gateway",), "the gateway and the CLI never import each other"),
    ("runctl.cli", ("fastapi", "starlette", "uvicorn"), "the CLI never loads the web stack"),
)

#: what a protocol module may import although a rule above names it
ALLOWED: Final = frozenset({"nats.errors"})

#: names that are only runctl's when prefixed: ``import bus`` would be a user's module
BARE: Final = ("bus", "agent", "gateway", "cli")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: Path
    line: int
    target: str  # what it imports
    #: under ``if TYPE_CHECKING:``: for annotations only, never run
    type_only: bool = False


def module_name(package: str, path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def product_modules() -> Iterator[tuple[str, Path]]:
    for package, folder in PACKAGES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            yield module_name(package, path, base), path
    for path in sorted((ROOT / "runctl").glob("*.py")):  # the facade (symlinks are not files)
        yield module_name("runctl", path, ROOT / "runctl"), path


def imports_of(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        type_only = id(node) in typing_only
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, path, node.lineno, alias.name, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                # ``from runctl.bus import messages`` imports runctl.bus.messages
                yield Import(module, path, node.lineno, f"{base}.{alias.name}", type_only)


def matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def in_scope(module: str, what: str) -> bool:
    return module in PROTOCOL if what == "protocol" else matches(module, what)


def where(imp: Import) -> str:
    return f"{imp.module} ({imp.path.relative_to(ROOT)}:{imp.line}) imports {imp.target}"


def test_the_layers_hold() -> None:
    broken: list[str] = []
    for module, path in product_modules():
        for imp in imports_of(module, path):
            for what, forbidden, why in RULES:
                if not in_scope(module, what):
                    continue
                if what == "protocol" and (
                    any(matches(imp.target, m) for m in PROTOCOL)
                    or any(matches(imp.target, a) for a in ALLOWED)
                ):
                    continue
                if any(matches(imp.target, f) for f in forbidden) and not matches(
                    imp.target, module
                ):
                    broken.append(f"{where(imp)}: {why}")
    assert not broken, "imports that break the layers:\n  " + "\n  ".join(sorted(set(broken)))


def test_nothing_imports_the_bare_folder_names() -> None:
    """Only ``runctl.bus``, never ``bus``: in a user's directory ``bus`` is their module."""
    folders = [*PACKAGES.values(), "runctl", "tests", "examples", "bench"]
    broken = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ".venvs" in path.parts:
                continue
            for imp in imports_of(path.stem, path):
                if any(matches(imp.target, bare) for bare in BARE):
                    broken.append(f"{path.relative_to(ROOT)}:{imp.line} imports {imp.target}")
    assert not broken, "import these as runctl.*:\n  " + "\n  ".join(broken)


def test_every_product_module_is_in_a_layer() -> None:
    """A module the rules do not see would escape them: every product module is under one
    of the packages, and every protocol module named here exists."""
    names = {module for module, _ in product_modules()}
    assert names >= PROTOCOL, sorted(PROTOCOL - names)
    for module in names:
        assert module == "runctl" or module.startswith("runctl."), module


def import_graph() -> dict[str, set[str]]:
    """Which product module imports which at run time (an import for annotations only,
    under ``if TYPE_CHECKING:``, is no edge: it never runs)."""
    modules = {module: path for module, path in product_modules()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for imp in imports_of(module, path):
            if imp.type_only:
                continue
            target = imp.target
            while target and target not in modules:  # ``from pkg.mod import name``
                target = target.rpartition(".")[0]
            if target and target != module and target != module.rpartition(".")[0]:
                graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    """No module imports one that imports it back, directly or around a loop (also not
    inside a function, which would only hide the cycle)."""
    groups = cycles(import_graph())
    assert not groups, "import cycles:\n  " + "\n  ".join(" <-> ".join(g) for g in groups)


#: the size past which a product module says at its top why it is one module
LONG_MODULE: Final = 420


def test_long_modules_say_why_they_are_one() -> None:
    """A newcomer reads a module in one pass: one past ~400 lines states its reason in its
    docstring ("Why one module of this size: ...")."""
    silent = []
    for folder in PACKAGES.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            source = path.read_text()
            lines = source.count("\n")
            doc = ast.get_docstring(ast.parse(source)) or ""
            if lines > LONG_MODULE and "Why one module" not in doc:
                silent.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not silent, "say why at the top, or split:\n  " + "\n  ".join(silent)


def test_every_public_function_has_a_docstring() -> None:
    """Public functions and methods (and properties) of the product say what they do."""
    undocumented = []
    for folder in PACKAGES.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            pending: list[tuple[ast.AST, str]] = [(ast.parse(path.read_text()), "")]
            while pending:
                node, prefix = pending.pop()
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                        pending.append((child, f"{prefix}{child.name}."))
                    elif (
                        isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                        and not child.name.startswith("_")
                        and not ast.get_docstring(child)
                    ):
                        where = f"{path.relative_to(ROOT)}:{child.lineno}"
                        undocumented.append(f"{where} {prefix}{child.name}")
    assert not undocumented, "document these:\n  " + "\n  ".join(undocumented)


def test_the_architecture_page_lists_every_module() -> None:
    """docs/architecture.md's module index names every product module (one hop from it)."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    index = page.split("## Every module", 1)[-1]
    missing = [
        path.relative_to(ROOT).as_posix()
        for folder in PACKAGES.values()
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "__main__.py" and f"[{path.relative_to(ROOT).as_posix()}]" not in index
    ]
    assert not missing, "add to the index in docs/architecture.md:\n  " + "\n  ".join(missing)
