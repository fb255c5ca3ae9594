"""A job's options, one frozen value from the launcher to the database: stored as the job's
``params`` JSON exactly as before they were one value, so existing rows still load."""

from __future__ import annotations

import dataclasses
import json

import pytest
from sqlalchemy import select

from kontext.job_options import InputImage, JobOptions
from kontext.jobs import JobSpec
from kontext.schema import jobs
from kontext.store import ReserveRequest, Store
from kontext.vocab import ImageFormat, Source

#: a job's ``params`` as the bot wrote them before its options were one value (a reroll's,
#: every key and every image field filled in or null), byte for byte
OLD_ROW = (
    '{"aspect_ratio": "16:9", "image_1": {"attachment_id": 111, "content_type": "image/png",'
    ' "filename": "a.png", "message_id": 222, "size": 1234,'
    ' "url": "https://cdn.discordapp.com/attachments/1/2/a.png"},'
    ' "image_2": {"attachment_id": null, "content_type": null, "filename": "b.webp",'
    ' "message_id": null, "size": null, "url": "https://cdn.discordapp.com/attachments/1/3/b.webp"},'
    ' "output_format": "webp", "prompt": "put the hat on the cat", "safety_tolerance": 2,'
    ' "seed": 4294967295, "source": "reroll"}'
)

OPTIONS = JobOptions(
    prompt="put the hat on the cat",
    image_1=InputImage(
        "https://cdn.discordapp.com/attachments/1/2/a.png", "a.png", 1234, "image/png", 111, 222
    ),
    image_2=InputImage("https://cdn.discordapp.com/attachments/1/3/b.webp", "b.webp"),
    aspect_ratio="16:9",
    output_format=ImageFormat.WEBP,
    safety_tolerance=2,
    seed=4294967295,
    source=Source.REROLL,
    parent_job_id=9,
)


def stored(options: JobOptions) -> str:
    """The ``params`` text the ledger writes for ``options``."""
    return json.dumps(options.params(), sort_keys=True, default=str)


def test_an_old_rows_params_round_trip_byte_for_byte() -> None:
    options = JobOptions.from_params(json.loads(OLD_ROW), seed=4294967295, parent_job_id=9)
    assert options == OPTIONS
    assert options.resolved
    assert stored(options) == OLD_ROW


def test_an_older_row_without_the_later_keys_loads_with_what_it_ran_with() -> None:
    params = json.loads(OLD_ROW)
    for key in ("aspect_ratio", "output_format", "safety_tolerance", "seed", "source"):
        del params[key]
    options = JobOptions.from_params(params, seed=77)
    assert (options.aspect_ratio, options.output_format, options.safety_tolerance) == (
        "match_input_image", ImageFormat.JPG, 1,
    )
    assert (options.seed, options.source, options.parent_job_id) == (77, Source.SLASH, None)


def test_a_spec_holds_resolved_options_and_is_frozen() -> None:
    spec = JobSpec(job_id=1, guild_id=2, channel_id=3, user_id=4, options=OPTIONS)
    assert (spec.prompt, spec.seed, spec.aspect_ratio) == ("put the hat on the cat", 4294967295, "16:9")
    assert spec.request().image_2_url == OPTIONS.image_2.url
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.account = "guild:2"  # type: ignore[misc]
    unchosen = dataclasses.replace(OPTIONS, seed=None)
    assert not unchosen.resolved
    with pytest.raises(ValueError, match="not resolved"):
        JobSpec(job_id=1, guild_id=2, channel_id=3, user_id=4, options=unchosen)


async def test_the_ledger_stores_the_options_as_before_and_the_spec_reads_them_back(
    store: Store,
) -> None:
    await store.ledger.reserve(
        ReserveRequest(job_id=5, guild_id=2, channel_id=3, user_id=4, options=OPTIONS)
    )
    async with store.jobs.db.read() as conn:
        row = (await conn.execute(select(jobs).where(jobs.c.id == 5))).one()
    assert row.params == OLD_ROW  # the very text an existing row holds
    assert (row.seed, row.parent_job_id) == (4294967295, 9)
    job = await store.jobs.get(5)
    assert job is not None
    assert JobSpec.from_job(job).options == OPTIONS
