# compbias: `make demo` and `make test` each set everything up first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba
export MPLBACKEND ?= Agg

.PHONY: install demo test test-avx2 test-gpu bench clean

install: $(STAMP)

# pyproject.toml has the supported ranges; constraints.txt pins the tested torch pair.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The default study (configs/digits.yaml) and its audit as MLflow project runs,
# tracked in $MLFLOW_TRACKING_URI when set, else in ./mlflow.db with artifacts
# in ./mlartifacts. Running it again resumes the study (nothing is retrained).
demo: install
	@set -e; export PATH="$(CURDIR)/$(BIN):$$PATH"; \
	if [ -z "$$MLFLOW_TRACKING_URI" ]; then \
	  export MLFLOW_TRACKING_URI="sqlite:///$(CURDIR)/mlflow.db"; \
	  export COMPBIAS_ARTIFACT_ROOT="$(CURDIR)/mlartifacts"; \
	fi; \
	echo "compbias demo: study configs/digits.yaml, tracking at $$MLFLOW_TRACKING_URI"; \
	start=$$(date +%s); \
	$(BIN)/mlflow run mlproject -e study --env-manager local -P config=configs/digits.yaml; \
	$(BIN)/mlflow run mlproject -e audit --env-manager local -P study=digits; \
	echo "compbias demo: finished in $$(( $$(date +%s) - start ))s"; \
	case "$$MLFLOW_TRACKING_URI" in \
	  sqlite:*) echo "Open the MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then http://127.0.0.1:5000)";; \
	  *) echo "Results are in the tracking server at $$MLFLOW_TRACKING_URI";; \
	esac

test: install
	$(BIN)/python -m pytest

# The suite with the CPU held to AVX2 (torch, fbgemm, oneDNN, numpy, OpenBLAS,
# numba): on an AVX-512 machine, the code paths an AVX2-only CPU takes
# (devtools/avx2.py; docs/reliability.md).
test-avx2: install
	$(BIN)/python -m devtools.avx2 -m pytest

# The suite with CUDA required: the jobs tests train and evaluate on the GPU
# (COMPBIAS_TEST_DEVICE=cuda, read by tests/jobs/devices.py). Without CUDA it
# stops at once with that message instead of passing on the CPU.
test-gpu: install
	@$(BIN)/python -c "import sys, torch; torch.cuda.is_available() or sys.exit('make test-gpu: torch ' + torch.__version__ + ' sees no CUDA device; run it on a GPU machine (make test runs the suite on the CPU)')"
	COMPBIAS_TEST_DEVICE=cuda $(BIN)/python -m pytest

# Speed benchmarks: each prints ratios against a named baseline run in the same
# process (see docs/performance.md). The scale-out one starts its own servers and
# a two-node Ray cluster: `$(BIN)/python benchmarks/scaleout.py`.
bench: install
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/study.py
	$(BIN)/python benchmarks/audit.py
	$(BIN)/python benchmarks/quantize.py

clean:
	rm -rf $(VENV) .cache mlruns mlartifacts mlflow.db
