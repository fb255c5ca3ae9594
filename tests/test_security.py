"""Security checks.

(a) No secret (the Discord bot token, the Segmind API key) in any log record — captured raw, at
    DEBUG, from the root logger, with no redaction — nor in any text Discord received, any error
    object, any ``repr``, or the database; interaction tokens (live for 15 minutes, they let anyone
    post as the bot in that conversation) are never logged at INFO or above.
(b) ``/kontext-admin`` carries ``default_member_permissions`` = Manage Server; the member
    commands do not.
(c) A job belongs to the member whose interaction made it: its id cannot be reused by another.
(d) Settings changes and credit grants are recorded with the actor.
(e) SQL only through parameters: no f-string, ``%`` or ``.format`` inside ``text(...)`` /
    ``execute(...)`` in the product code (an AST check, with a justified allow-list).
(f) ruff's S608 (SQL built from strings) stays enabled.
(g) ``.env`` is git-ignored and not tracked.
"""

from __future__ import annotations

import ast
import io
import logging
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from kontext.errors import JobAlreadyExists
from kontext.job_options import JobOptions
from kontext.logging_setup import setup_logging
from kontext.pipeline import InputImage, JobSpec
from kontext.schema import ledger, metadata
from kontext.store import ReserveRequest
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, Harness, harness
from tests.e2e.harness import test_settings as make_settings
from tests.e2e.test_faults import START, assert_plain, seen_by

ROOT = Path(__file__).resolve().parents[1]
SECRETS = (DISCORD_TOKEN, SEGMIND_KEY)


# --- (a) secrets ----------------------------------------------------------------------------------


