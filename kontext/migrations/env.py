"""Alembic's environment for the bot: it runs on the connection :mod:`kontext.schema` hands it.

There is no ``alembic.ini``: :func:`kontext.schema.alembic_config` builds the configuration in
code and puts an open connection, inside the transaction that holds the migration lock, in
``config.attributes["connection"]``. Every revision then runs in that one transaction (DDL is
transactional on both engines), so an upgrade is applied whole or not at all. SQLite gets
``render_as_batch``: a change SQLite's ``ALTER TABLE`` cannot make rebuilds the table (copy,
drop, rename) with its rows, indexes and named constraints.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from kontext.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run the migrations through kontext.schema (upgrade / run_migrations)")

context.configure(
    connection=connection,
    target_metadata=metadata,  # for autogenerate's comparison only: revisions never import it
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    compare_server_default=True,
    on_version_apply=config.attributes.get("on_version_apply"),
)
with context.begin_transaction():  # the caller's transaction: no new one is begun
    context.run_migrations()
