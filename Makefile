# OncoFed's two commands:  `make run` (set up + quickstart)  and  `make test` (set up + tests).
# Set-up makes .venv once: the CPU build of torch first (a wheel on this machine's disk; a bare
# `torch` requirement could pull a multi-GB CUDA build), then OncoFed with its test extras.

PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.oncofed-installed
TORCH  ?= torch==2.13.0

.PHONY: run test setup clean docs

run: $(STAMP)
	$(VENV)/bin/fl run configs/quickstart.toml

# three workers (pytest-xdist), each taking whole modules so a module's shared dataset or deployment
# is built once, in collection order, i.e. longest modules first (tests/conftest.py; xdist's own
# reordering by the number of tests per module would start the long few-test modules last). On
# CI's two cores two workers kept the cores busy only about half the time (the tests wait on the
# processes they start: engines, SuperLinks, SuperNodes); a third fills the gaps
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 3 --dist loadfile --no-loadscope-reorder

setup: $(STAMP)

# The documentation site: regenerate docs/reference/cli.md and config.md from the code, then build
# site/ with MkDocs Material (--strict: a broken link or anchor fails the build).
docs: $(STAMP)
	$(VENV)/bin/python -m fl.cli.reference --write
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) data runs
