import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: randomized fault injection over real bot processes (tests/chaos)"
    )
