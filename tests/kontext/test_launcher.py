"""The services as ``bot.py`` opens them, and the JobLauncher every way of starting a job goes
through: the server's rules and defaults turn a request into a job spec (no Discord)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from kontext.errors import InputError, KontextError, ShuttingDown
from kontext.job_options import InputImage, JobOptions
from kontext.launcher import DEFAULT_SAFETY, JobRequest
from kontext.services import Knobs, Services, open_services
from kontext.settings import settings_from_env
from kontext.vocab import ImageFormat, Source

GUILD, ADMIN = 1, 2
_ids = itertools.count(50_000)


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    settings = settings_from_env(
        {"DISCORD_TOKEN": "test-token", "DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}"}
    )
    async with open_services(settings, knobs=Knobs(lease_s=7.0)) as opened:
        yield opened


def request(**fields: object) -> JobRequest:
    """A request with the test's ``fields``: the options' own go into its :class:`JobOptions`."""
    chosen: dict[str, object] = {
        "prompt": "  put the hat on the cat  ",
        "image_1": InputImage("https://cdn.discordapp.com/a.png"),
        "image_2": InputImage("https://cdn.discordapp.com/b.png"),
    }
    chosen.update({k: fields.pop(k) for k in list(fields) if k in JobOptions.__dataclass_fields__})
    base: dict[str, object] = {
        "job_id": next(_ids),
        "guild_id": GUILD,
        "channel_id": 10,
        "user_id": 20,
        "locale": "de",
        "options": JobOptions(**chosen),  # type: ignore[arg-type]  # each of its type
    }
    base.update(fields)
    return JobRequest(**base)  # type: ignore[arg-type]  # the test's fields, each of its type


async def test_the_services_are_complete_and_share_one_store_and_queue(services: Services) -> None:
    assert services.pipeline.store is services.store is services.launcher.store
    assert services.pipeline.queue is services.queue is services.launcher.queue
    assert services.pipeline.accounts is services.accounts is services.queue.accounts
    assert services.queue.lease_s == 7.0  # the knobs reach the queue
    assert await services.store.ping()


async def test_defaults_come_from_the_server_and_the_request_becomes_the_spec(
    services: Services,
) -> None:
    await services.store.settings.update(
        GUILD, ADMIN, default_aspect_ratio="16:9", max_safety_tolerance=0, exempt_role_ids=(7,)
    )
    req = request(role_ids=(7,), parent_job_id=99, source=Source.REROLL, interaction_token="tok")
    prepared = await services.launcher.prepare(req)
    spec = prepared.spec
    assert prepared.confirm_cost is None
    assert (spec.job_id, spec.guild_id, spec.channel_id, spec.user_id) == (req.job_id, 1, 10, 20)
    assert spec.prompt == "put the hat on the cat"  # trimmed
    assert spec.aspect_ratio == "16:9"  # the server's default
    assert spec.safety_tolerance == min(DEFAULT_SAFETY, 0)  # never above the server's maximum
    assert 0 <= spec.seed <= 4294967295  # random when not given
    assert spec.exempt_from_cooldown  # an exempt role
    assert (spec.options.parent_job_id, spec.options.source, spec.locale) == (99, Source.REROLL, "de")
    assert spec.options == replace(
        req.options, prompt=spec.prompt, aspect_ratio="16:9", safety_tolerance=0, seed=spec.seed
    )  # the member's choices, with the defaults filled in
    assert spec.interaction_token == "tok" and spec.output_format == ImageFormat.JPG
    chosen = await services.launcher.prepare(request(aspect_ratio="1:1", seed=5))
    assert (chosen.spec.aspect_ratio, chosen.spec.seed) == ("1:1", 5)
    assert not chosen.spec.exempt_from_cooldown


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"guild_id": None}, "input.guild_only"),
        ({"prompt": "   "}, None),
        ({"safety_tolerance": 2}, "input.safety_nsfw_only"),
        ({"channel_id": 11}, "input.channel_not_allowed"),
        ({"prompt": "a FORBIDDEN hat"}, "input.blocked_word"),
    ],
)
async def test_the_servers_rules_refuse_before_anything_is_charged(
    services: Services, fields: dict[str, object], key: str | None
) -> None:
    await services.store.settings.update(
        GUILD, ADMIN, allowed_channel_ids=(10,), blocked_words=("forbidden",)
    )
    req = request(**fields)
    with pytest.raises(KontextError) as caught:
        await services.launcher.prepare(req)
    if key is not None:
        assert caught.value.key == key
    assert await services.store.jobs.get(req.job_id) is None  # nothing reserved


async def test_a_thread_counts_as_its_parent_channel_and_nsfw_allows_safety_2(
    services: Services,
) -> None:
    await services.store.settings.update(GUILD, ADMIN, allowed_channel_ids=(10,))
    await services.launcher.check_channel(GUILD, [33, 10])  # a thread of channel 10
    with pytest.raises(InputError):
        await services.launcher.check_channel(GUILD, [33])
    with pytest.raises(InputError):
        await services.launcher.check_channel(None, [10])
    spec = (
        await services.launcher.prepare(
            request(channel_id=33, parent_channel_id=10, channel_nsfw=True, safety_tolerance=2)
        )
    ).spec
    assert (spec.channel_id, spec.safety_tolerance) == (33, 2)


async def test_a_quote_when_the_server_wants_one(services: Services) -> None:
    await services.store.settings.update(
        GUILD, ADMIN, confirm_quote=True, credits_per_image=3
    )
    prepared = await services.launcher.prepare(request())
    assert prepared.confirm_cost == 3
    quote = await services.launcher.quote(prepared.spec, 3)
    balance = (await services.store.credits.member_status(GUILD, 20)).balance
    assert (quote.cost, quote.balance, quote.after, quote.waiting) == (3, balance, balance - 3, 0)
    assert quote.eta_s == services.queue.estimates.estimate_duration()


async def test_no_new_job_while_shutting_down(services: Services) -> None:
    services.pipeline.lifecycle.accepting = False
    with pytest.raises(ShuttingDown):
        await services.launcher.prepare(request())
