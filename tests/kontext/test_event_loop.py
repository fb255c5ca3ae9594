"""The bot's event loop: uvloop where it exists (``make bench`` measured it cutting CPU per job)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from kontext import cli


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not exist on Windows")
def test_the_bot_runs_on_uvloop_where_it_exists() -> None:
    import uvloop

    assert cli.event_loop_runner() is uvloop.run

    async def on_uvloop() -> int:
        return int(type(asyncio.get_running_loop()).__module__.startswith("uvloop"))

    assert cli.event_loop_runner()(on_uvloop()) == 1


def test_without_uvloop_the_bot_runs_on_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert cli.event_loop_runner() is asyncio.run
