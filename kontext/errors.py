"""Typed errors of the core, each with a plain-words message for the member.

Every error carries:

* ``key`` — the i18n key of the member-facing message (see :mod:`kontext.i18n`), with ``params``;
* ``cause`` — a short slug used in stats ("failures by cause") and logs;
* ``members_fault`` — True when the member caused it (bad input, no credits): the cooldown then
  stays; False when it was not theirs (API down, bot restarting): the credits are refunded and the
  cooldown cleared;
* ``detail`` — extra text for the owner's log only. Never shown to members, never a secret.
"""

from __future__ import annotations

from typing import ClassVar

from kontext.i18n import t


class KontextError(Exception):
    """Base of every error the core raises on purpose."""

    key: ClassVar[str] = "error.internal"
    cause: ClassVar[str] = "internal"
    members_fault: ClassVar[bool] = False

    def __init__(self, detail: str = "", /, **params: object) -> None:
        super().__init__(detail or self.key)
        self.detail = detail
        self.params = params

    def user_message(self, locale: str | None = None) -> str:
        """The member-facing sentence in ``locale``."""
        return t(self.key, locale, **self.params)


# --- input ----------------------------------------------------------------------------------


class InputError(KontextError):
    """The member's input is not acceptable; nothing was charged, no API call was made.

    Raised with an explicit key, e.g. ``InputError("…", key="input.not_image", which=1)``.
    """

    cause = "bad_input"
    members_fault = True

    def __init__(self, detail: str = "", /, *, key: str, **params: object) -> None:
        super().__init__(detail, **params)
        self.key = key  # type: ignore[misc]  # instance override of the class default


# --- credits, cooldowns, capacity --------------------------------------------------------------


class InsufficientCredits(KontextError):
    """The member's balance is below the price of one image."""

    key = "credits.insufficient"
    cause = "insufficient_credits"
    members_fault = True

    def __init__(self, detail: str = "", /, *, balance: int, needed: int) -> None:
        super().__init__(detail, balance=balance, needed=needed)
        self.balance = balance
        self.needed = needed


class OnCooldown(KontextError):
    """The member must wait ``retry_after`` seconds."""

    key = "credits.cooldown_wait"
    cause = "cooldown"
    members_fault = True

    def __init__(self, detail: str = "", /, *, retry_after: float) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(detail, seconds=seconds)
        self.retry_after = retry_after


class TooManyJobs(KontextError):
    """The member already has the server's maximum of jobs in flight."""

    key = "credits.too_many_jobs"
    cause = "too_many_jobs"
    members_fault = True

    def __init__(self, detail: str = "", /, *, limit: int) -> None:
        super().__init__(detail, limit=limit)
        self.limit = limit


class JobAlreadyExists(KontextError):
    """This interaction already made a job (duplicate delivery, or another process has it)."""

    key = "job.duplicate"
    cause = "duplicate"
    members_fault = True

    def __init__(self, detail: str = "", /, *, job_id: int) -> None:
        super().__init__(detail, job_id=job_id)
        self.job_id = job_id


class BudgetExhausted(KontextError):
    """The owner's daily spend cap would be passed by one more image. ``hours``/``minutes``:
    until it resets (00:00 UTC)."""

    key = "budget.exhausted"
    cause = "budget"


class GuildBudgetExhausted(KontextError):
    """This server's daily spend cap (``GUILD_DAILY_BUDGET_USD`` or the owner's override) would
    be passed by one more image. ``hours``/``minutes``: until it resets (00:00 UTC)."""

    key = "budget.guild_exhausted"
    cause = "guild_budget"


class GuildKeyRefused(KontextError):
    """The server's own Segmind key was refused (401/403/404/406): that server's jobs pause
    until an admin sets a new key (or removes it)."""

    key = "apikey.refused"
    cause = "guild_key_refused"


class GuildNotEnabled(KontextError):
    """The bot is not enabled in this server (``ALLOWED_GUILD_IDS``, or blocked by the owner)."""

    key = "guild.not_enabled"
    cause = "guild_not_enabled"


