"""The schema's Alembic migrations: ``env.py``, ``versions/`` (one file per revision) and
:mod:`kontext.migrations.legacy` (the bridge from the runner before Alembic). Run them through
:func:`kontext.schema.run_migrations` or :func:`kontext.schema.upgrade`."""
