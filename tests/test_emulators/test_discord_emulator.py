"""The Discord emulator against a real, unmodified discord.py client."""

from __future__ import annotations

import asyncio
import io
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from PIL import Image

from emulators.discord import EPHEMERAL, LOADING, DiscordEmulator

APP_ID = 111_111_111_111_111_111
BOT_ID = 222_222_222_222_222_222
GUILD_ID = 333_333_333_333_333_333
TOKEN = "emulated.bot.token"

# Voice is irrelevant here; keep discord.py's "PyNaCl/davey is not installed" warnings quiet.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False


def png(width: int, height: int, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    """A small PNG."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


class Harness:
    """A tiny discord.py bot with a few app commands, wired to the emulator."""

    def __init__(self) -> None:
        self.bot = commands.Bot(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            help_command=None,
            guild_ready_timeout=0.05,
        )
        self.results: defaultdict[str, list[Any]] = defaultdict(list)
        self.ready = asyncio.Event()
        self.proceed = asyncio.Event()
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._install()

    def record(self, key: str, value: Any) -> None:
        """Store a bot-side observation and wake waiters."""
        self.results[key].append(value)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, key: str, count: int = 1, timeout: float = 5.0) -> list[Any]:
        """Wait until ``count`` observations under ``key`` exist."""
        async with asyncio.timeout(timeout):
            while len(self.results[key]) < count:
                await self._changed.wait()
        return self.results[key]

    def _install(self) -> None:
        bot, tree, h = self.bot, self.bot.tree, self

        @bot.event
        async def on_ready() -> None:
            h.ready.set()

        @tree.error
        async def on_app_command_error(
            interaction: discord.Interaction, error: app_commands.AppCommandError
        ) -> None:
            h.record("error", error)

        @tree.command(name="kontext", description="Edit an image with a prompt")
        @app_commands.describe(image="Image to edit", reference="Second image", prompt="What to do")
        async def kontext(
            interaction: discord.Interaction,
            image: discord.Attachment,
            reference: discord.Attachment,
            prompt: str,
        ) -> None:
            try:
                await interaction.response.defer(thinking=True)
            except discord.HTTPException as exc:
                h.record("defer_failed", (exc.status, exc.code))
                return
            first, second = await image.read(), await reference.read()
            channel = interaction.channel
            h.record(
                "seen",
                {
                    "sizes": (image.size, reference.size),
                    "dims": (image.width, image.height),
                    "types": (image.content_type, reference.content_type),
                    "limit": interaction.filesize_limit,
                    "nsfw": channel.is_nsfw() if isinstance(channel, discord.TextChannel) else None,
                    "perms": interaction.permissions.attach_files,
                },
            )
            embed = discord.Embed(title="Result", description=prompt)
            embed.set_image(url="attachment://result.bin")
            msg = await interaction.followup.send(
                embed=embed, file=discord.File(io.BytesIO(first + second), "result.bin"), wait=True
            )
            h.record("followup", msg.id)

        @tree.command(name="slow", description="Defer, wait, then answer")
        async def slow(interaction: discord.Interaction) -> None:
            await interaction.response.defer()
            await h.proceed.wait()
            try:
                await interaction.followup.send("late answer")
            except discord.HTTPException as exc:
                h.record("followup_failed", (exc.status, exc.code))
                assert interaction.channel is not None
                await interaction.channel.send("fallback")  # type: ignore[union-attr]
                h.record("fallback", True)

        @tree.command(name="big", description="Send a big file")
        async def big(interaction: discord.Interaction, size: int) -> None:
            await interaction.response.defer()
            try:
                await interaction.followup.send(
                    file=discord.File(io.BytesIO(b"x" * size), "big.bin")
                )
            except discord.HTTPException as exc:
                h.record("upload_failed", (exc.status, exc.code))
            else:
                h.record("upload_ok", size)

        @tree.command(name="progress", description="Ephemeral defer, edits, then a followup")
        async def progress(interaction: discord.Interaction) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.edit_original_response(content="50%")
            await interaction.edit_original_response(
                content="done", attachments=[discord.File(io.BytesIO(b"result"), "out.txt")]
            )
            original = await interaction.original_response()
            h.record("original", (original.content, [a.filename for a in original.attachments]))
            await interaction.followup.send("public note")

        @tree.command(name="echo", description="Answer with a file at once")
        async def echo(interaction: discord.Interaction, image: discord.Attachment) -> None:
            data = await image.read()
            await interaction.response.send_message(
                "echo", file=discord.File(io.BytesIO(data), image.filename)
            )

        admin = app_commands.Group(name="kontext-admin", description="Admin tools")
        credits = app_commands.Group(name="credits", description="Credits", parent=admin)

        @admin.command(name="grant", description="Grant credits")
        async def grant(
            interaction: discord.Interaction, member: discord.Member, amount: int
        ) -> None:
            h.record(
                "grant",
                (member.id, member.display_name, amount, interaction.permissions.administrator),
            )
            await interaction.response.send_message("granted", ephemeral=True)

        @credits.command(name="show", description="Show credits")
        async def show(interaction: discord.Interaction) -> None:
            h.record("show", interaction.channel.type if interaction.channel else None)
            await interaction.response.send_message("0 credits")

        tree.add_command(admin)

        class Clicker(discord.ui.View):
            @discord.ui.button(label="Go", style=discord.ButtonStyle.primary)
            async def go(
                self, interaction: discord.Interaction, button: discord.ui.Button[Any]
            ) -> None:
                h.record("clicked", interaction.user.id)
                await interaction.response.edit_message(content="clicked", view=None)

        @tree.command(name="buttons", description="Show a button")
        async def buttons(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("press it", view=Clicker(timeout=30))

        class Form(discord.ui.Modal, title="Prompt form"):
            prompt = discord.ui.TextInput(label="Prompt", max_length=200)

            async def on_submit(self, interaction: discord.Interaction) -> None:
                h.record("submitted", self.prompt.value)
                await interaction.response.send_message(f"got {self.prompt.value}", ephemeral=True)

        @tree.command(name="form", description="Show a modal")
        async def form(interaction: discord.Interaction) -> None:
            await interaction.response.send_modal(Form())

        @tree.context_menu(name="Count attachments")
        async def count(interaction: discord.Interaction, message: discord.Message) -> None:
            await interaction.response.send_message(f"{len(message.attachments)} attachment(s)")

    async def start(self, *, sync: bool = True) -> None:
        """Log in, connect, wait for on_ready, optionally sync the tree."""
        await self.bot.login(TOKEN)
        self.task = asyncio.create_task(self.bot.connect())
        async with asyncio.timeout(5):
            await self.ready.wait()
        if sync:
            await self.bot.tree.sync()

    async def close(self) -> None:
        """Close the bot and wait for its gateway task."""
        await self.bot.close()
        if self.task is not None:
            async with asyncio.timeout(5):
                await self.task


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    before = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    async with DiscordEmulator(application_id=APP_ID, bot_user_id=BOT_ID, token=TOKEN) as emulator:
        emulator.patch_discord_py()  # undone by stop()
        emulator.add_guild(GUILD_ID, name="Kontext Lab")
        emulator.add_channel(GUILD_ID, name="general")
        emulator.add_channel(GUILD_ID, name="after-dark", nsfw=True)
        yield emulator
    assert (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == before


@pytest.fixture
async def make_bot(emu: DiscordEmulator) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    harnesses: list[Harness] = []

    async def factory(*, sync: bool = True) -> Harness:
        harness = Harness()
        harnesses.append(harness)
        await harness.start(sync=sync)
        return harness

    yield factory
    for harness in harnesses:
        await harness.close()


def general(emu: DiscordEmulator) -> int:
    return next(
        int(c["id"]) for c in emu.guilds[GUILD_ID].channels.values() if c["name"] == "general"
    )


async def test_login_connect_ready(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot(sync=False)
    bot = h.bot
    assert bot.user is not None and bot.user.id == BOT_ID
    assert bot.application_id == APP_ID
    guild = bot.get_guild(GUILD_ID)
    assert guild is not None and guild.name == "Kontext Lab"
    channels = {c.name: c for c in guild.text_channels}
    assert not channels["general"].is_nsfw() and channels["after-dark"].is_nsfw()
    assert guild.me is not None and guild.me.guild_permissions.attach_files
    assert emu.identify_count == 1 and len(emu.connections) == 1
    # A channel added after connecting reaches the client (wait_for registers at call time).
    created = bot.wait_for("guild_channel_create", check=lambda c: c.name == "late", timeout=2)
    added = emu.add_channel(GUILD_ID, name="late")
    assert (await created).id == int(added["id"])


async def test_sync_is_recorded(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    assert emu.sync_count == 1
    names = {c["name"]: c for c in emu.synced_commands[None]}
    assert {"kontext", "slow", "big", "buttons", "form", "Count attachments"} <= set(names)
    kontext = names["kontext"]
    assert [o["type"] for o in kontext["options"]] == [11, 11, 3]
    fetched = await h.bot.tree.fetch_commands()
    assert {c.name: c.id for c in fetched}["kontext"] == int(kontext["id"])
    # Re-sync keeps ids stable, as Discord does.
    await h.bot.tree.sync()
    assert emu.sync_count == 2 and emu.find_command("kontext")["id"] == kontext["id"]  # type: ignore[index]


def _cmd(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "ok", "description": "fine", "type": 1, "options": []}
    base.update(overrides)
    return base


def _opt(name: str, otype: int = 3, **extra: Any) -> dict[str, Any]:
    return {"name": name, "description": "d", "type": otype, **extra}


INVALID_PAYLOADS: dict[str, list[dict[str, Any]]] = {
    "26 options": [_cmd(options=[_opt(f"o{i}") for i in range(26)])],
    "uppercase name": [_cmd(name="Kontext")],
    "space in name": [_cmd(name="two words")],
    "required after optional": [_cmd(options=[_opt("a"), _opt("b", required=True)])],
    "26 choices": [
        _cmd(options=[_opt("c", choices=[{"name": f"n{i}", "value": f"v{i}"} for i in range(26)])])
    ],
    "empty choice name": [_cmd(options=[_opt("c", choices=[{"name": "", "value": "v"}])])],
    "long description": [_cmd(description="x" * 101)],
    "missing description": [_cmd(description="")],
    "bad locale": [_cmd(name_localizations={"xx-XX": "nom"})],
    "bad localized name": [_cmd(name_localizations={"fr": "Nom Invalide"})],
    "menu with description": [{"name": "Menu", "type": 3, "description": "no"}],
    "duplicate names": [_cmd(), _cmd()],
    "group in group": [
        _cmd(options=[_opt("g", 2, options=[_opt("h", 2, options=[_opt("s", 1)])])])
    ],
    "mixed subcommand and value": [_cmd(options=[_opt("s", 1), _opt("v")])],
    "101 commands": [_cmd(name=f"c{i}") for i in range(101)],
}


@pytest.mark.parametrize("case", sorted(INVALID_PAYLOADS))
async def test_invalid_command_payloads_are_rejected(emu: DiscordEmulator, case: str) -> None:
    bot = commands.Bot(command_prefix=commands.when_mentioned, intents=discord.Intents.default())
    await bot.login(TOKEN)
    try:
        with pytest.raises(discord.HTTPException) as info:
            await bot.http.bulk_upsert_global_commands(APP_ID, INVALID_PAYLOADS[case])
    finally:
        await bot.close()
    assert info.value.status == 400 and info.value.code == 50035
    assert emu.sync_count == 0 and emu.global_commands == []
    assert len(emu.rejected_syncs) == 1


async def test_tree_sync_failure_raises_http_exception(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot(sync=False)

    @h.bot.tree.command(name="pick", description="Too many choices")
    @app_commands.choices(
        flavour=[app_commands.Choice(name=f"f{i}", value=str(i)) for i in range(26)]
    )
    async def pick(interaction: discord.Interaction, flavour: app_commands.Choice[str]) -> None:
        raise AssertionError("never runs")

    with pytest.raises(app_commands.CommandSyncFailure) as info:
        await h.bot.tree.sync()
    assert isinstance(info.value, discord.HTTPException)
    assert info.value.code == 50035 and "choices" in str(info.value)


async def test_slash_command_with_attachments_end_to_end(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    image, reference = png(64, 48), png(8, 8, (0, 0, 255))
    rec = await emu.invoke_slash(
        "kontext", {"prompt": "make it blue"}, attachments={"image": image, "reference": reference}
    )
    await rec.wait_for(lambda r: r.followups)
    assert rec.deferred and rec.response_type == 5 and not rec.ephemeral
    seen = (await h.wait("seen"))[0]
    assert seen["sizes"] == (len(image), len(reference))
    assert seen["dims"] == (64, 48) and seen["types"] == ("image/png", "image/png")
    assert seen["limit"] == emu.upload_limit and seen["nsfw"] is False and seen["perms"]
    for att in rec.data["resolved"]["attachments"].values():
        assert emu.attachment_fetches[int(att["id"])] == 1
    # The first followup after a thinking defer replaces the placeholder message.
    message = rec.followups[0]
    assert rec.original is message and not message["flags"] & (LOADING | EPHEMERAL)
    assert message["id"] == str((await h.wait("followup"))[0])
    assert emu.attachment_bytes(message["attachments"][0]) == image + reference
    assert message["embeds"][0]["title"] == "Result"
    assert message["embeds"][0]["image"]["url"] == message["attachments"][0]["url"]
    assert emu.public_messages(general(emu)) == [message]
    callback = emu.find_requests("POST", r"/interactions/\d+/.+/callback")[0]
    assert callback.query.get("with_response") == "1" and callback.json == {"type": 5}
    followup = emu.find_requests("POST", r"^/webhooks/")[0]
    assert followup.files[0]["filename"] == "result.bin" and followup.status == 200


async def test_edits_of_an_ephemeral_deferred_response(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    rec = await emu.invoke_slash("progress")
    await rec.wait_for(lambda r: r.followups)
    assert rec.ephemeral and [e.get("content") for e in rec.edits] == ["50%", "done"]
    assert (await h.wait("original")) == [("done", ["out.txt"])]
    original = rec.original
    assert original is not None and original["flags"] == EPHEMERAL
    assert emu.attachment_bytes(original["attachments"][0]) == b"result"
    # The placeholder was resolved by the edits, so the followup is a new, public message.
    note = rec.followups[0]
    assert note is not original and note["content"] == "public note" and note["flags"] == 0
    assert emu.public_messages(general(emu)) == [note]


async def test_immediate_response_with_a_file(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    await make_bot()
    image = png(3, 5)
    rec = await emu.invoke_slash("echo", {"image": (image, "in put.png", "image/png")})
    body = await rec.wait_response()
    assert body["type"] == 4 and body["data"]["content"] == "echo"
    assert rec.original is not None and rec.original["type"] == 20
    att = rec.original["attachments"][0]
    assert att["filename"] == "in_put.png" and (att["width"], att["height"]) == (3, 5)
    assert emu.attachment_bytes(att) == image and att["content_type"] == "image/png"


async def test_subcommands_members_and_dms(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    admin = emu.add_role(GUILD_ID, "Admins", 1 << 3)
    boss = emu.add_member(GUILD_ID, name="boss", roles=[int(admin["id"])])
    target = emu.add_member(GUILD_ID, name="target", nick="Targ")
    boss_id, target_id = int(boss["user"]["id"]), int(target["user"]["id"])
    rec = await emu.invoke_slash(
        "kontext-admin grant", {"member": target_id, "amount": 5}, user_id=boss_id
    )
    await rec.wait_response()
    assert (await h.wait("grant")) == [(target_id, "Targ", 5, True)]
    grant = rec.data["options"][0]
    assert grant["type"] == 1 and [o["type"] for o in grant["options"]] == [6, 4]
    shown = await emu.invoke_slash("kontext-admin", subcommand=("credits", "show"), dm=True)
    await shown.wait_response()
    assert (await h.wait("show")) == [discord.ChannelType.private]
    assert shown.original is not None and shown.channel_id == int(
        emu.dm_channel(emu.default_user_id)["id"]
    )
    with pytest.raises(ValueError):
        await emu.invoke_slash("kontext-admin grant", {"amount": 5})  # required option missing
    with pytest.raises(LookupError):
        await emu.invoke_slash("kontext-admin nope")


async def test_two_clients_receive_the_same_interaction(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    first, second = await make_bot(), await make_bot(sync=False)
    await emu.wait_connected(2)
    rec = await emu.invoke_slash(
        "kontext", {"prompt": "p"}, attachments={"image": png(4, 4), "reference": png(4, 4)}
    )
    assert rec.delivered_to == [c.number for c in emu.connections]
    await rec.wait_for(lambda r: r.followups and r.rejected)
    failures = first.results["defer_failed"] + second.results["defer_failed"]
    successes = first.results["followup"] + second.results["followup"]
    assert failures == [(400, 40060)] and len(successes) == 1
    assert rec.rejected == [
        {
            "route": "callback",
            "status": 400,
            "code": 40060,
            "message": "Interaction has already been acknowledged.",
        }
    ]


async def test_expired_token_then_channel_send(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    rec = await emu.invoke_slash("slow")
    await rec.wait_response()
    emu.expire_token(rec)
    h.proceed.set()
    fallback = await emu.wait_for_message(general(emu), lambda m: m["content"] == "fallback")
    assert fallback["author"]["id"] == str(BOT_ID) and "webhook_id" not in fallback
    assert (await h.wait("followup_failed")) == [(401, 50027)]
    assert rec.rejected[0]["code"] == 50027 and rec.followups == []


async def test_upload_over_the_limit_answers_413(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    rec = await emu.invoke_slash("big", {"size": 2048}, attachment_size_limit=1024)
    assert (await h.wait("upload_failed")) == [(413, 40005)]
    assert rec.rejected[0]["status"] == 413
    emu.upload_limit = 100
    channel = h.bot.get_channel(general(emu))
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.HTTPException) as info:
        await channel.send(file=discord.File(io.BytesIO(b"y" * 101), "y.bin"))
    assert (info.value.status, info.value.code) == (413, 40005)
    sent = await channel.send(file=discord.File(io.BytesIO(b"y" * 100), "y.bin"))
    assert emu.attachment_bytes(emu.public_messages(channel.id)[-1]["attachments"][0]) == b"y" * 100
    assert sent.attachments[0].size == 100


async def test_button_click_reaches_the_view(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    member = emu.add_member(GUILD_ID, name="clicker")
    rec = await emu.invoke_slash("buttons")
    assert (await rec.wait_response())["type"] == 4
    message = rec.original
    assert message is not None and message["content"] == "press it"
    custom_id = message["components"][0]["components"][0]["custom_id"]
    click = await emu.click_button(message, custom_id, user_id=int(member["user"]["id"]))
    assert (await click.wait_response())["type"] == 7
    assert (await h.wait("clicked")) == [int(member["user"]["id"])]
    assert message["content"] == "clicked" and message["components"] == []


async def test_modal_submit_reaches_the_modal(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    rec = await emu.invoke_slash("form")
    assert (await rec.wait_response())["type"] == 9 and rec.modal is not None
    submit = await emu.submit_modal(rec, {"Prompt": "a cat"})
    await submit.wait_response()
    assert (await h.wait("submitted")) == ["a cat"]
    assert submit.ephemeral and submit.original is not None
    assert submit.original["content"] == "got a cat" and submit.original["flags"] & EPHEMERAL
    assert submit.original not in emu.public_messages(general(emu))
    with pytest.raises(ValueError):
        await emu.submit_modal(rec, {})  # the text input is required


async def test_rate_limited_followup_is_retried(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    rule = emu.fail_next("POST", r"^/webhooks/\d+/", 429, retry_after=0.05)
    rec = await emu.invoke_slash(
        "kontext", {"prompt": "p"}, attachments={"image": png(4, 4), "reference": png(4, 4)}
    )
    await rec.wait_for(lambda r: r.followups)
    assert rule.hits == 1 and h.results["followup"]
    assert [r.status for r in emu.find_requests("POST", r"^/webhooks/")] == [429, 200]


async def test_message_context_menu(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    await make_bot()
    target = emu.add_message(general(emu), "look", attachments=[png(10, 10)])
    rec = await emu.invoke_message_command("Count attachments", target)
    assert (await rec.wait_response())["data"]["content"] == "1 attachment(s)"
    assert rec.original is not None and rec.original["type"] == 23


async def test_reconnect_resumes_and_keeps_working(
    emu: DiscordEmulator, make_bot: Callable[..., Awaitable[Harness]]
) -> None:
    h = await make_bot()
    assert await emu.disconnect_all(code=4000) == 1
    await emu.wait_until(lambda: emu.resume_count == 1 and emu.connections, 5)
    rec = await emu.invoke_slash("buttons")
    await rec.wait_response()
    assert emu.identify_count == 1 and h.bot.is_ready()


async def test_raw_http_contract(emu: DiscordEmulator) -> None:
    att = emu.add_attachment(b"hello", "a.txt", content_type=None)
    assert "content_type" not in att
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{emu.api_base}/interactions/1/nope/callback", json={"type": 5}
        ) as resp:
            assert resp.status == 404 and resp.headers["Content-Type"] == "application/json"
            assert (await resp.json())["code"] == 10062
        async with session.get(f"{emu.api_base}/users/@me") as resp:
            assert resp.status == 401
        async with session.get(
            f"{emu.api_base}/users/@me", headers={"Authorization": f"Bot {TOKEN}"}
        ) as resp:
            assert (await resp.json())["id"] == str(BOT_ID) and "X-RateLimit-Bucket" in resp.headers
        async with session.get(att["url"]) as resp:
            assert await resp.read() == b"hello"
        emu.expire_attachment(att)
        async with session.get(att["url"]) as resp:
            assert resp.status == 404
        async with session.get(emu.fresh_attachment(att)["url"]) as resp:
            assert resp.status == 200
    assert emu.attachment_fetches[int(att["id"])] == 2
    assert emu.attachment_fetch_failures[int(att["id"])] == 1


def test_channel_overwrites_shape_a_members_permissions(emu: DiscordEmulator) -> None:
    manage = 1 << 13
    mods = emu.add_role(GUILD_ID, "Mods", manage)
    mod = int(emu.add_member(GUILD_ID, name="mod", roles=[int(mods["id"])])["user"]["id"])
    plain = int(emu.add_member(GUILD_ID, name="plain")["user"]["id"])
    chan = general(emu)
    other = next(int(c["id"]) for c in emu.guilds[GUILD_ID].channels.values() if c["nsfw"])
    assert emu.channel_permissions(GUILD_ID, mod, chan) & manage
    emu.set_overwrite(chan, int(mods["id"]), deny=manage)  # a role overwrite takes it away here
    assert not emu.channel_permissions(GUILD_ID, mod, chan) & manage
    assert emu.channel_permissions(GUILD_ID, mod, other) & manage  # ... and only here
    emu.set_overwrite(other, plain, allow=manage, member=True)  # a member overwrite gives it
    assert emu.channel_permissions(GUILD_ID, plain, other) & manage
    assert not emu.channel_permissions(GUILD_ID, plain, chan) & manage
    emu.set_overwrite(other, GUILD_ID, deny=1 << 11)  # @everyone loses Send Messages there
    assert not emu.channel_permissions(GUILD_ID, plain, other) & (1 << 11)
    assert emu.channel_permissions(GUILD_ID, plain, chan) & (1 << 11)
    assert emu.channel_permissions(GUILD_ID, emu.guilds[GUILD_ID].owner_id, other) & (1 << 11)
