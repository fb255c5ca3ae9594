"""The layers stay apart: ``kontext/`` (no Discord) ← ``cogs/`` (the Discord adapter) ← ``bot.py``.

Read from the source (every import, also inside functions and ``if TYPE_CHECKING:``): no cog
imports ``bot``, the core imports neither Discord nor the cogs, and the project's modules import
each other without a cycle. Then each Discord-side module is imported first, alone, in a fresh
interpreter state (what a cycle or a hidden order dependence would break).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bot", "cogs", "kontext")


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def project_modules() -> dict[str, Path]:
    found = {"bot": ROOT / "bot.py"}
    for package in ("cogs", "kontext"):
        for path in sorted((ROOT / package).glob("*.py")):
            name = module_name(path)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement is."""
    names: set[str] = set()
    package = module_name(path, root).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_cog_imports_bot_and_the_core_imports_no_discord() -> None:
    modules = project_modules()
    for name, path in modules.items():
        imported = imports_of(path)
        top = {m.split(".")[0] for m in imported}
        if name.startswith("cogs."):
            assert "bot" not in top, f"{name} imports bot.py: type the bot with cogs.base instead"
        if name.startswith("kontext"):
            assert not top & {"discord", "cogs", "bot"}, f"{name} imports {top & {'discord', 'cogs', 'bot'}}"


def test_the_project_modules_import_each_other_without_a_cycle() -> None:
    graph = project_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_graph_sees_an_import_cycle_when_there_is_one(tmp_path: Path) -> None:
    """The reader above finds imports inside functions and TYPE_CHECKING blocks."""
    source = tmp_path / "cogs" / "x.py"
    source.parent.mkdir()
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from bot import KontextBot\n"
        "def f():\n    from cogs.common import reply_error\n"
    )
    assert {"bot", "bot.KontextBot", "cogs.common", "cogs.common.reply_error"} <= imports_of(
        source, tmp_path
    )


def test_each_discord_side_module_imports_first_and_alone() -> None:
    """``bot`` and each cog module are imported with no other project module loaded before
    them (the libraries stay loaded, so one interpreter does it for all of them; the core's
    order is covered by the graph above)."""
    names = sorted(m for m in project_modules() if not m.startswith("kontext"))
    script = (
        "import importlib, sys\n"
        "import discord, discord.ext.commands, aiohttp, sqlalchemy\n"
        f"for name in {names!r}:\n"
        f"    for loaded in [m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}]:\n"
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
