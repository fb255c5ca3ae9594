"""``python bot.py owner …``: the owner's controls, from a console (e.g. ``heroku run``).

No Discord connection is needed and no server admin can reach these: they act on the database
directly. Every running bot process sees a change within seconds (blocks are cached 5 s; budgets
are read inside each reservation).

    python bot.py owner servers                 servers with spend today / 30 days and members
    python bot.py owner budget SERVER_ID 2.50   that server's daily cap in USD (0 = none)
    python bot.py owner budget SERVER_ID default   back to GUILD_DAILY_BUDGET_USD
    python bot.py owner block SERVER_ID         refuse every command there (nothing charged)
    python bot.py owner unblock SERVER_ID
"""

from __future__ import annotations

import sys
from typing import TextIO

from kontext.settings import Settings
from kontext.store import Store
from kontext.store.types import GuildSpend

USAGE = __doc__.split("\n\n", 2)[2].rstrip() if __doc__ else ""


def _server_id(raw: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 2**64:
        raise ValueError(f"not a server id: {raw!r}")
    return int(raw)


def _usd(raw: str) -> float | None:
    if raw.strip().lower() == "default":
        return None
    value = float(raw)
    if not 0 <= value <= 1_000_000 or value != value:
        raise ValueError(f"a budget in USD from 0 to 1000000, or 'default'; got {raw!r}")
    return value


async def run_owner(argv: list[str], settings: Settings, out: TextIO = sys.stdout) -> int:
    """Run one owner command; returns the exit code (2 for a usage error)."""
    if argv in ([], ["help"], ["-h"], ["--help"]):
        print(f"usage:\n{USAGE}", file=out)
        return 0
    try:
        command, args = argv[0], argv[1:]
        action: tuple[str, int, float | None] | None
        if command == "servers" and not args:
            action = None
        elif command in ("block", "unblock") and len(args) == 1:
            action = (command, _server_id(args[0]), None)
        elif command == "budget" and len(args) == 2:
            action = (command, _server_id(args[0]), _usd(args[1]))
        else:
            raise ValueError("unknown command")
    except (IndexError, ValueError) as exc:
        print(f"{exc}\nusage:\n{USAGE}", file=sys.stderr)
        return 2
    store = await Store.open(settings.database_url, settings)
    try:
        if action is None:
            _print_servers(await store.owner.list_guilds(), settings, out)
            return 0
        what, guild_id, usd = action
        if what == "budget":
            await store.owner.set_budget(guild_id, usd)
            shown = (
                f"GUILD_DAILY_BUDGET_USD (${settings.guild_daily_budget_usd:.2f})"
                if usd is None
                else ("no cap" if usd == 0 else f"${usd:.2f} a day")
            )
            print(f"server {guild_id}: budget set to {shown}", file=out)
        else:
            await store.owner.set_blocked(guild_id, what == "block")
            print(f"server {guild_id}: {what}ed", file=out)
        return 0
    finally:
        await store.close()


def _print_servers(rows: list[GuildSpend], settings: Settings, out: TextIO) -> None:
    allowed = settings.allowed_guild_ids
    print(
        f"{'server id':<20} {'name':<24} {'status':<11} {'today':>8} {'cap':>8} "
        f"{'30 days':>9} {'images':>7} {'members':>8}",
        file=out,
    )
    for r in rows:
        status = "blocked" if r.blocked else ("not allowed" if allowed and r.guild_id not in allowed else "on")
        cap = "none" if r.budget_usd == 0 else f"${r.budget_usd:.2f}"
        name = (r.name or "?")[:24]
        print(
            f"{r.guild_id:<20} {name:<24} {status:<11} ${r.spent_today_usd:>7.2f} {cap:>8} "
            f"${r.spent_30d_usd:>8.2f} {r.images_30d:>7} {r.members:>8}",
            file=out,
        )
    if not rows:
        print("(no server has used the bot yet)", file=out)
