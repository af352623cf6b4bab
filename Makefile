# The front door: `make run` and `make test` work on a fresh clone with python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test demo bench clean

run: $(VENV)/.installed
	$(BIN)/python scm_token_cache.py run

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

demo: $(VENV)/.installed-test
	$(BIN)/python tests/fake_scm.py --demo

bench: $(VENV)/.installed-test
	$(BIN)/python bench/benchmark.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
