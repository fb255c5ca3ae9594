"""The layers stay apart: ``kontext/`` (no Discord) ← ``cogs/`` (the Discord adapter) ← ``bot.py``.

Read from the source (every import, also inside functions and ``if TYPE_CHECKING:``) of every
module of the project — ``bot.py``, ``cogs/``, ``kontext/``, ``emulators/``, ``devtools/`` and
``bench/``, packages and their subpackages included (``tests/`` is not walked): no cog imports
``bot``, the core imports neither Discord nor anything above it, and the modules import each
other without a cycle. Then each Discord-side module is imported first, alone, in a fresh
interpreter state (what a cycle or a hidden order dependence would break).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the top-level packages walked (with every subpackage), beside ``bot.py``
PACKAGES = ("cogs", "kontext", "emulators", "devtools", "bench")
#: what ``kontext/`` (the core) must never import: Discord, and every layer that sits above it
ABOVE_THE_CORE = frozenset({"discord", "cogs", "bot", "emulators", "devtools", "bench", "tests"})
#: what a cog must never import: the bot itself, and the test and tooling layers
ABOVE_THE_COGS = frozenset({"bot", "emulators", "devtools", "bench", "tests"})


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every ``.py`` module of the project by dotted name (a package by its ``__init__``)."""
    found = {"bot": root / "bot.py"} if (root / "bot.py").exists() else {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[module_name(path, root)] = path
    return found


def _statements(path: Path, root: Path) -> list[tuple[str, list[str]]]:
    """Each import in ``path`` as (absolute module, names taken from it): ``import a.b`` is
    ``("a.b", [])``, ``from .c import d`` in package ``a`` is ``("a.c", ["d"])``."""
    found: list[tuple[str, list[str]]] = []
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            found.append((base, [alias.name for alias in node.names]))
    return found


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement is.
    ``from a import b`` gives both ``a`` and ``a.b`` (``b`` may be a module or a name in ``a``)."""
    names: set[str] = set()
    for base, taken in _statements(path, root):
        names.add(base)
        names.update(f"{base}.{name}" for name in taken)
    return names


def _resolve(imported: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name runs: the longest dotted prefix that is a module."""
    parts = imported.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def edges_of(path: Path, modules: dict[str, Path], root: Path = ROOT) -> set[str]:
    """The project modules ``path`` depends on. ``from a import b`` is an edge to ``a.b`` when
    that is a module (Python needs ``a`` only started, not finished, to hand it over), else to
    ``a``; ``import a.b`` is an edge to ``a.b``."""
    edges: set[str] = set()
    for base, taken in _statements(path, root):
        for imported in [f"{base}.{name}" for name in taken] or [base]:
            target = _resolve(imported, modules)
            if target is not None:
                edges.add(target)
    edges.discard(module_name(path, root))
    return edges


def project_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: edges_of(path, modules, root) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that import one another (a strongly connected component of more
    than one module, or a module importing itself), sorted, by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                connect(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups)


def describe(group: list[str], graph: dict[str, set[str]]) -> str:
    """One cycle through the group's first module, and who imports whom inside it."""
    members = set(group)
    inside = {m: sorted(graph[m] & members) for m in group}
    return f"{len(group)} modules: " + "; ".join(f"{m} → {', '.join(deps)}" for m, deps in inside.items())


def test_the_walk_covers_every_module_of_the_project() -> None:
    """Packages' modules count too (``kontext.segmind.client``, ``emulators.discord.driver``)."""
    modules = project_modules()
    on_disk = {
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert set(modules.values()) == on_disk | {ROOT / "bot.py"}
    assert {"kontext.segmind.client", "kontext.store", "emulators.discord.driver", "bench.__main__"} <= set(modules)
    assert not any(name.startswith("tests") for name in modules)


def test_no_cog_imports_bot_and_the_core_imports_no_discord() -> None:
    modules = project_modules()
    wrong: list[str] = []
    for name, path in modules.items():
        top = {m.split(".")[0] for m in imports_of(path)}
        if name.startswith("cogs."):
            if top & ABOVE_THE_COGS:
                wrong.append(f"{name} imports {sorted(top & ABOVE_THE_COGS)} (type the bot with cogs.base)")
        if name == "kontext" or name.startswith("kontext."):
            if top & ABOVE_THE_CORE:
                wrong.append(f"{name} imports {sorted(top & ABOVE_THE_CORE)}")
    assert not wrong, "\n".join(wrong)


def test_the_project_modules_import_each_other_without_a_cycle() -> None:
    graph = project_graph()
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(group, graph) for group in cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


def test_the_graph_sees_an_import_cycle_when_there_is_one(tmp_path: Path) -> None:
    """The reader above finds imports inside functions and TYPE_CHECKING blocks, relative ones
    in subpackages, and a cycle among a package's modules."""
    _write(
        tmp_path,
        {
            "bot.py": "",
            "cogs/__init__.py": "",
            "cogs/common.py": "def reply_error(): ...\n",
            "cogs/x.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from bot import KontextBot\n"
                "def f():\n    from cogs.common import reply_error\n"
            ),
            "kontext/__init__.py": "",
            "kontext/segmind/__init__.py": "from .client import Client\n",
            "kontext/segmind/client.py": "from . import v1\nclass Client: ...\n",
            "kontext/segmind/v1.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from .client import Client\n"
            ),
            "kontext/segmind/v2.py": "from kontext.segmind.client import Client\n",
        },
    )
    assert {"bot", "bot.KontextBot", "cogs.common", "cogs.common.reply_error"} <= imports_of(
        tmp_path / "cogs" / "x.py", tmp_path
    )
    graph = project_graph(tmp_path)
    assert graph["cogs.x"] == {"bot", "cogs.common"}
    assert graph["kontext.segmind.client"] == {"kontext.segmind.v1"}  # not the package itself
    assert graph["kontext.segmind"] == {"kontext.segmind.client"}
    assert import_cycles(graph) == [["kontext.segmind.client", "kontext.segmind.v1"]]


def test_each_discord_side_module_imports_first_and_alone() -> None:
    """``bot`` and each cog module are imported with no other project module loaded before
    them (the libraries stay loaded, so one interpreter does it for all of them; the core's
    order is covered by the graph above)."""
    names = sorted(m for m in project_modules() if m == "bot" or m.startswith("cogs"))
    script = (
        "import importlib, sys\n"
        "import discord, discord.ext.commands, aiohttp, sqlalchemy\n"
        f"for name in {names!r}:\n"
        f"    for loaded in [m for m in sys.modules if m.split('.')[0] in {('bot', *PACKAGES)!r}]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('ok', len(" + repr(names) + "))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"ok {len(names)}"


def test_no_module_reaches_a_cog_by_name() -> None:
    """Cogs share services through ``bot.services`` and Discord pieces through imports, never
    ``bot.get_cog("…")`` (untyped, and a silent None when the name drifts)."""
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "get_cog"
        ]
        assert not calls, f"{name} calls get_cog on line(s) {calls}"
