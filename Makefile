# Two commands from nothing (Python 3.11 + make):  `make run`  and  `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK := 1          # kedro-telemetry: never phone home
export KEDRO_DISABLE_TELEMETRY := 1

.PHONY: install run test smoke viz mlflow-ui benchmarks clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

## Fresh environment + the main job (ingestion -> preprocessing -> 4 models -> evaluation) on the phantoms
run: install
	$(BIN)/kedro run --pipelines=train

## Fresh environment + the whole test suite
test: install
	$(BIN)/python -m pytest

smoke: install
	$(BIN)/kedro run --pipelines=train --env smoke

viz: install
	$(BIN)/kedro viz run --no-browser --host 127.0.0.1 --port 4141

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

benchmarks: install
	$(BIN)/python benchmarks/preprocessing_benchmark.py
	$(BIN)/python benchmarks/loader_benchmark.py
	$(BIN)/python benchmarks/inference_benchmark.py

clean:
	rm -rf $(VENV)
