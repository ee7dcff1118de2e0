# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
# Test files are spread over two workers (one per core of the CI machine); a file's
# tests stay together so its module-scoped compiled functions are shared.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install test demo lint clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check colt5_flax tests scripts
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m colt5_flax.demo $(DEMO_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check colt5_flax tests scripts

clean:
	rm -rf $(VENV) runs
