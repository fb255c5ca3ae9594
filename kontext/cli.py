"""The command line of ``python bot.py``: run the bot, sync its commands, or the owner's controls.

    python bot.py                 run the bot
    python bot.py sync            sync the slash commands now, then exit
    python bot.py upgrade         bring the database's schema up to date, then exit
    python bot.py owner COMMAND   the owner's server controls (``python bot.py owner help``)

Settings come from the environment and ``.env`` (see ``.env.example``); a bad one prints a single
line naming it and exits with code 2. Discord-free: ``bot.py`` passes in how to run the bot.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from kontext import schema
from kontext.logging_setup import describe, setup_logging
from kontext.settings import Settings, SettingsError, load_settings

USAGE = (
    "usage: python bot.py [sync]\n"
    "       python bot.py upgrade\n"
    "       python bot.py owner COMMAND …\n"
    "  (no argument: run the bot; sync: sync the slash commands and exit;\n"
    "   upgrade: bring the database's schema up to date and exit (the bot also does at start);\n"
    "   owner: the owner's server controls, see 'python bot.py owner help')"
)

#: runs the bot until it stops (``sync_only``: sync the commands and exit); the exit code
RunBot = Callable[[Settings, bool], Coroutine[Any, Any, int]]


def main(argv: list[str] | None, run_bot: RunBot) -> int:
    """Parse ``argv`` (``sys.argv[1:]`` when None), load the settings, run; the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"], ["help"]):
        print(USAGE)
        return 0
    owner = bool(argv) and argv[0] == "owner"
    if argv not in ([], ["sync"], ["upgrade"]) and not owner:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        return 2
    setup_logging(settings)
    if owner:
        from kontext.owner_cli import run_owner

        return asyncio.run(run_owner(argv[1:], settings))
    if argv == ["upgrade"]:
        return asyncio.run(upgrade_database(settings))
    try:
        return event_loop_runner()(run_bot(settings, argv == ["sync"]))
    except KeyboardInterrupt:
        return 0


def event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """How the bot runs its event loop: uvloop where it exists (Linux, macOS) and is installed,
    asyncio's own loop elsewhere. ``make bench``'s ``speedups`` section measured it: about 10 %
    less CPU per job in the 50-at-once burst (orjson, picked up by discord.py by itself, a few
    % more)."""
    if sys.platform != "win32":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run
    return asyncio.run


async def upgrade_database(settings: Settings) -> int:
    """Apply every pending migration to the database (:func:`kontext.schema.upgrade`); the exit code.

    For a release phase (``release: python bot.py upgrade`` in a ``Procfile``) or by hand
    before a deploy; the bot itself also upgrades the database when it starts.
    """
    try:
        await schema.upgrade(settings.database_url)
    except Exception as exc:  # unreachable server, corrupt file, wrong credentials
        why = describe(exc, settings.secrets)
        print(f"Configuration error: DATABASE_URL: the database cannot be opened ({why})", file=sys.stderr)
        return 2
    print("the database's schema is up to date")
    return 0
