"""One call's context: what :mod:`~kontext.segmind.v1` and :mod:`~kontext.segmind.v2` need to
talk to the API — the transport, the call's settings, its retry policy and its
:class:`~kontext.segmind.results.CallHooks` — made by :class:`~kontext.segmind.client.SegmindClient`
for each call, so v1/v2 never see the client (no import back into it).

Result URLs (a v1 answer carrying a URL, a v2 job's ``output``) are fetched only from the API's
own hosts (:func:`result_url_allowed`), redirects followed by hand and only to those hosts; any
other URL is an :class:`~kontext.errors.ApiBadResponse` with ``charged_maybe`` (the API ran) and
no request goes to it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from yarl import URL

from kontext.errors import ApiBadResponse
from kontext.segmind.parsing import error_message
from kontext.segmind.results import CallHooks
from kontext.segmind.retry import RetryPolicy, SleepFn, with_retries
from kontext.segmind.transport import Answer, Transport

T = TypeVar("T")

RESULT_HOST_DOMAINS: tuple[str, ...] = ("segmind.com",)
"""Domains (and their subdomains, over https) a result image may come from, beside the base URL's
own origin and Segmind's S3 buckets (:data:`SEGMIND_BUCKET`)."""

SEGMIND_BUCKET = re.compile(r"segmind[a-z0-9.-]*\.s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com")
"""Segmind's own S3 buckets (virtual-hosted style, e.g. ``segmind-resources.s3.amazonaws.com``,
the storage its API pages link to): bucket names are global, so a ``segmind…`` bucket is theirs
to name. Results are served from storage of this kind; the API reference names no other host."""

MAX_RESULT_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def result_url_allowed(url: str | URL, base_url: str) -> bool:
    """Whether a result image may be fetched from ``url``: the base URL's own origin (scheme, host
    and port: so the test emulator's ``http://127.0.0.1:port`` is allowed, and only it), or an
    https host of :data:`RESULT_HOST_DOMAINS`."""
    target = url if isinstance(url, URL) else URL(url)
    if not target.is_absolute() or target.scheme not in ("http", "https"):
        return False
    if target.origin() == URL(base_url).origin():
        return True
    host = (target.host or "").lower().rstrip(".")
    return target.scheme == "https" and target.port == 443 and (
        any(host == domain or host.endswith("." + domain) for domain in RESULT_HOST_DOMAINS)
        or SEGMIND_BUCKET.fullmatch(host) is not None
    )


@dataclass(frozen=True, slots=True)
class ApiCall:
    """Everything one call to the API uses (see the module)."""

    http: Transport
    base_url: str
    model: str
    policy: RetryPolicy
    sleep: SleepFn
    hooks: CallHooks
    timeout_s: float
    poll_interval_s: float
    poll_max_interval_s: float

    async def retrying(
        self, op: Callable[[], Awaitable[T]], label: str, *, post: bool = False
    ) -> tuple[T, int]:
        """Run ``op`` under the retry policy: ``(value, attempts)``. Each 429 is told to the
        hooks; with ``post``, ``hooks.may_send()`` is asked before every attempt (no: raises
        :class:`~kontext.segmind.errors.SendFenced`)."""
        return await with_retries(
            op, label, policy=self.policy, sleep=self.sleep,
            on_rate_limited=self.hooks.on_rate_limited,
            may_send=self.hooks.may_send if post else None,
        )

    async def download(self, url: str, label: str) -> Answer:
        """GET a result image from the API's own hosts (:func:`result_url_allowed`), following at
        most :data:`MAX_RESULT_REDIRECTS` redirects by hand, each to an allowed host."""
        http = self.http

        def refused(where: URL, why: str) -> ApiBadResponse:
            return ApiBadResponse(
                http.detail(f"GET {label}", None,
                            f"result URL on {where.host!r} ({where.scheme}) refused: {why}", None),
                charged_maybe=True,  # the API answered with a result: it ran
            )

        start = URL(url)
        if not result_url_allowed(start, self.base_url):
            raise refused(start, "not one of the API's own hosts")

        async def once() -> Answer:
            target = start
            for _hop in range(MAX_RESULT_REDIRECTS + 1):
                answer = await http.request("GET", str(target), idempotent=True, spool=True)
                location = answer.headers.get("Location")
                if answer.status in _REDIRECTS and location:
                    if answer.file is not None:
                        answer.file.close()
                    target = target.join(URL(location))
                    if not result_url_allowed(target, self.base_url):
                        raise refused(target, "redirected away from the API's own hosts")
                    continue
                if answer.status == 200:
                    return answer
                if answer.file is not None:
                    answer.file.close()
                if answer.status == 429 or answer.status >= 500:
                    raise http.status_error(answer, f"GET {label}", idempotent=True)
                # 403/404 on a result URL: expired or gone, not an account problem.
                raise ApiBadResponse(
                    http.detail(f"GET {label}", answer.status,
                                "result not downloadable: " + error_message(answer.body), None),
                    status=answer.status, charged_maybe=True,
                )
            raise refused(target, f"more than {MAX_RESULT_REDIRECTS} redirects")

        answer, _ = await self.retrying(once, f"GET {label}")
        http.log_call("GET", label, answer)
        return answer
