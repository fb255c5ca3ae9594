"""A CHECK constraint on ``showcase_posts.state`` (the values of ``vocab.ShowcaseState``).

SQLite cannot add a constraint to a table: batch mode rebuilds ``showcase_posts`` (copy, drop,
rename), keeping its rows and index; Postgres gets a plain ``ALTER TABLE … ADD CONSTRAINT``. A
row with any other state makes the upgrade fail and roll back as a whole.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``ck_showcase_posts_state``."""
    with op.batch_alter_table("showcase_posts") as batch:
        batch.create_check_constraint(
            "ck_showcase_posts_state", "state IN ('pending', 'posted', 'rejected', 'removed')"
        )


def downgrade() -> None:
    """Drop ``ck_showcase_posts_state``."""
    with op.batch_alter_table("showcase_posts") as batch:
        batch.drop_constraint("ck_showcase_posts_state", type_="check")
