"""Per-server rules: channels, safety, blocked words, exempt roles."""

from __future__ import annotations

import pytest

from kontext import policy
from kontext.errors import InputError
from kontext.store import GuildSettings


def gs(**kw: object) -> GuildSettings:
    base: dict[str, object] = dict(
        guild_id=1,
        starting_credits=10,
        credits_per_image=1,
        daily_free_credits=0,
        cooldown_seconds=60,
        jobs_per_member=1,
        max_safety_tolerance=2,
        default_aspect_ratio="match_input_image",
    )
    base.update(kw)
    return GuildSettings(**base)  # type: ignore[arg-type]


def test_channels_anywhere_when_empty() -> None:
    policy.check_channel(gs(), [5])


def test_channels_restricted_with_thread_parent() -> None:
    g = gs(allowed_channel_ids=(100, 200))
    policy.check_channel(g, [999, 200])  # a thread whose parent is allowed
    with pytest.raises(InputError) as info:
        policy.check_channel(g, [999])
    assert info.value.key == "input.channel_not_allowed"
    assert "<#100>" in info.value.user_message()


@pytest.mark.parametrize(
    ("maximum", "asked", "nsfw", "key"),
    [
        (2, 2, True, None),
        (2, 2, False, "input.safety_nsfw_only"),
        (1, 2, True, "input.safety_too_high"),
        (0, 1, True, "input.safety_too_high"),
        (1, 1, False, None),
        (0, 0, False, None),
    ],
)
def test_safety(maximum: int, asked: int, nsfw: bool, key: str | None) -> None:
    g = gs(max_safety_tolerance=maximum)
    if key is None:
        policy.check_safety(g, asked, channel_nsfw=nsfw)
    else:
        with pytest.raises(InputError) as info:
            policy.check_safety(g, asked, channel_nsfw=nsfw)
        assert info.value.key == key


@pytest.mark.parametrize(
    ("prompt", "hit"),
    [
        ("a photo of a CAT", "cat"),
        ("a catalogue photo", None),
        ("Crème brûlée", "creme brulee"),
        ("make it gory please", "gory"),
        ("nothing here", None),
    ],
)
def test_blocked_words_whole_word_and_accent_free(prompt: str, hit: str | None) -> None:
    assert policy.find_blocked_word(prompt, ["cat", "creme brulee", "Gory"]) in (
        hit,
        hit and hit.title(),
    )


def test_check_request_blocked_word_message() -> None:
    with pytest.raises(InputError) as info:
        policy.check_request(
            gs(blocked_words=("dog",)),
            prompt="a dog",
            safety_tolerance=1,
            channel_ids=[1],
            channel_nsfw=False,
        )
    assert info.value.key == "input.blocked_word"
    assert "dog" not in info.value.user_message()  # the message does not echo the word


def test_exempt_roles() -> None:
    g = gs(exempt_role_ids=(7,))
    assert policy.is_exempt(g, [1, 7])
    assert not policy.is_exempt(g, [1])
