# compbias: `make demo` and `make test` each set everything up first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba
export MPLBACKEND ?= Agg

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/python -c "import compbias; print('compbias', compbias.__version__)"

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/metrics.py

clean:
	rm -rf $(VENV) .cache mlruns mlflow.db
