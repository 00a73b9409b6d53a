# The two commands of the quick start are `make serve` and `make test`; the rest are their steps.
SHELL := /bin/bash
# The demo model family: smol (a real model, deploy/demo.yaml) or tiny (random weights, fast, deploy/tiny.yaml).
FAMILY ?= smol
CONFIG ?= deploy/$(if $(filter tiny,$(FAMILY)),tiny,demo).yaml

.PHONY: install install-quant models serve test test-tools lint dashboards clean

install:  ## the serving environment (.venv): vLLM CPU build, Ray Serve, this package
	@scripts/install.sh serving

install-quant:  ## the quantization environment (.venv-quant): llmcompressor
	@scripts/install.sh quant

models: install install-quant  ## build the demo model family (FAMILY=smol|tiny) if it is missing or stale
	@.venv/bin/serving models build --family $(FAMILY)

serve: models  ## serve the demo stack at http://127.0.0.1:8000/v1 until Ctrl-C (or: make serve FAMILY=tiny)
	@.venv/bin/serving serve --config $(CONFIG)

test: install install-quant test-tools  ## lint, type checks and the whole test suite
	@scripts/test.sh

test-tools:  ## the real Prometheus server and promtool that the observability tests use
	@scripts/install-test-tools.sh

dashboards: install  ## regenerate the Grafana dashboards in deploy/grafana/ from serving/dashboards/
	@.venv/bin/python -m serving.dashboards

lint: install
	@.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

clean:  ## remove both environments and the built models
	rm -rf .venv .venv-quant models
