# The two set-up commands of the README:  make demo  (main job)  and  make test  (tests).
# Both create .venv in the checkout on first use and are idempotent afterwards.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bnlab-installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test test-slow bench check browser clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev,serve,onnx,keras,tensorboard,ray]'
	touch $(STAMP)

# the report test drives a real headless Chromium (Debian's package; playwright cannot download one here)
browser:
	@test -x $(CHROMIUM) || { echo "installing chromium for the report test"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

demo: $(STAMP)
	$(BIN)/bnlab run demo

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -m slow

check: $(STAMP)
	$(BIN)/bnlab check

bench: $(STAMP)
	$(BIN)/python benchmarks/bn_layer_speed.py
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
