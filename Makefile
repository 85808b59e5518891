# The README's two commands: `make sample` (run the job on samples/) and `make test`.
# Each sets up the project virtualenv first (.venv, pinned by constraints.txt) if needed.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup sample test

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

sample: $(STAMP)
	bash scripts/sample.sh

test: $(STAMP)
	$(VENV)/bin/python -m pytest
