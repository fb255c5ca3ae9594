"""Benchmarks of the Kontext bot on loopback, against the project's emulators.

``make bench`` (``python -m bench``) runs every section and prints one table (target, measured,
pass/fail per row); the table is also written to ``bench/results/latest.md``. ``bench/RESULTS.md``
is a committed copy of a full run with the machine it ran on.

Layout:

* :mod:`bench.common` — statistics, sized images, the event-loop lag sampler, machine facts;
* :mod:`bench.world` — both emulators (with result timestamps) and a bot run as a subprocess;
* :mod:`bench.botproc` — the subprocess entry point: the real bot (or the baseline) plus a lag
  sampler inside its event loop;
* :mod:`bench.baseline_blocking` — THE ANTI-PATTERN BASELINE: the seed sample's blocking HTTP
  call inside a cog, for comparison only; the bot never imports it;
* :mod:`bench.ledger` — reserve + commit pairs per second on SQLite and Postgres;
* :mod:`bench.transactions` — the database transactions one job costs, counted by Postgres;
* :mod:`bench.scenarios` — the measured scenarios and the table;
* :mod:`bench.diagnose` — where the queue's time goes (the bot's own timestamps, no targets).
"""
