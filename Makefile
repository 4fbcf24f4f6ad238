# Two commands from nothing (Python 3.11 + make):  `make run`  and  `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK := 1          # kedro-telemetry: never phone home
export KEDRO_DISABLE_TELEMETRY := 1

.PHONY: install install-gpu run test test-fast smoke study viz mlflow-ui mlflow-server postgres postgres-stop benchmarks clean

## The CPU default: Keras on TensorFlow (`tf` extra) and the test tools
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[tf,test]"
	touch $@

install: $(VENV)/.installed

## An NVIDIA GPU (driver for CUDA 12): JAX with CUDA (`gpu` extra) and the test tools, no TensorFlow.
## runtime.keras_backend: auto then trains on JAX on the GPU. Then `$(BIN)/kedro run ...` (not `make run`,
## which would add TensorFlow for the CPU default).
$(VENV)/.installed-gpu: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[gpu,test]"
	touch $@

install-gpu: $(VENV)/.installed-gpu

## Fresh environment + the main job (ingestion -> preprocessing -> 4 models -> evaluation) on the phantoms
run: install
	$(BIN)/kedro run --pipelines=train

## Fresh environment + the whole test suite
test: install
	$(BIN)/python -m pytest

## Fresh environment + the fast tier (about 2 min on 2 cores): every test marked neither `slow`
## nor `subprocess`, all inside the one pytest process, so no training runs in a child process.
## Each test gets 60 s here (pyproject's `timeout` is for the full suite).
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not subprocess" --timeout=60

smoke: install
	$(BIN)/kedro run --pipelines=train --env smoke

## The whole study on more phantoms (conf/study, docs/study.md): the cascade cross-validated on jittered
## true crops (kept for the comparison), then `cv` (every model, 3 folds, out-of-fold crops, paired
## tests, champion), the crop-source comparison, and `tune` (Optuna importances). Replaces data/'s models.
study: install
	$(BIN)/kedro run --env study --pipelines=cv_cascade --params cascade.stage2.crop_source=jittered_truth
	rm -rf data/08_reporting/study/cascade_jittered_truth && mkdir -p data/08_reporting/study
	cp -r data/08_reporting/cv/cascade data/08_reporting/study/cascade_jittered_truth
	$(BIN)/kedro run --env study --pipelines=cv
	$(BIN)/python -m benchmarks.crop_sources
	$(BIN)/kedro run --env study --pipelines=tune

viz: install
	$(BIN)/kedro viz run --no-browser --host 127.0.0.1 --port 4141

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

## A lab's tracking server (docs/team.md): mlflow server on PostgreSQL, artifacts proxied from one shared
## folder, bound to 127.0.0.1. Set MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://<user>@<host>:<port>/mlflow,
## MLFLOW_ARTIFACTS_DESTINATION=<shared folder> and PGPASSWORD (never in the URI).
MLFLOW_SERVER_PORT ?= 5000
mlflow-server: install
	$(BIN)/python -m pancreas_seg.tracking.server --port $(MLFLOW_SERVER_PORT)

## A lab's own PostgreSQL in PG_ROOT (initdb on first use, then pg_ctl start on 127.0.0.1; prints the URLs
## and the PG* variables): `make postgres PG_ROOT=/srv/pancreas_seg/pg`, `make postgres-stop PG_ROOT=...`
postgres: install
	$(BIN)/python -m pancreas_seg.tracking.postgres start --root $(PG_ROOT) $(if $(PG_PORT),--port $(PG_PORT))
postgres-stop: install
	$(BIN)/python -m pancreas_seg.tracking.postgres stop --root $(PG_ROOT)

## The benchmarks are modules of the dev-only `benchmarks` package: run from the repository root
benchmarks: install
	$(BIN)/python -m benchmarks.preprocessing_benchmark
	$(BIN)/python -m benchmarks.loader_benchmark
	$(BIN)/python -m benchmarks.inference_benchmark

clean:
	rm -rf $(VENV)
