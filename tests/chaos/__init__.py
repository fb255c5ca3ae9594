"""Randomized fault injection: real bot processes, seeded fault schedules, invariants checked
afterwards. ``python -m tests.chaos --seeds N`` (``make chaos SEEDS=N``) runs many seeds;
``tests/chaos/test_chaos.py`` runs a few as part of the test suite."""
