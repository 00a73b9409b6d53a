# The two commands of the quick start are `make serve` and `make test`; the rest are their steps.
SHELL := /bin/bash
MODELS ?= models/demo

.PHONY: install install-quant models serve test test-tools lint clean

install:  ## the serving environment (.venv): vLLM CPU build, Ray Serve, this package
	@scripts/install.sh serving

install-quant:  ## the quantization environment (.venv-quant): llmcompressor
	@scripts/install.sh quant

models: install install-quant  ## build the demo model family if it is missing or stale
	@.venv/bin/serving models build --out $(MODELS)

serve: models  ## serve the demo stack at http://127.0.0.1:8000/v1 until Ctrl-C
	@.venv/bin/serving serve --config deploy/demo.yaml

test: install install-quant test-tools  ## lint, type checks and the whole test suite
	@scripts/test.sh

test-tools:  ## the real Prometheus server and promtool that the observability tests use
	@scripts/install-test-tools.sh

lint: install
	@.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

clean:  ## remove both environments and the built models
	rm -rf .venv .venv-quant models
