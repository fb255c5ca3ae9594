"""``cogs.errors``: every app-command error becomes one plain, ephemeral reply.

The real bot against the Discord emulator (tests/e2e/harness.py), with three extra commands added
to its tree and synced: one raising a ``KontextError``, one whose check fails, one crashing with a
secret in its exception. Each is run before and after deferring (reply vs. follow-up).
"""

from __future__ import annotations

import logging

import discord
import pytest
from discord import app_commands

from cogs.errors import ErrorHandler
from emulators.discord import InteractionRecord
from kontext.errors import InsufficientCredits
from kontext.i18n import t
from tests.e2e.harness import SEGMIND_KEY, Harness, SecretWatch, harness

EPHEMERAL = 1 << 6


def add_failing_commands(h: Harness) -> None:
    tree = h.bot.tree

    @tree.command(name="fail-kontext", description="raises a KontextError")
    async def fail_kontext(interaction: discord.Interaction, defer: bool = False) -> None:
        if defer:
            await interaction.response.defer(ephemeral=True, thinking=True)
        raise InsufficientCredits("test", balance=1, needed=3)

    @tree.command(name="fail-check", description="its check always says no")
    @app_commands.check(lambda interaction: False)
    async def fail_check(interaction: discord.Interaction) -> None:
        raise AssertionError("a failed check never runs the command")

    @tree.command(name="fail-crash", description="a bug")
    async def fail_crash(interaction: discord.Interaction, defer: bool = False) -> None:
        if defer:
            await interaction.response.defer(ephemeral=True, thinking=True)
        raise RuntimeError(f"unexpected, with the key {SEGMIND_KEY} in it")


async def run(h: Harness, name: str, **options: object) -> InteractionRecord:
    return await h.slash(name, dict(options))


def only_reply(rec: InteractionRecord) -> tuple[str, int]:
    """The one message the member saw for ``rec``, and its flags."""
    if rec.followups:
        assert len(rec.followups) == 1
        msg = rec.followups[0]
    else:
        assert len(rec.responses) == 1 and rec.responses[0]["type"] == 4
        msg = rec.responses[0]["data"]
    return msg.get("content") or "", int(msg.get("flags") or 0)


@pytest.fixture
async def h():
    async with harness() as h:
        add_failing_commands(h)
        await h.bot.tree.sync()
        yield h


@pytest.mark.parametrize("defer", [False, True])
async def test_a_kontext_error_is_its_own_plain_message(h: Harness, defer: bool) -> None:
    rec = await run(h, "fail-kontext", defer=defer)
    text, flags = only_reply(rec)
    assert text == t("credits.insufficient", "en-US", balance=1, needed=3)
    assert flags & EPHEMERAL


async def test_a_failed_check_is_not_allowed(h: Harness) -> None:
    rec = await run(h, "fail-check")
    text, flags = only_reply(rec)
    assert text == t("error.not_allowed", "en-US")
    assert flags & EPHEMERAL


@pytest.mark.parametrize("defer", [False, True])
async def test_anything_else_is_logged_for_the_owner_and_plain_for_the_member(
    h: Harness, defer: bool, caplog: pytest.LogCaptureFixture
) -> None:
    watch = SecretWatch(h.settings.secrets)
    logging.getLogger().addHandler(watch)
    try:
        with caplog.at_level(logging.ERROR, logger="kontext.cogs.errors"):
            rec = await run(h, "fail-crash", defer=defer)
    finally:
        logging.getLogger().removeHandler(watch)
    text, flags = only_reply(rec)
    assert text == t("error.internal", "en-US")
    assert flags & EPHEMERAL
    assert SEGMIND_KEY not in h.reply_text(rec) and "Traceback" not in h.reply_text(rec)
    # the owner's log has the command and the traceback, with the secret redacted
    failed = [r for r in caplog.records if r.name == "kontext.cogs.errors"]
    assert len(failed) == 1 and "fail-crash" in failed[0].getMessage()
    record = failed[0]  # the redaction (a filter) may have turned exc_info into exc_text
    traceback = record.exc_text or logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]  # one of the two is set
    assert "Traceback" in traceback and "RuntimeError" in traceback
    logged = "\n".join(watch.lines)
    assert "Traceback" in logged and "RuntimeError" in logged
    assert SEGMIND_KEY not in logged


async def test_unloading_the_cog_gives_the_tree_its_handler_back(h: Harness) -> None:
    tree = h.bot.tree
    cog = h.bot.get_cog("Errors")
    assert cog is not None and type(cog).__name__ == ErrorHandler.__name__  # loaded as an extension
    assert tree.on_error == cog.on_app_command_error
    await h.bot.unload_extension("cogs.errors")
    assert tree.on_error == app_commands.CommandTree.on_error.__get__(tree)
    await h.bot.load_extension("cogs.errors")
    assert tree.on_error == h.bot.get_cog("Errors").on_app_command_error  # type: ignore[union-attr]  # just loaded
    rec = await run(h, "fail-check")
    assert only_reply(rec)[0] == t("error.not_allowed", "en-US")
