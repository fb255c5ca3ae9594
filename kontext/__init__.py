"""Kontext Bot's discord-free core: settings, errors, images, the Segmind client, storage,
the credits ledger, the job queue and the job pipeline.

Nothing in this package imports discord; the Discord adapter lives in ``cogs/`` and ``bot.py``.
"""

__version__ = "0.1.0"
