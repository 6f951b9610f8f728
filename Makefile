# The two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup test lint demo bench clean

setup: $(STAMP) $(FMNIST)/t10k-images-idx3-ubyte.gz
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = "0" ]; then export DEBIAN_FRONTEND=noninteractive; (apt-get install -y -qq chromium || (apt-get update -qq && apt-get install -y -qq chromium)); else echo "warning: chromium missing (the report's screenshot test is skipped); run 'sudo apt-get install -y chromium'"; fi; }

$(FMNIST)/t10k-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = "0" ]; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	else echo "warning: Fashion-MNIST missing; run 'sudo apt-get install -y dataset-fashion-mnist'"; fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check catalog model worker migrations tests bench

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: setup
	$(BIN)/python -m worker.ops.demo

bench: setup
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .styletag
