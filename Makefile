# evomerge developer commands. `make demo` runs the main job, `make test` the test suite;
# both create the virtual environment on first use (local torch 2.13.0 CPU build, pinned set).
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo lint test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0 -c constraints.txt
	$(VENV)/bin/pip install -q -e '.[test]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/evomerge demo search

# The suite starts with the linter and the formatter check (pinned ruff, settings in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) demo_models runs .pytest_cache
