"""Fault suite: every way the image API or Discord can fail a job, through the real bot.

After each scenario the same three promises are checked (:func:`settle_and_check`):

* money: ``store.audit.check_invariants() == []`` and the member's balance is exactly what it should be
  (refunded on every failure that was not theirs, charged once for a posted image);
* words: everything the member saw is plain (no traceback, no exception class name, no secret, no
  unfilled placeholder) — :func:`assert_plain`;
* service: the bot still serves the next job — one more ``/kontext`` posts (:func:`serves_next`).

The helpers here are imported by the other fault and security test modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import pytest

from cogs import result_message
from kontext import errors as kontext_errors
from kontext import spool
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, Harness, harness

START = 10  # STARTING_CREDITS in the harness; one image costs 1 credit

# --- shared checks ------------------------------------------------------------------------------

_ERROR_CLASS_NAMES = sorted(
    {
        name
        for name, obj in vars(kontext_errors).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    | {
        "HTTPException", "DiscordServerError", "NotFound", "Forbidden", "ClientError",
        "ClientConnectorError", "ServerDisconnectedError", "TimeoutError", "CancelledError",
        "OSError", "ValueError", "KeyError", "TypeError", "AttributeError", "AssertionError",
        "RuntimeError", "DatabaseError", "OperationalError", "InterfaceError", "TransformerError",
        "DecompressionBombError", "UnidentifiedImageError", "SyntaxError",
    }
)
_NOT_PLAIN = re.compile(
    r"Traceback \(most recent call last\)"
    r"|File \"[^\"]+\", line \d+"
    r"|\b(?:" + "|".join(map(re.escape, _ERROR_CLASS_NAMES)) + r")\b"
    r"|\{[a-z_]+\}"  # an i18n placeholder left unfilled
    r"|\bNone\b|\bnull\b"
    r"|\bHTTP \d{3}\b|\bstatus(?: code)? \d{3}\b"
)


def assert_plain(text: str, *, extra_secrets: Iterable[str] = ()) -> None:
    """``text`` (what a member saw) is plain words: no traceback, class name or secret."""
    assert text.strip(), "the member was told nothing"
    for secret in (DISCORD_TOKEN, SEGMIND_KEY, *extra_secrets):
        assert secret not in text, f"a secret reached the member: {text!r}"
    found = _NOT_PLAIN.search(text)
    assert found is None, f"not plain words ({found.group(0)!r}) in: {text!r}"


def seen_by(h: Harness, rec: object) -> str:
    """Every text the member saw for one interaction (responses, edits, followups)."""
    return h.reply_text(rec)  # type: ignore[arg-type]


async def serves_next(h: Harness, *, balance_after: int) -> None:
    """One more ``/kontext`` posts its image and charges exactly one credit."""
    before = len(h.result_messages())
    calls = len(h.segmind.calls)
    rec = await h.kontext(prompt="one more, to show the bot still works")
    outcome = h.outcomes.get(rec.id)
    assert outcome is not None and outcome.status == "posted", (outcome, seen_by(h, rec))
    assert len(h.result_messages()) == before + 1
    assert len(h.segmind.calls) == calls + 1
    assert await h.balance() == balance_after
    assert await h.bot.store.audit.check_invariants() == []


async def settle_and_check(h: Harness, rec: object, *, status: str, balance: int) -> str:
    """The job of ``rec`` ended with ``status``; money and words check out. Returns the text."""
    outcome = h.outcomes.get(rec.id)  # type: ignore[attr-defined]
    assert outcome is not None, "the job never ended"
    assert outcome.status == status, (outcome, seen_by(h, rec))
    assert await h.bot.store.audit.check_invariants() == []
    assert await h.balance() == balance
    text = seen_by(h, rec)
    assert_plain(text)
    return text


# --- the image API ------------------------------------------------------------------------------

# (fault, expected outcome, a phrase of the member's message, the account needs the owner)
API_FAULTS = [
    pytest.param("400", "refunded", "could not use", False, id="400"),
    pytest.param("401", "refunded", "needs attention", True, id="401"),
    pytest.param("403", "refunded", "needs attention", True, id="403"),
    pytest.param("404", "refunded", "needs attention", True, id="404"),
    pytest.param("406", "refunded", "needs attention", True, id="406"),
    pytest.param("429", "posted", None, False, id="429-once-retried"),
    pytest.param("500", "refunded", "had an error", False, id="500"),
    pytest.param("502", "posted", None, False, id="502-once-retried"),
    pytest.param("502x", "refunded", "had an error", False, id="502-persistent"),
    pytest.param("504", "refunded", "took too long", False, id="504"),
    pytest.param("hang", "refunded", "took too long", False, id="hang"),
    pytest.param("reset", "refunded", "could not be reached", False, id="reset"),
    pytest.param("garbage", "refunded", "not an image", False, id="garbage-html"),
    pytest.param("oversize", "posted", None, False, id="oversize-12MB"),
]


def _inject(h: Harness, fault: str) -> None:
    seg = h.segmind
    if fault == "429":
        seg.fail_next(429, headers={"Retry-After": "0.1"})
    elif fault == "502":
        seg.fail_next(502)
    elif fault == "502x":
        seg.fail_next(502, times=20)
    elif fault.isdigit():
        seg.fail_next(int(fault), times=20)
    elif fault == "hang":
        seg.hang_next()
    elif fault == "reset":
        seg.reset_next()
    elif fault == "garbage":
        seg.garbage_next("html")
    elif fault == "oversize":
        seg.oversize_next(12 * 1024 * 1024)
    else:  # pragma: no cover - a typo in the table
        raise AssertionError(fault)


@pytest.mark.parametrize(("fault", "status", "phrase", "account"), API_FAULTS)
async def test_api_fault_then_next_job(fault: str, status: str, phrase: str | None, account: bool) -> None:
    async with harness(SEGMIND_TIMEOUT_SECONDS="1") as h:
        # the client's own retry pauses are production-sized; shrink them for a fast test
        h.bot.segmind.backoff_base_s, h.bot.segmind.backoff_max_s = 0.01, 0.02
        _inject(h, fault)
        rec = await h.kontext()
        balance = START - 1 if status == "posted" else START
        text = await settle_and_check(h, rec, status=status, balance=balance)
        if status == "posted":
            assert len(h.result_messages()) == 1
            assert h.segmind.charged_count == 1  # a retried 429/502 is never billed twice
        else:
            assert phrase in text and "refunded" in text, text
            assert h.result_messages() == []
        h.segmind.clear_faults()

        if account:
            # the account needs the owner: new jobs are refused up front, nothing charged
            assert h.bot.queue.paused
            calls = len(h.segmind.calls)
            refused = await h.kontext(prompt="while paused")
            assert refused.id not in h.outcomes or h.outcomes[refused.id].status == "rejected"
            said = seen_by(h, refused)
            assert_plain(said)
            assert "needs attention" in said and "paused" in said, said
            assert len(h.segmind.calls) == calls
            assert await h.balance() == START
            await h.bot.queue.resume()  # what the account probe does once the owner fixed it
        await serves_next(h, balance_after=balance - 1)


async def test_api_error_that_echoes_the_key_never_reaches_the_member() -> None:
    async with harness() as h:
        h.segmind.fail_next(500, error=f"internal error for key {SEGMIND_KEY}")
        rec = await h.kontext()
        await settle_and_check(h, rec, status="refunded", balance=START)
        outcome = h.outcomes[rec.id]
        assert outcome.error is not None
        for text in (str(outcome.error), repr(outcome.error), outcome.error.detail):
            assert SEGMIND_KEY not in text
        await serves_next(h, balance_after=START - 1)


# --- Discord ------------------------------------------------------------------------------------

WEBHOOK_POST = r"^/webhooks/\d+/[^/]+$"  # a followup (the result upload); edits are PATCH


async def test_followup_rate_limited_with_retry_after_posts_once() -> None:
    async with harness() as h:
        rule = h.discord.fail_next("POST", WEBHOOK_POST, 429, retry_after=0.2)
        rec = await h.kontext()
        assert rule.hits == 1
        await settle_and_check(h, rec, status="posted", balance=START - 1)
        assert len(h.result_messages()) == 1  # waited and retried: posted once, not twice
        assert h.segmind.charged_count == 1
        await serves_next(h, balance_after=START - 2)


def upload_posts(h: Harness) -> int:
    """How many result uploads (follow-up POSTs) reached Discord."""
    return sum(1 for r in h.discord.requests if r.method == "POST" and "/webhooks/" in r.path)


async def test_upload_5xx_is_sent_once_and_refunded_when_nothing_was_posted() -> None:
    """A 5xx on the upload is never repeated (Discord may have created the message before
    answering: a repeat made a second copy); this one created nothing, so the channel holds no
    result and the job is refunded."""
    async with harness() as h:
        rule = h.discord.fail_next("POST", WEBHOOK_POST, 503)
        rec = await h.kontext()
        assert rule.hits == 1 and upload_posts(h) == 1
        await settle_and_check(h, rec, status="refunded", balance=START)
        assert h.result_messages() == []
        await serves_next(h, balance_after=START - 1)


async def test_upload_5xx_after_the_post_was_made_is_found_and_posted_once() -> None:
    """A 502 after Discord created the follow-up: the fate is unknown, the channel shows the
    result, so the job is posted and charged, with one copy."""
    async with harness() as h:
        h.discord.fail_next("POST", WEBHOOK_POST, 502, process=True)
        rec = await h.kontext()
        assert upload_posts(h) == 1
        await settle_and_check(h, rec, status="posted", balance=START - 1)
        assert len(h.result_messages()) == 1
        await serves_next(h, balance_after=START - 2)


async def test_upload_refused_refunds_and_says_so() -> None:
    # a non-retryable refusal of the upload (413 "Request entity too large")
    async with harness() as h:
        h.discord.fail_next("POST", WEBHOOK_POST, 413)
        rec = await h.kontext()
        text = await settle_and_check(h, rec, status="refunded", balance=START)
        assert "could not be posted" in text and "refunded" in text, text
        assert h.result_messages() == []
        await serves_next(h, balance_after=START - 1)


BIG = 3 * 1024 * 1024  # past SPOOL_BYTES, under the 10 MiB upload limit: posted from its file


@pytest.mark.parametrize("upload", ["ok", "503-once", "token-dead", "followup-dead", "refused"])
async def test_a_big_result_is_uploaded_from_its_file_which_is_closed_at_the_end(
    upload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result past SPOOL_BYTES goes API → temporary file → Discord, uploaded again from the
    file's start when the first upload is retried or falls back to the channel; whatever the
    end, the file is closed when the job ends."""
    posted: list[int] = []
    original = result_message.result_file

    def result_file(result: Any) -> Any:
        file = original(result)
        posted.append(result.image.file is not None)
        return file

    monkeypatch.setattr(result_message, "result_file", result_file)
    before = spool.open_count()
    async with harness(segmind_latency=0.3 if upload == "token-dead" else 0.0) as h:
        h.segmind.oversize_next(BIG)
        if upload == "503-once":
            h.discord.fail_next("POST", WEBHOOK_POST, 503)
        elif upload == "refused":
            h.discord.fail_next("POST", WEBHOOK_POST, 413)
        elif upload == "followup-dead":  # the upload fails on a dead token: again in the channel
            h.discord.fail_next("POST", WEBHOOK_POST, 404, code=10015, message="Unknown Webhook")
        rec = await h.kontext(output_format="png", wait=upload != "token-dead")
        if upload == "token-dead":
            await rec.wait_response()
            await h.segmind.wait_calls(1)
            h.discord.expire_token(rec)
            await h.wait_settled(rec)
        assert spool.open_count() == before  # closed when the job ended
        if upload in ("refused", "503-once"):  # a 5xx upload is never sent again
            await settle_and_check(h, rec, status="refunded", balance=START)
            assert posted == [True]
        else:
            assert h.outcomes[rec.id].status == "posted", seen_by(h, rec)
            assert await h.bot.store.audit.check_invariants() == []
            assert await h.balance() == START - 1
            assert posted == ([True, True] if upload == "followup-dead" else [True])
            if upload in ("token-dead", "followup-dead"):
                posts = [m for m in h.discord.public_messages(h.channel_id) if m.get("attachments")]
            else:
                posts = h.result_messages()
            assert len(posts) == 1
            data = h.discord.attachment_bytes(posts[0]["attachments"][0])
            assert data == h.segmind.calls[0].image and len(data) >= BIG  # whole, unchanged
        await serves_next(h, balance_after=h_balance_after(upload))
        assert spool.open_count() == before


