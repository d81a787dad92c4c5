# Two commands do all the set-up on a fresh machine (Python 3.11+ and make):
#   make demo   stream a completion through the gateway to the built-in fake provider
#   make test   lint, format check, types and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint types unit bench serve fake-provider clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/gateway demo

test: lint types unit

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/pytest -q

bench: $(VENV)/.installed
	$(BIN)/gateway bench --markdown

serve: $(VENV)/.installed
	$(BIN)/gateway serve --config config/demo.yaml

fake-provider: $(VENV)/.installed
	$(BIN)/gateway fake-provider

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
