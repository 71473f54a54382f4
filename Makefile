# The two commands of the README: `make test` and `make bench`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench bench-ops install clean

install: $(STAMP)

# The extension is rebuilt (incrementally, by ninja) whenever a kernel source changes.
$(STAMP): pyproject.toml setup.py constraints-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints-dev.txt torch triton timm ninja
	$(PY) -m pip install -q -c constraints-dev.txt --no-build-isolation -e ".[test,plot]"
	@echo "extension build configuration (vapt_kernels/_build_info.json):"; cat vapt_kernels/_build_info.json
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/vapt-bench --out $(CURDIR)/benchmarks/results $(BENCH_ARGS)

bench-ops: $(STAMP)
	$(PY) benchmarks/bench_ops.py $(BENCH_OPS_ARGS)
	$(PY) -m pytest benchmarks/test_bench_model.py -q --benchmark-only --benchmark-columns=median,iqr,ops

clean:
	rm -rf $(VENV) build *.egg-info
