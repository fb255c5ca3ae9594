"""The job's life as explicit states: ``running`` becomes ``claimed``, ``sent`` or ``posting``.

Before, a leased job was ``running`` whatever it had done; a process that took it over guessed
the rest. Now each step is a state of its own (``kontext.vocab.JobState``), written by one fenced
update before the step's effect begins, and three columns record it by the database's clock:
``sent_at`` (the first request to the API was about to go out), ``posting_at`` (the result's
upload began) and ``settle_tries`` (searches of the channel that could not tell).

A ``running`` row of the old code is mapped to the most cautious state that fits what the row
shows: one whose API call had answered (``api_done_at``) may have been posting, so it becomes
``posting`` (searched for, never posted again); any other one may have sent its request, so it
becomes ``sent`` (its budget share kept). SQLite rebuilds ``jobs`` for the new CHECK (batch
mode); Postgres alters it in place.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_NEW = "state IN ('accepted', 'claimed', 'sent', 'posting', 'posted', 'failed', 'refunded')"
_OLD = "state IN ('accepted', 'running', 'posted', 'failed', 'refunded')"


def upgrade() -> None:
    """Add the columns, map ``running`` rows, and replace ``ck_jobs_state``."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("ck_jobs_state", type_="check")
        batch.add_column(sa.Column("sent_at", sa.Double()))
        batch.add_column(sa.Column("posting_at", sa.Double()))
        batch.add_column(
            sa.Column("settle_tries", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    op.execute(
        "UPDATE jobs SET state = 'posting', sent_at = started_at, posting_at = api_done_at "
        "WHERE state = 'running' AND api_done_at IS NOT NULL"
    )
    op.execute(
        "UPDATE jobs SET state = 'sent', sent_at = started_at, api_charged = true "
        "WHERE state = 'running'"
    )
    with op.batch_alter_table("jobs") as batch:
        batch.create_check_constraint("ck_jobs_state", _NEW)


def downgrade() -> None:
    """Back to ``running`` and the old CHECK; the three columns are dropped."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("ck_jobs_state", type_="check")
    op.execute("UPDATE jobs SET state = 'running' WHERE state IN ('claimed', 'sent', 'posting')")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("settle_tries")
        batch.drop_column("posting_at")
        batch.drop_column("sent_at")
        batch.create_check_constraint("ck_jobs_state", _OLD)
