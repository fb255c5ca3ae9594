"""The text options of a job: the prompt (cleaned, length-checked) and the seed (random when not
given)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from kontext.errors import InputError

SEED_MAX = 2**32 - 1
"""The largest seed the API takes (inclusive)."""

# C0 controls except tab and newline, DEL, and the C1 controls.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BLANK_LINES_RE = re.compile(r"\n(?:[ \t]*\n){2,}")


def validate_prompt(prompt: str, *, limit: int = 1000) -> str:
    """The cleaned prompt, or :class:`InputError` (``input.prompt_empty`` /
    ``input.prompt_too_long``).

    Line ends become ``\\n``; control characters other than tab and newline are removed (emoji
    sequences, joiners and right-to-left marks are kept); more than two line breaks in a row become
    two; the text is trimmed. The length is counted in Unicode code points after all that.
    """
    text = prompt.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    text = text.strip()
    if not text:
        raise InputError("empty prompt", key="input.prompt_empty")
    if len(text) > limit:
        raise InputError(
            f"prompt has {len(text)} code points", key="input.prompt_too_long",
            length=len(text), limit=limit,
        )
    return text


def validate_seed(seed: int | None, rng: Callable[[int], int] | None = None) -> int:
    """``seed`` when it is within 0..4294967295, a random one when None.

    ``rng`` is a ``randbelow``-like function (default :func:`secrets.randbelow`), for tests.
    Out of range (or not a whole number) raises :class:`InputError` ``input.seed_range``.
    """
    if seed is None:
        return (rng or secrets.randbelow)(SEED_MAX + 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"seed {seed!r}", key="input.seed_range")
    return seed