class QueueFull(KontextError):
    """The queue is at ``MAX_QUEUE_SIZE``."""

    key = "queue.full"
    cause = "queue_full"


class QueueTimeout(KontextError):
    """The job waited in the queue longer than ``MAX_QUEUE_WAIT_SECONDS`` (and was refunded)."""

    key = "queue.timeout"
    cause = "queue_timeout"


class ShuttingDown(KontextError):
    """The bot is restarting and takes no new jobs."""

    key = "bot.restarting"
    cause = "shutdown"


class ServicePaused(KontextError):
    """The image service account needs the owner's attention (401/403/406); new jobs wait."""

    key = "api.paused"
    cause = "api_paused"


class JobCancelled(KontextError):
    """The member cancelled (quote declined) or the job was withdrawn before the API call."""

    key = "job.cancelled"
    cause = "cancelled"
    members_fault = True


class ResultNotDelivered(KontextError):
    """The image was generated but could not be posted to Discord."""

    key = "discord.post_failed"
    cause = "post_failed"


class PostFateUnknown(KontextError):
    """The result's upload began and no clear answer came back (a 5xx, a dropped connection, a
    timeout, a cancellation): it may be in the channel. Settled by looking there, never by
    posting again."""

    key = "discord.post_failed"
    cause = "post_unknown"


class PostUnverified(KontextError):
    """A result whose upload began could not be found or ruled out in its channel within the
    bound (the channel cannot be read): the stated rule refunds it."""

    key = "discord.post_unverified"
    cause = "post_unverified"


# --- the Segmind API ---------------------------------------------------------------------------


class ApiError(KontextError):
    """A call to the image API did not give an image.

    ``status`` is the HTTP status when there was one. ``account_problem`` marks answers that say
    the owner's account needs attention (bad key, no credits): new jobs pause until it is fixed.
    ``charged_maybe`` marks failures after the request was sent where the API may have run (and
    billed) the job anyway, so a retry could charge twice.
    """

    key = "api.failed"
    cause = "api_error"
    account_problem: ClassVar[bool] = False

    def __init__(
        self, detail: str = "", /, *, status: int | None = None, charged_maybe: bool = False
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.charged_maybe = charged_maybe


class ApiBadRequest(ApiError):
    """400/422: the API refused the parameters (often an input it could not read)."""

    key = "api.bad_request"
    cause = "api_bad_request"


class ApiAuthError(ApiError):
    """401/403: the bot's API key is missing, wrong or not allowed."""

    key = "api.account"
    cause = "api_auth"
    account_problem = True


class ApiNotFound(ApiError):
    """404/405: the model or endpoint does not exist (a wrong ``SEGMIND_MODEL``)."""

    key = "api.account"
    cause = "api_not_found"
    account_problem = True


class ApiOutOfCredits(ApiError):
    """406: the owner's Segmind account is out of credits."""

    key = "api.account"
    cause = "api_out_of_credits"
    account_problem = True


class ApiRateLimited(ApiError):
    """429: too many requests; ``retry_after`` seconds when the API said."""

    key = "api.busy"
    cause = "api_rate_limited"

    def __init__(
        self, detail: str = "", /, *, status: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(detail, status=status)
        self.retry_after = retry_after


class ApiServerError(ApiError):
    """500/502/503: the image service failed."""

    key = "api.server_error"
    cause = "api_server_error"


class ApiTimeout(ApiError):
    """504, or no answer within the client's timeout."""

    key = "api.timeout"
    cause = "api_timeout"


class ApiConnectionError(ApiError):
    """The connection failed (refused, reset, DNS)."""

    key = "api.unreachable"
    cause = "api_connection"


class ApiBadResponse(ApiError):
    """A 200 whose body is not an image of the asked format, or an unreadable answer."""

    key = "api.bad_response"
    cause = "api_bad_response"


class ApiContentRejected(ApiError):
    """The API's safety filter refused the request or the result.

    The member's prompt or images caused it: the credits come back (the API did not deliver),
    but the cooldown stays, so a refused request cannot be retried at once, over and over.
    """

    key = "api.moderated"
    cause = "api_moderated"
    members_fault = True
