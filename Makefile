# The two set-up commands of the README:  make demo  (main job)  and  make test  (tests).
# Both create .venv in the checkout on first use and are idempotent afterwards.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bnlab-installed

.PHONY: demo test test-slow bench check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bnlab check

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bn_layer_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
