"""The bot's fixed vocabularies, one ``StrEnum`` each.

Every member *is* its string (``JobState.POSTED == "posted"``), so what the database stores, what
JSON carries and what the tests compare stays the same; the code names the members instead of
spelling bare strings, and a typo becomes an ``AttributeError`` instead of a silent mismatch.
The database's CHECK constraints are built from these enums (:mod:`kontext.schema`).
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """A job row's ``state``, one step of the job's life (the table in docs/ARCHITECTURE.md):

    ``accepted`` (waiting in the queue) → ``claimed`` (a process holds its lease; nothing sent)
    → ``sent`` (written just before the first request to the API: billed from here) →
    ``posting`` (written just before the result's upload to Discord begins: never posted again)
    → ``posted`` (committed: the charge is final). Every unfinished state may end
    ``refunded`` (charge given back) or ``failed`` (refunded with nothing to give back: the job
    was free); ``claimed`` may go back to ``accepted`` (nothing was sent). Each step is one
    conditional update fenced by the job's lease."""

    ACCEPTED = "accepted"
    CLAIMED = "claimed"
    SENT = "sent"
    POSTING = "posting"
    POSTED = "posted"
    FAILED = "failed"
    REFUNDED = "refunded"


class LedgerKind(StrEnum):
    """A ledger row's ``kind`` (see "Money rules" in docs/ARCHITECTURE.md)."""

    START = "start"  # the starting credits of a new member
    GRANT = "grant"  # an admin gave credits
    REVOKE = "revoke"  # an admin took credits
    DAILY = "daily"  # the daily free credits
    RESERVE = "reserve"  # a job's price, charged before the API call
    COMMIT = "commit"  # delta 0: the job was posted, its charge is final
    REFUND = "refund"  # the job's price given back


class Outcome(StrEnum):
    """How the pipeline ended a job in this process (``JobOutcome.status``)."""

    POSTED = "posted"
    REFUNDED = "refunded"
    REJECTED = "rejected"  # refused before the reservation: nothing charged
    DUPLICATE = "duplicate"  # this interaction already made a job
    HANDED_OVER = "handed_over"  # a shutdown left it to the next process
    QUEUED = "queued"  # left waiting in the queue at a restart
    ELSEWHERE = "elsewhere"  # another process runs or ended it
    LOST = "lost"  # its lease was lost


class Source(StrEnum):
    """How a job started (``JobSpec.source``, stored in the job's params)."""

    SLASH = "slash"  # /kontext
    REROLL = "reroll"  # the result's "reroll" button (new seed)
    SWAP = "swap"  # the result's "swap images" button
    EDIT = "edit"  # the result's "edit prompt" button
    USE_AS_INPUT = "use_as_input"  # the result's "use as input" button
    CONTEXT_MENU = "context_menu"  # "Kontext: edit these images" on a message


class ShowcaseState(StrEnum):
    """A showcase post's ``state`` (``showcase_posts.state``)."""

    PENDING = "pending"  # waiting for a moderator
    POSTED = "posted"  # the card is in the showcase channel (or being posted)
    REJECTED = "rejected"  # a moderator said no
    REMOVED = "removed"  # the original was deleted


class ImageFormat(StrEnum):
    """An image format, named as the Segmind API and file names spell it (``"jpg"``, never
    ``"jpeg"``). The other spellings are mapped at the edges: :attr:`pil` for Pillow,
    :attr:`mime` for HTTP and Discord."""

    JPG = "jpg"
    PNG = "png"
    WEBP = "webp"

    @property
    def pil(self) -> str:
        """Pillow's format name: ``"JPEG"``, ``"PNG"``, ``"WEBP"``."""
        return _PIL[self]

    @property
    def mime(self) -> str:
        """The content type: ``"image/jpeg"``, ``"image/png"``, ``"image/webp"``."""
        return _MIME[self]

    @classmethod
    def from_pil(cls, name: str | None) -> ImageFormat | None:
        """The member for one of Pillow's format names (``Image.format``), else None."""
        return _FROM_PIL.get((name or "").upper())


_PIL: dict[ImageFormat, str] = {
    ImageFormat.JPG: "JPEG",
    ImageFormat.PNG: "PNG",
    ImageFormat.WEBP: "WEBP",
}
_FROM_PIL: dict[str, ImageFormat] = {pil: fmt for fmt, pil in _PIL.items()}
_MIME: dict[ImageFormat, str] = {
    ImageFormat.JPG: "image/jpeg",
    ImageFormat.PNG: "image/png",
    ImageFormat.WEBP: "image/webp",
}

#: the output formats a member may ask for (the API's ``output_format``)
OUTPUT_FORMATS: tuple[ImageFormat, ...] = (ImageFormat.JPG, ImageFormat.PNG)