class RawCapture(logging.Handler):
    """Every record, formatted raw: message, exception text and stack; no redaction."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str, str]] = []  # (level, logger, full text)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - keep the raw pieces then
            text = f"{record.msg!r} % {record.args!r}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        self.records.append((record.levelno, record.name, text))


@contextmanager
def capture_all_logs() -> Iterator[RawCapture]:
    root = logging.getLogger()
    saved_level = root.level
    touched = {n: logging.getLogger(n).level for n in ("discord", "kontext", "aiohttp", "sqlalchemy")}
    handler = RawCapture()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in touched:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        for name, level in touched.items():
            logging.getLogger(name).setLevel(level)


def _all_interaction_text(h: Harness) -> list[str]:
    """Every body the bot sent Discord: callbacks, edits, followups, channel messages."""
    out: list[str] = []
    for rec in h.discord.interactions.values():
        out += [repr(r) for r in rec.responses] + [repr(e) for e in rec.edits]
        out += [repr(m) for m in rec.followups]
    out += [repr(m) for m in h.discord.all_messages()]
    return out


async def _database_text(h: Harness) -> list[str]:
    """Every row of every table, as text; the jobs table without its interaction_token column."""
    rows: list[str] = []
    async with h.bot.store.db.read() as conn:
        for table in metadata.sorted_tables:
            cols = [c for c in table.columns if c.name != "interaction_token"]
            for row in await conn.execute(select(*cols)):
                rows.append(f"{table.name}: {tuple(row)!r}")
    return rows


async def _session(h: Harness) -> list[int]:
    """A representative session; returns the ids of the /kontext interactions."""
    ids = []
    # happy path
    rec = await h.kontext(seed=7)
    assert h.outcomes[rec.id].status == "posted"
    ids.append(rec.id)
    # a bad input
    rec = await h.kontext(image_1=(b"GIF89a" + b"\0" * 40, "x.png", "image/png"))
    assert "not a PNG" in seen_by(h, rec)
    ids.append(rec.id)
    # the image API echoes the key in its error body
    h.segmind.fail_next(500, error=f"upstream failed for x-api-key={SEGMIND_KEY}")
    rec = await h.kontext()
    assert h.outcomes[rec.id].status == "refunded"
    ids.append(rec.id)
    # a 401: the account needs the owner, new jobs pause
    h.segmind.fail_next(401, error=f"Unauthorized: invalid API key {SEGMIND_KEY}", times=5)
    rec = await h.kontext()
    assert h.outcomes[rec.id].status == "refunded"
    ids.append(rec.id)
    h.segmind.clear_faults()
    await h.bot.queue.resume()
    # Discord rate-limits the result upload and a status edit
    h.discord.fail_next("POST", r"^/webhooks/\d+/[^/]+$", 429, retry_after=0.05)
    h.discord.fail_next("PATCH", r"^/webhooks/\d+/[^/]+/messages/@original$", 429, retry_after=0.05)
    rec = await h.kontext()
    assert h.outcomes[rec.id].status == "posted"
    ids.append(rec.id)
    # the upload is refused outright
    h.discord.fail_next("POST", r"^/webhooks/\d+/[^/]+$", 400, code=50035)
    rec = await h.kontext()
    assert h.outcomes[rec.id].status == "refunded"
    ids.append(rec.id)
    # admin and member commands
    await h.slash("kontext-admin grant", {"member": h.member_id, "amount": 5, "reason": "contest"},
                  user_id=h.admin_id)
    await h.slash("kontext-admin settings", {"cooldown_seconds": 0}, user_id=h.admin_id)
    await h.slash("kontext-admin stats", user_id=h.admin_id)
    await h.slash("credits")
    return ids


async def test_no_secret_anywhere_in_a_representative_session() -> None:
    with capture_all_logs() as logs:
        async with harness() as h:
            ids = await _session(h)
            tokens = [rec.token for rec in h.discord.interactions.values()]
            sent = _all_interaction_text(h)
            db_rows = await _database_text(h)
            errors = [
                piece
                for o in h.outcomes.values() if o.error is not None
                for piece in (str(o.error), repr(o.error), o.error.detail, repr(o.error.args),
                              o.error.user_message())
            ]
            member_texts = [seen_by(h, h.discord.interactions[i]) for i in ids]
            job = await h.bot.store.jobs.get(ids[0])
            reprs = [repr(h.settings), str(h.settings), repr(h.bot.segmind), repr(job)]
            assert await h.bot.store.audit.check_invariants() == []
            assert await h.balance() == START - 2 + 5
    assert logs.records, "nothing was captured"
    places = {
        "log records": [t for _, _, t in logs.records],
        "texts sent to Discord": sent,
        "database rows": db_rows,
        "error objects": errors,
        "reprs": reprs,
    }
    for where, texts in places.items():
        for text in texts:
            for secret in SECRETS:
                assert secret not in text, f"a secret in {where}: {text[:500]!r}"
    for text in member_texts:
        assert_plain(text)
    # interaction tokens: never at INFO or above (discord.py's own DEBUG lines carry URLs with
    # them; setup_logging keeps the discord loggers at INFO, see the next test)
    assert job is not None and job.interaction_token is None  # cleared once the job ended
    # the capture is raw: discord.py's own DEBUG lines (webhook URLs) do show the tokens
    assert any(tok in t for lvl, _, t in logs.records if lvl < logging.INFO for tok in tokens)
    for level, name, text in logs.records:
        if level >= logging.INFO:
            for token in tokens:
                assert token not in text, f"an interaction token logged by {name}: {text[:300]!r}"


def test_setup_logging_redacts_and_keeps_discord_debug_off() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("discord").level)
    stream = io.StringIO()
    try:
        setup_logging(make_settings(LOG_LEVEL="DEBUG"), stream=stream)
        # discord.py's DEBUG lines include webhook URLs with interaction tokens: kept off
        assert logging.getLogger("discord").getEffectiveLevel() >= logging.INFO
        assert not logging.getLogger("discord.http").isEnabledFor(logging.DEBUG)
        log = logging.getLogger("kontext.test")
        log.warning("token %s key %s", DISCORD_TOKEN, SEGMIND_KEY)
        try:
            raise RuntimeError(f"boom {SEGMIND_KEY}")
        except RuntimeError:
            log.exception("failed with %s", DISCORD_TOKEN)
        out = stream.getvalue()
        assert "[redacted]" in out and "boom" in out
        for secret in SECRETS:
            assert secret not in out
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("discord").setLevel(saved[2])


def test_setup_logging_at_debug_keeps_parameter_logging_drivers_quiet() -> None:
    root = logging.getLogger()
    names = ("discord", "aiosqlite")
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in names})
    try:
        setup_logging(make_settings(LOG_LEVEL="DEBUG"), stream=io.StringIO())
        for name in names:
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)


def _spec(token: str) -> JobSpec:
    img = InputImage(url="https://cdn.example/a.png")
    options = JobOptions(prompt="p", image_1=img, image_2=img, aspect_ratio="1:1",
                         safety_tolerance=1, seed=42)
    return JobSpec(job_id=1, guild_id=2, channel_id=3, user_id=4, options=options,
                   interaction_token=token)


def test_settings_repr_hides_secrets() -> None:
    s = make_settings()
    for text in (repr(s), str(s), f"{s}", f"{s!r}"):
        for secret in SECRETS:
            assert secret not in text


def test_job_spec_repr_hides_the_interaction_token() -> None:
    token = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDEyMzQ1Njc4OmxpdmUtdG9rZW4"
    assert token not in repr(_spec(token))


# --- (b) permissions of the synced commands ----------------------------------------------------


async def test_admin_commands_need_manage_server_member_commands_do_not() -> None:
    async with harness() as h:
        cmds = {c["name"]: c for c in h.discord.synced_commands[None]}
        admin = cmds["kontext-admin"]
        assert admin["default_member_permissions"] == str(1 << 5)  # Manage Server
        for sub in admin["options"]:  # the permission is on the group, for every subcommand
            assert sub["type"] == 1 and "default_member_permissions" not in sub
        for name in ("kontext", "credits"):
            assert cmds[name].get("default_member_permissions") is None, name
        for name in ("kontext", "credits", "kontext-admin"):  # all server-only
            assert cmds[name].get("contexts") in (None, [0]) or cmds[name]["contexts"] == [0]
            assert cmds[name].get("dm_permission") in (None, False)


# --- (c) a job belongs to its member -----------------------------------------------------------


async def test_a_job_id_cannot_be_taken_over_by_another_member() -> None:
    async with harness() as h:
        rec = await h.kontext()
        other = h.admin_id
        before = await h.bot.store.credits.member_status(h.guild_id, other)
        img = InputImage("https://cdn.example/a.png")
        with pytest.raises(JobAlreadyExists):
            await h.bot.store.ledger.reserve(
                ReserveRequest(job_id=rec.id, guild_id=h.guild_id, channel_id=h.channel_id,
                               user_id=other, options=JobOptions("mine now", img, img, seed=1))
            )
        job = await h.bot.store.jobs.get(rec.id)
        assert job is not None and job.user_id == h.member_id and job.params["prompt"] != "mine now"
        assert await h.bot.store.credits.member_status(h.guild_id, other) == before
        # refunding or committing a finished job again changes nothing
        assert await h.bot.store.ledger.refund(rec.id, cause="replay") is False
        assert await h.balance() == START - 1
        assert await h.bot.store.audit.check_invariants() == []


# --- (d) settings and credit changes are recorded with the actor -------------------------------


async def test_settings_changes_and_grants_are_recorded_with_the_actor() -> None:
    async with harness() as h:
        rec = await h.slash(
            "kontext-admin settings",
            {"cooldown_seconds": 45, "blocked_words": "spam, scam", "confirm_quote": True},
            user_id=h.admin_id,
        )
        assert "Saved" in seen_by(h, rec)
        history = await h.bot.store.audit.settings_history(h.guild_id)
        by_key = {row["key"]: row for row in history}
        assert set(by_key) == {"cooldown_seconds", "blocked_words", "confirm_quote"}
        for row in history:
            assert row["actor_id"] == h.admin_id and row["guild_id"] == h.guild_id
            assert row["created_at"] > 0
        assert "45" in by_key["cooldown_seconds"]["new_value"]
        assert "spam" in by_key["blocked_words"]["new_value"]
        await h.slash("kontext-admin settings", {"reset": "cooldown_seconds"}, user_id=h.admin_id)
        newest = (await h.bot.store.audit.settings_history(h.guild_id))[0]
        assert (newest["key"], newest["actor_id"]) == ("cooldown_seconds", h.admin_id)

        await h.slash("kontext-admin grant", {"member": h.member_id, "amount": 3, "reason": "prize"},
                      user_id=h.admin_id)
        await h.slash("kontext-admin revoke", {"member": h.member_id, "amount": 2},
                      user_id=h.admin_id)
        async with h.bot.store.db.read() as conn:
            rows = (await conn.execute(
                select(ledger.c.kind, ledger.c.delta, ledger.c.actor_id, ledger.c.reason)
                .where(ledger.c.user_id == h.member_id, ledger.c.kind.in_(["grant", "revoke"]))
                .order_by(ledger.c.id)
            )).all()
        assert [tuple(r) for r in rows] == [
            ("grant", 3, h.admin_id, "prize"), ("revoke", -2, h.admin_id, None),
        ]
        assert await h.bot.store.audit.check_invariants() == []


# --- (e) SQL only through parameters ---------------------------------------------------------------

SQL_CALLS = {"text", "execute", "exec_driver_sql", "executemany", "executescript", "fetch",
             "fetchval", "fetchrow", "literal_column"}
# (file, the call's source text) -> why it is safe. Keep this list short and justified.
SQL_ALLOWED = {
    ("kontext/db_engine.py", 'cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")'):
        "a PRAGMA takes no bound parameters; the value is a module int constant formatted with :d",
}


def _is_dynamic_string(node: ast.AST, tainted: set[str]) -> bool:
    """An f-string with values, ``"…" % x``, ``"…".format(…)``, a ``+`` of strings, or a name
    assigned from one of those in the same function."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        left, right = node.left, node.right
        stringy = (
            isinstance(left, ast.Constant) and isinstance(left.value, str)
            or isinstance(right, ast.Constant) and isinstance(right.value, str)
            or _is_dynamic_string(left, tainted) or _is_dynamic_string(right, tainted)
        )
        return stringy and not (isinstance(left, ast.Constant) and isinstance(right, ast.Constant))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "format" and isinstance(node.func.value, ast.Constant)
    if isinstance(node, ast.Name):
        return node.id in tainted
    return False


