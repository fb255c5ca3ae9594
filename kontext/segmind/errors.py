"""The typed error of an API answer: an HTTP status (with the API's own words), or a v2 job that
ended FAILED. Moderation and out-of-credits are told apart by the message."""

from __future__ import annotations

import re

from kontext.errors import (
    ApiAuthError,
    ApiBadRequest,
    ApiBadResponse,
    ApiContentRejected,
    ApiError,
    ApiNotFound,
    ApiOutOfCredits,
    ApiRateLimited,
    ApiServerError,
    ApiTimeout,
)

_MODERATION = re.compile(
    r"nsfw|moderat|unsafe|inappropriate|content[ _-]?polic|flagged|safety (?:filter|check|system)"
    r"|sensitive content|not safe",
    re.IGNORECASE,
)
_OUT_OF_CREDITS = re.compile(r"insufficient (?:credit|balance|fund)|out of credit", re.IGNORECASE)


def error_for_status(
    status: int,
    detail: str,
    *,
    message: str = "",
    retry_after: float | None = None,
    charged_maybe: bool = False,
) -> ApiError:
    """The typed error for an HTTP error ``status`` (``message`` is the API's own words)."""
    if status in (400, 422):
        if _MODERATION.search(message) and "safety_tolerance" not in message:
            return ApiContentRejected(detail, status=status)
        return ApiBadRequest(detail, status=status)
    if status in (401, 403):
        return ApiAuthError(detail, status=status)
    if status in (404, 405):
        return ApiNotFound(detail, status=status)
    if status == 406:
        return ApiOutOfCredits(detail, status=status)
    if status == 429:
        return ApiRateLimited(detail, status=status, retry_after=retry_after)
    if status == 504:
        return ApiTimeout(detail, status=status, charged_maybe=charged_maybe)
    if 500 <= status < 600:
        return ApiServerError(detail, status=status, charged_maybe=charged_maybe and status == 500)
    if 400 <= status < 500:
        return ApiBadRequest(detail, status=status)
    return ApiBadResponse(detail, status=status)


def failed_job_error(message: str, detail: str, status: int | None) -> ApiError:
    """The typed error of a v2 job that ended FAILED (failed jobs are not billed)."""
    if _MODERATION.search(message) and "safety_tolerance" not in message:
        return ApiContentRejected(detail, status=status)
    if _OUT_OF_CREDITS.search(message):
        return ApiOutOfCredits(detail, status=status)
    if re.search(r"invalid|validation|parameter|input|download|fetch|url|unsupported", message, re.I):
        return ApiBadRequest(detail, status=status)
    return ApiServerError(detail, status=status)



class SendFenced(Exception):
    """``may_send()`` said no: no further POST was sent."""

    def __init__(self, posts: int = 0) -> None:
        super().__init__(f"fenced after {posts} POST(s)")
        self.posts = posts
