# Every target installs what it needs first (uv into .tools/, then the locked workspace into .venv/),
# so `make test` and `make demo` work on a fresh machine with Python 3.11+ and access to PyPI.
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV := .venv
STAMP := $(VENV)/.synced
MEMBERS := pyproject.toml uv.lock shared/spikecore/pyproject.toml $(wildcard packages/*/pyproject.toml)

.PHONY: install test demo bench lint format lock dist clean

$(UV):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version.split()[0]'
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# --locked: install exactly uv.lock, and fail (rather than re-resolve) if it no longer matches pyproject.
$(STAMP): $(UV) $(MEMBERS)
	$(UV) sync --locked --all-packages --group dev
	@touch $@

install: $(STAMP)

test: install
	$(VENV)/bin/python -m pytest

# spikecore's check and tiny transformer, then TDFormer trained on the embedded digits, tested and analysed.
TDFORMER_DEMO := packages/tdformer/configs/demo.yaml
TDFORMER_RUN := runs/tdformer-demo/latest/checkpoints/last.ckpt
SPILIFORMER_DEMO := packages/spiliformer/configs/demo.yaml
SPILIFORMER_RUN := runs/spiliformer-demo/latest/checkpoints/last.ckpt
demo: install
	$(VENV)/bin/python -m spikecore.demo
	rm -rf runs/tdformer-demo
	$(VENV)/bin/tdformer fit --config $(TDFORMER_DEMO)
	$(VENV)/bin/tdformer test --config $(TDFORMER_DEMO) --ckpt_path $(TDFORMER_RUN)
	$(VENV)/bin/tdformer analyze --config $(TDFORMER_DEMO) --ckpt_path $(TDFORMER_RUN) --split test
	rm -rf runs/spiliformer-demo
	$(VENV)/bin/spiliformer fit --config $(SPILIFORMER_DEMO)
	$(VENV)/bin/spiliformer test --config $(SPILIFORMER_DEMO) --ckpt_path $(SPILIFORMER_RUN)
	$(VENV)/bin/spiliformer analyze --config $(SPILIFORMER_DEMO) --ckpt_path $(SPILIFORMER_RUN) --split test
	rm -rf runs/sae-brainmap-demo
	$(VENV)/bin/sae-brainmap fit --config packages/sae-brainmap/configs/demo.yaml
	$(VENV)/bin/sae-brainmap run --config packages/sae-brainmap/configs/demo_run.yaml --out runs/sae-brainmap-demo/run
	$(VENV)/bin/sae-brainmap run --config packages/sae-brainmap/configs/demo_spiking.yaml --out runs/sae-brainmap-demo/spiking
	@echo "sae-brainmap reports: runs/sae-brainmap-demo/run/report.md, runs/sae-brainmap-demo/spiking/report.md"

bench: install
	$(VENV)/bin/python benchmarks/run_all.py

# Release wheels and sdists in dist/: the packages require spikecore by name and version (not by a path).
dist: $(UV)
	$(VENV)/bin/python scripts/build_release.py --out dist

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lock: $(UV)
	$(UV) lock

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
