# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup setup-test setup-rl-peer run test clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[test,aot]"
	$(PIP) install -q --no-deps --ignore-requires-python gpt-oss==0.0.9
	touch $@

$(VENV)/.rl-peer: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[rl-peer]"
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test
setup-rl-peer: $(VENV)/.rl-peer  # TRL, for scripts/rl_experiment.py

# glibc's malloc backs XLA's large host buffers with huge pages (see gptoss_jax/host.py)
HUGE_PAGES := GLIBC_TUNABLES=$(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):)glibc.malloc.hugetlb=1

run: setup
	$(HUGE_PAGES) $(PY) -m gptoss_jax.cli quickstart

# Two workers, one test file each at a time (a file's tests share its compiled programs): ~20-22 min for
# 971 tests on the 2-core development machine, compiled at -O0 (tests/conftest.py; 25-29 min at the
# default -O2). A third worker made it slower: 30 min.
TEST_WORKERS ?= 2

test: setup-test
	$(PY) -m ruff check
	$(PY) -m ruff format --check
	$(HUGE_PAGES) $(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs
