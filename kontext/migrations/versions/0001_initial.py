"""The schema as the home-grown runner left it at its version 5, frozen (written out, never
today's metadata).

Revision ID: 0001
Revises: -
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# an autoincrementing id: BIGSERIAL on Postgres, INTEGER (the rowid) on SQLite
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create every table."""
    op.create_table(
        "guild_settings",
        sa.Column("guild_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("starting_credits", sa.BigInteger()),
        sa.Column("credits_per_image", sa.BigInteger()),
        sa.Column("daily_free_credits", sa.BigInteger()),
        sa.Column("cooldown_seconds", sa.Integer()),
        sa.Column("jobs_per_member", sa.Integer()),
        sa.Column("max_safety_tolerance", sa.Integer()),
        sa.Column("default_aspect_ratio", sa.Text()),
        sa.Column("showcase_channel_id", sa.BigInteger()),
        sa.Column("showcase_requires_approval", sa.Boolean()),
        sa.Column("allowed_channel_ids", sa.Text()),
        sa.Column("exempt_role_ids", sa.Text()),
        sa.Column("blocked_words", sa.Text()),
        sa.Column("confirm_quote", sa.Boolean()),
        sa.Column("updated_at", sa.Double()),
        sa.Column("updated_by", sa.BigInteger()),
    )
    op.create_table(
        "settings_audit",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("actor_id", sa.BigInteger()),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("old_value", sa.Text()),
        sa.Column("new_value", sa.Text()),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_settings_audit_guild", "settings_audit", ["guild_id", "created_at"])
    op.create_table(
        "members",
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("inflight", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("cooldown_until", sa.Double()),
        sa.Column("last_daily", sa.Text()),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("guild_id", "user_id", name="pk_members"),
        sa.CheckConstraint("balance >= 0", name="ck_members_balance"),
        sa.CheckConstraint("inflight >= 0", name="ck_members_inflight"),
    )
    op.create_table(
        "ledger",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("job_id", sa.BigInteger()),
        sa.Column("actor_id", sa.BigInteger()),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "kind IN ('start', 'grant', 'revoke', 'daily', 'reserve', 'commit', 'refund')",
            name="ck_ledger_kind",
        ),
        sa.ForeignKeyConstraint(
            ["guild_id", "user_id"],
            ["members.guild_id", "members.user_id"],
            name="fk_ledger_member",
        ),
    )
    op.create_index("ix_ledger_member", "ledger", ["guild_id", "user_id", "id"])
    op.create_index("ix_ledger_job", "ledger", ["job_id"])
    op.create_index("ix_ledger_guild_created", "ledger", ["guild_id", "created_at"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("seed", sa.BigInteger()),
        sa.Column("cost_credits", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd_micros", sa.BigInteger(), nullable=False),
        sa.Column("cooldown_until", sa.Double()),
        sa.Column("locale", sa.Text()),
        sa.Column("application_id", sa.BigInteger()),
        sa.Column("interaction_token", sa.Text()),
        sa.Column("worker_id", sa.Text()),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("started_at", sa.Double()),
        sa.Column("finished_at", sa.Double()),
        sa.Column("duration_s", sa.Double()),
        sa.Column("api_request_id", sa.Text()),
        sa.Column("api_status_url", sa.Text()),
        sa.Column("api_response_url", sa.Text()),
        sa.Column("api_charged", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("result_message_id", sa.BigInteger()),
        sa.Column("result_channel_id", sa.BigInteger()),
        sa.Column("failure_cause", sa.Text()),
        sa.Column("parent_job_id", sa.BigInteger()),
        sa.Column("queued_at", sa.Double()),
        sa.Column("lease_owner", sa.Text()),
        sa.Column("lease_epoch", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("lease_expires_at", sa.Double()),
        sa.Column("api_done_at", sa.Double()),
        sa.Column("account", sa.Text(), nullable=False, server_default=sa.text("'owner'")),
        sa.CheckConstraint(
            "state IN ('accepted', 'running', 'posted', 'failed', 'refunded')",
            name="ck_jobs_state",
        ),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_member_state", "jobs", ["guild_id", "user_id", "state"])
    op.create_index("ix_jobs_guild_created", "jobs", ["guild_id", "created_at"])
    op.create_index("ix_jobs_state_queued", "jobs", ["state", "queued_at"])
    op.create_index("ix_jobs_started", "jobs", ["started_at"])
    op.create_table(
        "budget_days",
        sa.Column("day", sa.Text(), primary_key=True),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("generations", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("heartbeat_at", sa.Double(), nullable=False),
        sa.Column("retired_at", sa.Double()),
    )
    op.create_table(
        "api_accounts",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("paused_reason", sa.Text()),
        sa.Column("blocked_until", sa.Double(), nullable=False, server_default=sa.text("0")),
        sa.Column("updated_at", sa.Double(), nullable=False),
    )
    op.create_table(
        "guild_controls",
        sa.Column("guild_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("name", sa.Text()),
        sa.Column("blocked", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("daily_budget_usd", sa.Double()),
        sa.Column("updated_at", sa.Double(), nullable=False),
    )
    op.create_table(
        "guild_budget_days",
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("day", sa.Text(), nullable=False),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("generations", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("guild_id", "day", name="pk_guild_budget_days"),
    )
    op.create_table(
        "guild_api_keys",
        sa.Column("guild_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("key_encrypted", sa.Text(), nullable=False),
        sa.Column("max_concurrent", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("rpm", sa.Integer(), nullable=False, server_default=sa.text("5")),
        sa.Column("added_by", sa.BigInteger()),
        sa.Column("added_at", sa.Double(), nullable=False),
    )
    op.create_table(
        "bot_meta",
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
    )
    op.create_table(
        "showcase_posts",
        sa.Column("job_id", sa.BigInteger(), primary_key=True),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("requested_by", sa.BigInteger(), nullable=False),
        sa.Column("decided_by", sa.BigInteger()),
        sa.Column("showcase_channel_id", sa.BigInteger()),
        sa.Column("showcase_message_id", sa.BigInteger()),
        sa.Column("approval_message_id", sa.BigInteger()),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_showcase_guild_state", "showcase_posts", ["guild_id", "state"])


def downgrade() -> None:
    """Nothing to go back to: the bot's data would be gone."""
    raise NotImplementedError("0001 is the first revision; there is no schema before it")
