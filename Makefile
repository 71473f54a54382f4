# The two commands of the README: `make test` and `make bench`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints-dev.txt torch triton timm
	$(PY) -m pip install -q -c constraints-dev.txt --no-build-isolation -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_step_ratio.py

clean:
	rm -rf $(VENV) build *.egg-info
