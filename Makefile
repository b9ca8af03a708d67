# torch==2.13.0 is installed first: it is the CPU wheel on these machines, while an
# unpinned torch would pull a multi-GB CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup eval demo test

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

eval: setup
	$(VENV)/bin/vtprune eval

demo: setup
	$(VENV)/bin/vtprune demo

test: setup
	$(PY) -m pytest -q
