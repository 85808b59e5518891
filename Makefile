# The README's two commands: `make sample` (run the job on samples/) and `make test`.
# Each sets up the project virtualenv first (.venv, pinned by constraints.txt) if needed.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# label-studio-sdk's brush decoder and config validation, and datumaro's COCO importer, for
# the tests, without their pins (opencv-python-headless would clash with opencv-python,
# datumaro pins an older pyarrow): the packages those import
NO_DEPS_TEST_TOOLS := label-studio-sdk lxml xmljson jsf faker rstr ijson pyjwt ujson appdirs nltk \
	datumaro cachetools imagesize json-stream json-stream-rs-tokenizer orjson ruamel.yaml

.PHONY: setup sample test test-fast lint

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(VENV)/bin/python -m pip install --quiet --no-deps -c constraints.txt $(NO_DEPS_TEST_TOOLS)
	touch $(STAMP)

sample: $(STAMP)
	bash scripts/sample.sh

# the whole suite, as CI runs it: lint and types first (seconds), then every test, in two
# pytest-xdist workers (a file at a time each, the longest files first: tests/conftest.py)
test: lint
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# the tests that start no Ray, for the edit-test loop
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not ray and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
