# Two set-up commands: `make demo` and `make test` (README.md).  Everything else is a building block.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints-cpu.txt
# The demo model folder: set TTS_MODEL_DIR to a folder with real weights to hear real speech.
TTS_MODEL_DIR ?=
DEMO_DIR ?= .cache/demo-turbo
PROTO_SRC := $(shell find protos -name '*.proto' 2>/dev/null)

.PHONY: install install-dev protos demo test test-fast lint clean

## install: runtime environment in $(VENV) (CPU torch, grpc, OpenTelemetry) + generated protobuf code
install: $(VENV)/.runtime protos

$(VENV)/.runtime: pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e . grpcio-tools --config-settings editable_mode=compat
	touch $@

## install-dev: + test tools and the upstream oracle (tests/upstream/README.md)
install-dev: install $(VENV)/.dev

$(VENV)/.dev: $(VENV)/.runtime tests/upstream/requirements.txt tests/upstream/requirements-nodeps.txt
	$(PIP) -e '.[dev]' --config-settings editable_mode=compat
	$(PIP) -r tests/upstream/requirements.txt
	$(PIP) --no-deps -r tests/upstream/requirements-nodeps.txt
	touch $@

## protos: generate Python code from protos/ into tts_api/ (git-ignored; never edited)
protos: tts_api/.stamp

tts_api/.stamp: $(PROTO_SRC) $(VENV)/.runtime
	rm -rf tts_api && mkdir -p tts_api
	$(if $(PROTO_SRC),$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_SRC))
	find tts_api -type d -exec touch {}/__init__.py \;
	touch $@

## demo: fresh machine -> install, demo checkpoint if none configured, both services, one WAV
demo: install
	TTS_MODEL_DIR="$(TTS_MODEL_DIR)" DEMO_DIR="$(DEMO_DIR)" $(PY) -m tts_client.demo

## test: the whole suite (CPU; tiny configs plus full-size parity checks against upstream)
test: install-dev
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) tts_api .cache .pytest_cache
