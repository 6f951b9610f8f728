# The two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
# The one torch pin: `make setup` installs it, the Dockerfile's TORCH_SPEC repeats it (tests/ops/test_compose.py).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test-deps test lint demo bench clean

# What the demo and the package need: the virtual environment and Fashion-MNIST. Nothing else.
setup: $(STAMP) $(FMNIST)/t10k-images-idx3-ubyte.gz

# What only the tests need on top: a browser for the report's screenshot test (as root, when missing;
# without its recommended desktop services, with the one font it renders text with).
test-deps: setup
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = "0" ]; then export DEBIAN_FRONTEND=noninteractive; (apt-get install -y -qq --no-install-recommends chromium fonts-liberation || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation)); else echo "warning: chromium missing (the report's screenshot test is skipped); run 'sudo apt-get install -y --no-install-recommends chromium fonts-liberation'"; fi; }

$(FMNIST)/t10k-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = "0" ]; then \
		(apt-get install -y -qq --no-install-recommends dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist)); \
	else echo "warning: Fashion-MNIST missing; run 'sudo apt-get install -y --no-install-recommends dataset-fashion-mnist'"; fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check catalog model worker migrations tests bench

test: test-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: setup
	$(BIN)/python -m worker.ops.demo

# simplejpeg only for bench.photo's decoder comparison (the pipeline decodes with PIL)
bench: setup
	$(BIN)/pip install -q simplejpeg || echo "warning: simplejpeg not installed; bench.photo skips its row"
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .styletag