def sql_built_from_strings(path: Path) -> list[tuple[int, str]]:
    """(line, source) of every SQL call whose statement is built by string formatting."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    scopes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for scope in [tree, *scopes]:
        tainted: set[str] = set()
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and _is_dynamic_string(node.value, tainted):
                tainted |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(scope):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in SQL_CALLS or not node.args:
                continue
            if _is_dynamic_string(node.args[0], tainted):
                found.append((node.lineno, ast.get_source_segment(source, node) or ""))
    return sorted(set(found))


def test_sql_is_never_built_from_strings() -> None:
    files = sorted([*ROOT.glob("kontext/**/*.py"), *ROOT.glob("cogs/*.py"), ROOT / "bot.py"])
    assert len(files) > 10
    offenders = []
    allowed_seen = set()
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for line, call in sql_built_from_strings(path):
            if (rel, call) in SQL_ALLOWED:
                allowed_seen.add((rel, call))
                continue
            offenders.append(f"{rel}:{line}: {call}")
    assert offenders == [], "SQL built by string formatting (use bound parameters):\n" + "\n".join(offenders)
    assert allowed_seen == set(SQL_ALLOWED), "stale allow-list entries: remove them"


def test_the_sql_check_catches_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(conn, name, n):\n"
        "    conn.execute(text(f\"SELECT * FROM t WHERE name = '{name}'\"))\n"
        "    conn.execute(\"DELETE FROM t WHERE id = %s\" % n)\n"
        "    conn.exec_driver_sql(\"SELECT {}\".format(n))\n"
        "    q = 'SELECT * FROM t WHERE a = ' + name\n"
        "    conn.execute(text(q))\n"
        "    conn.execute(text('SELECT * FROM t WHERE a = :a'), {'a': name})\n"
        "    conn.execute(select(t).where(t.c.a == name))\n"
    )
    assert [line for line, _ in sql_built_from_strings(bad)] == [2, 3, 4, 6]


# --- (f) the linter keeps guarding it ------------------------------------------------------------


def test_ruff_s608_stays_enabled() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    lint = config["tool"]["ruff"]["lint"]
    selected = set(lint.get("select", [])) | set(lint.get("extend-select", []))
    assert selected & {"S608", "S60", "S6", "S", "ALL"}, selected
    ignored = set(lint.get("ignore", [])) | set(lint.get("extend-ignore", []))
    assert not ignored & {"S608", "S60", "S6", "S"}, ignored
    per_file = lint.get("per-file-ignores", {})
    assert not any("S608" in rules for rules in per_file.values()), per_file
    ruff = ROOT / ".venv" / "bin" / "ruff"
    if ruff.exists():
        result = subprocess.run([str(ruff), "check", "--select", "S608", "kontext", "cogs", "bot.py"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


# --- (g) .env stays out of git -----------------------------------------------------------------------


def test_dotenv_is_ignored_and_not_tracked() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".env" in patterns or "*.env" in patterns or ".env*" in patterns, patterns
    assert "!.env" not in patterns
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30, check=True).stdout.splitlines()
    env_files = [f for f in tracked if re.search(r"(^|/)\.env(\.|$)", f) and not f.endswith(".example")]
    assert env_files == [], env_files
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, ".env is not ignored by git"


def test_env_example_holds_no_real_secret() -> None:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() in {"DISCORD_TOKEN", "SEGMIND_API_KEY"}:
            assert len(value.strip()) < 20, f"{key} in .env.example looks like a real value"