def h_balance_after(upload: str) -> int:
    return START - (1 if upload in ("refused", "503-once") else 2)


async def test_defer_answered_40060_does_nothing_else() -> None:
    """Another process acknowledged the interaction first: this one must leave it alone."""
    async with harness() as h:
        rule = h.discord.fail_next(
            "POST", r"^/interactions/\d+/[^/]+/callback$", 400, code=40060,
            message="Interaction has already been acknowledged.",
        )
        rec = await h.kontext(wait=False)
        await h.discord.wait_for_request("POST", rf"^/interactions/{rec.id}/[^/]+/callback$")
        assert rule.hits == 1
        # the next job runs to its end; by then anything the first one did would have shown
        await serves_next(h, balance_after=START - 1)
        assert rec.id not in h.outcomes
        assert await h.bot.store.jobs.get(rec.id) is None
        assert len(h.segmind.calls) == 1  # only the next job's
        assert h.discord.attachment_fetches[int(rec.data["options"][0]["value"])] == 0
        used_token = [r for r in h.discord.requests if rec.token in r.path]
        assert [r.route for r in used_token] == [f"/interactions/{rec.id}/{rec.token}/callback"]
        assert rec.followups == [] and rec.edits == []


async def test_token_expired_mid_job_posts_in_the_channel() -> None:
    async with harness(segmind_latency=0.3) as h:
        rec = await h.kontext(wait=False)
        await rec.wait_response()
        await h.segmind.wait_calls(1)
        h.discord.expire_token(rec)
        await h.wait_settled(rec)
        assert h.outcomes[rec.id].status == "posted"
        assert await h.bot.store.audit.check_invariants() == []
        assert await h.balance() == START - 1
        posts = [m for m in h.discord.public_messages(h.channel_id) if m.get("attachments")]
        assert len(posts) == 1 and f"<@{h.member_id}>" in posts[0]["content"]
        h.segmind.latency = 0.0
        await serves_next(h, balance_after=START - 2)


async def test_token_expired_and_channel_refuses_refunds_in_plain_words() -> None:
    """Neither the interaction nor the channel takes the result: refunded, still serving."""
    async with harness(segmind_latency=0.3) as h:
        rec = await h.kontext(wait=False)
        await rec.wait_response()
        await h.segmind.wait_calls(1)
        h.discord.expire_token(rec)
        h.discord.fail_next("POST", rf"^/channels/{h.channel_id}/messages$", 403, times=1)
        await h.wait_settled(rec)
        assert h.outcomes[rec.id].status == "refunded"
        assert await h.bot.store.audit.check_invariants() == []
        assert await h.balance() == START
        told = [m.get("content") or "" for m in h.discord.public_messages(h.channel_id)]
        assert any("refunded" in t for t in told), told
        for t in told:
            assert_plain(t)
        h.segmind.latency = 0.0
        await serves_next(h, balance_after=START - 1)
