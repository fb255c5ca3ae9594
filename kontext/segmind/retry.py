"""The Segmind client's HTTP retries: the only place in the bot that repeats a request to the API.

The pipeline calls the client once per job and never repeats it; the shared queue owns pacing
(when the next job may start, slowed down for every process by each 429, told to the call's
:class:`~kontext.segmind.results.CallHooks`). The loop itself is tenacity's; this module says what
is repeated, how often and after what pause. Before every POST — the first and each repeat — the
call's ``may_send()`` is asked (the caller's lease may have ended during a long Retry-After): when
it says no, :class:`~kontext.segmind.errors.SendFenced` is raised and nothing more is sent.

What is repeated — only what cannot start (and bill) a second generation, since the API has no
idempotency key:

========================================  ======  =========================================
failure                                   POST    GET (polls, downloads, credits)
========================================  ======  =========================================
could not connect / connect timeout       yes     yes   (nothing was sent)
HTTP 429                                  yes     yes   (after its Retry-After /
                                                        ``x-rate-limit-reset-at-utc``; not when
                                                        that is over ``retry_after_max_s``)
HTTP 502, 503                             yes     yes   (the gateway answered; no job started)
HTTP 500, 504                             no      yes   (a POST may have run: ``charged_maybe``)
timeout / reset after the body was sent   no      yes   (a POST may have run: ``charged_maybe``)
TLS failure, any 4xx but 429              no      no    (repeating cannot help)
a 200 with a useless body                 no      no    (billed: ``charged_maybe``)
========================================  ======  =========================================

An ambiguous POST is never repeated: it is raised with ``charged_maybe=True`` and the job is
settled from what the database knows (a stored v2 request id is resumed, never re-submitted).

How often: at most ``max_retries`` repeats after the first try, so one call sends at most
``max_retries + 1`` requests (:data:`DEFAULT_MAX_RETRIES` = 5: six). Pauses grow exponentially
with full jitter between ``backoff_base_s`` and ``backoff_max_s``; a 429's own wait replaces the
backoff.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

from kontext.errors import ApiError, ApiRateLimited
from kontext.segmind.errors import SendFenced

log = logging.getLogger("kontext.segmind")

T = TypeVar("T")
SleepFn = Callable[[float], Awaitable[Any]]
RateLimitHook = Callable[[float | None], None]
SendGate = Callable[[], bool]

DEFAULT_MAX_RETRIES = 5
"""Repeats after the first try: a job sends at most ``DEFAULT_MAX_RETRIES + 1`` POSTs."""

FREE_POST_STATUSES = frozenset({429, 502, 503})
"""Answers to a POST that prove no generation started: repeating one cannot bill twice."""


def repeat_is_free(status: int, *, idempotent: bool) -> bool:
    """Whether an answer with HTTP ``status`` may be repeated (see the module's table)."""
    return status in FREE_POST_STATUSES or (idempotent and status >= 500)


class Retryable(Exception):
    """``error`` happened where repeating the request cannot charge twice (raised inside one
    attempt, caught by :func:`with_retries`); ``delay`` is a 429's requested wait."""

    def __init__(self, error: ApiError, delay: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay = delay


@dataclass(frozen=True)
class RetryPolicy:
    """How often and after what pause a free failure is repeated (see the module docstring)."""

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    retry_after_max_s: float = 30.0

    @property
    def max_attempts(self) -> int:
        """The most requests one call sends: the first try and ``max_retries`` repeats."""
        return max(0, self.max_retries) + 1

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """The pause before repeat number ``attempt`` (1-based): exponential with jitter, or a
        429's own wait (capped at ``retry_after_max_s``) plus a little jitter."""
        if retry_after is not None:
            return min(self.retry_after_max_s, retry_after) + random.uniform(
                0, self.backoff_base_s / 2
            )
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** (attempt - 1)))
        return random.uniform(self.backoff_base_s, max(self.backoff_base_s, ceiling))

    def waits_for(self, retry: Retryable) -> bool:
        """False for a 429 asking for more than ``retry_after_max_s``: raised at once, so the
        member is refunded rather than held for long."""
        return retry.delay is None or retry.delay <= self.retry_after_max_s


async def with_retries(
    op: Callable[[], Awaitable[T]],
    label: str,
    *,
    policy: RetryPolicy,
    sleep: SleepFn,
    on_rate_limited: RateLimitHook | None = None,
    may_send: SendGate | None = None,
) -> tuple[T, int]:
    """Run ``op``, repeating it on :class:`Retryable` as ``policy`` says.

    Returns ``(value, attempts)``. Each 429 is told to ``on_rate_limited`` once, with its wait
    (a broken hook never breaks the call). ``may_send`` (given for a POST) is asked before every
    attempt, the first included: False (or a hook that raises) ends the call with
    :class:`SendFenced` and ``op`` is not run again. When no repeat is left, or a 429 asks for too
    long, the wrapped :class:`~kontext.errors.ApiError` is raised (its detail says how many
    attempts).
    """
    attempts = 0

    async def attempt() -> T:
        nonlocal attempts
        if may_send is not None and not _allowed(may_send):
            log.warning("segmind %s: not sent, the caller may no longer send (%d sent before)",
                        label, attempts)
            raise SendFenced(label, attempts)
        attempts += 1
        try:
            return await op()
        except Retryable as retry:
            if isinstance(retry.error, ApiRateLimited) and on_rate_limited is not None:
                try:
                    on_rate_limited(retry.delay)
                except Exception:  # noqa: BLE001 - a hook must never break a call
                    log.exception("on_rate_limited hook failed")
            raise

    def wait(state: tenacity.RetryCallState) -> float:
        return policy.backoff(state.attempt_number, _retry_of(state).delay)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = _retry_of(state).error
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "segmind %s: %s (HTTP %s); retry %d/%d in %.2fs",
            label, type(error).__name__, error.status, state.attempt_number, policy.max_retries,
            delay,
        )

    retrying = tenacity.AsyncRetrying(
        sleep=sleep,
        stop=tenacity.stop_after_attempt(policy.max_attempts),
        wait=wait,
        retry=tenacity.retry_if_exception(
            lambda exc: isinstance(exc, Retryable) and policy.waits_for(exc)
        ),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        value: T = await retrying(attempt)
    except Retryable as retry:
        error = retry.error
        if attempts >= policy.max_attempts:
            error.detail = f"{error.detail} (after {attempts} attempts)"
            error.args = (error.detail,)
        else:
            log.warning(
                "segmind %s: rate limited for %.1fs (over %.1fs): not waiting",
                label, retry.delay or 0.0, policy.retry_after_max_s,
            )
        raise error from None
    return value, attempts


def _allowed(may_send: SendGate) -> bool:
    """``may_send()``; a hook that raises says no (sending without the lease could bill twice)."""
    try:
        return bool(may_send())
    except Exception:  # noqa: BLE001 - a broken hook must not send
        log.exception("may_send hook failed: not sending")
        return False


def _retry_of(state: tenacity.RetryCallState) -> Retryable:
    """The :class:`Retryable` that ended the attempt ``state`` describes."""
    outcome = state.outcome
    exc = outcome.exception() if outcome is not None else None
    assert isinstance(exc, Retryable)  # only Retryable is ever retried (see ``retry=``)
    return exc
