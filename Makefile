PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint clean

$(BIN)/graphopt: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.bench: $(BIN)/graphopt requirements-bench.txt
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	touch $@

demo: $(BIN)/graphopt
	$(BIN)/graphopt demo

test: $(BIN)/graphopt
	$(BIN)/python -m pytest -q -n 2 tests

lint: $(BIN)/graphopt
	$(BIN)/ruff check graphopt passes models tests bench

bench: $(VENV)/.bench
	$(BIN)/python bench/run_all.py

.PHONY: corpus
corpus: $(VENV)/.bench
	$(BIN)/python bench/bench_corpus.py

clean:
	rm -rf $(VENV) .cache
