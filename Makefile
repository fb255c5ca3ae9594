# Kontext Bot. `make run` runs the bot, `make test` runs every test; each first creates the
# virtualenv (.venv) and installs what is missing. Only Python 3.11+ and make are needed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run sync test lint demo bench chaos audit clean

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "Kontext Bot needs Python 3.11 or newer; $(VENV) has $$($(PY) --version)."; \
	  echo "Try: make clean; make $(MAKECMDGOALS) PYTHON=python3.12"; exit 2; }
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $(STAMP)

run: $(STAMP)
	$(PY) bot.py

sync: $(STAMP)
	$(PY) bot.py sync

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

demo: $(STAMP)
	$(PY) -m devtools.demo

bench: $(STAMP)
	$(PY) -m bench

# randomized fault injection over real bot processes: SEEDS seeds on Postgres and SQLite; prints
# jobs, faults injected and violations per seed (and the schedule of a failing one)
SEEDS ?= 10
chaos: $(STAMP)
	$(PY) -m tests.chaos --seeds $(SEEDS) $(CHAOS_ARGS)

audit: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check pip-audit==2.10.1
	$(VENV)/bin/pip-audit --strict -r requirements.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache demo-output
