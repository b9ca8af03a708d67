# torch==2.13.0 is installed first: it is the CPU wheel on these machines, while an
# unpinned torch would pull a multi-GB CUDA build. Every install is constrained by
# constraints.txt (the lock), so CI and a fresh machine get the same versions.
VENV := .venv
PY := $(VENV)/bin/python
FLOOR := .venv-floor
COMPAT := .venv-compat
LMMS := .venv-lmms
export HF_HUB_OFFLINE := 1

.PHONY: setup eval demo test test-floor compat lmms

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

eval: setup
	$(VENV)/bin/vtprune eval

demo: setup
	$(VENV)/bin/vtprune demo

test: setup
	$(PY) -m pytest -q

# The oldest supported transformers (5.17.0), locked in constraints-floor.txt.
$(FLOOR)/.installed: pyproject.toml constraints-floor.txt
	test -x $(FLOOR)/bin/python || python3 -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q -c constraints-floor.txt torch==2.13.0
	$(FLOOR)/bin/python -m pip install -q -c constraints-floor.txt -e '.[dev]'
	touch $@

test-floor: $(FLOOR)/.installed
	$(FLOOR)/bin/python -m pytest -q

# The newest transformers on PyPI, whatever the cap says, in a scratch environment:
# prints what breaks. Not part of CI; run it before starting a change, and raise the
# cap (pyproject.toml, engine/compat.py, constraints.txt) when it passes.
compat:
	rm -rf $(COMPAT) && python3 -m venv $(COMPAT)
	grep -v '^transformers==' constraints.txt > $(COMPAT)/constraints.txt
	$(COMPAT)/bin/python -m pip install -q -c $(COMPAT)/constraints.txt torch==2.13.0
	$(COMPAT)/bin/python -m pip install -q -c $(COMPAT)/constraints.txt -e '.[dev]'
	@# pip then warns that vtprune's cap excludes this release: that is the point
	$(COMPAT)/bin/python -m pip install -q --upgrade transformers
	@echo "== vtprune's suite on transformers $$($(COMPAT)/bin/python -c 'import transformers; print(transformers.__version__)') (the newest on PyPI)"
	$(COMPAT)/bin/python -m pytest -q -rfE -p no:cacheprovider

# The lmms-eval plugin (`lmms-eval --model vtprune`) in its own environment: lmms-eval needs
# torchvision, which here means torch==2.14.1 (a CUDA build) instead of the core's 2.13.0 CPU
# wheel, so it stays out of .venv. Runs the tests of the generation the plugin answers with and
# the plugin's own, end to end included (a tiny LLaVA saved to disk, a local POPE-shaped task,
# lmms-eval's command line, batch size 2): -s shows lmms-eval's command and results table.
$(LMMS)/.installed: pyproject.toml constraints.txt
	test -x $(LMMS)/bin/python || python3 -m venv $(LMMS)
	@# the lock less four pins lmms-eval 0.7.3 cannot take: torch (next line), filelock (it imports
	@# filelock._api, gone in 4.x), python-dateutil (its results table's typepy needs < 3; else pip
	@# falls back to a pytablewriter that prints the table's header as A B C ...), av (it needs < 16)
	grep -v -e '^torch==' -e '^filelock==' -e '^python-dateutil==' -e '^av==' constraints.txt > $(LMMS)/constraints.txt
	printf 'filelock<4\npython-dateutil<3\n' >> $(LMMS)/constraints.txt
	$(LMMS)/bin/python -m pip install -q -c $(LMMS)/constraints.txt torch==2.14.1 torchvision==0.29.1
	$(LMMS)/bin/python -m pip install -q -c $(LMMS)/constraints.txt -e '.[lmms,dev]'
	touch $@

lmms: $(LMMS)/.installed
	$(LMMS)/bin/python -m pytest -q -s -p no:cacheprovider tests/test_generation.py tests/test_lmms_plugin.py
