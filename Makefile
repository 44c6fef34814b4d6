# na_rtc developer commands. From a fresh clone:
#   make demo    set up .venv, run the demo, write na_rtc_demo.png
#   make test    set up .venv, run the test suite
#
# Settings (override on the command line or in the environment):
#   PYTHON            interpreter that creates .venv              (python3)
#   PYTEST_ARGS       extra pytest arguments, e.g. PYTEST_ARGS="-k na1d -x"
#   NA_RTC_SKIP_TORCH=1   do not install torch into .venv
#   TORCH_SPEC        the torch requirement installed first        (torch==2.13.0)
#   TORCH_PIP_ARGS    extra pip arguments for that install, e.g. an index URL
#                     that serves CPU-only torch wheels on a machine where
#                     plain PyPI would pick the large CUDA build
#   DIST              where `make wheel` writes the wheel          (dist)

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.na_rtc-setup-stamp
NVRTC_STAMP := $(VENV)/.na_rtc-nvrtc-stamp
EXAMPLES_STAMP := $(VENV)/.na_rtc-examples-stamp
BUILD_STAMP := $(VENV)/.na_rtc-build-stamp
PYTEST_ARGS ?=
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
NA_RTC_SKIP_TORCH ?=
DIST ?= dist
GPU_PYTHON ?= python3
RESULTS ?= benchmarks/results

.DEFAULT_GOAL := help
.PHONY: help venv venv-nvrtc venv-examples demo test docs wheel clean distclean gpu-check check-all

help:
	@echo "make demo       set up $(VENV) (once), run 1D/2D/3D NA forward+backward, check it, write na_rtc_demo.png"
	@echo "make test       set up $(VENV) (once), run the test suite (PYTEST_ARGS=... passes arguments to pytest);"
	@echo "                tests that need NVRTC or scikit-learn skip until make venv-nvrtc / venv-examples"
	@echo "make docs       build the documentation site (docs/, mkdocs.yml) into site/ with mkdocs build --strict"
	@echo "make wheel      build the wheel into $(DIST)/"
	@echo "make gpu-check  on a GPU machine, with its own python (no .venv, no network): GPU self-tests,"
	@echo "                gpu-marked tests, quick benchmark; JSON into RESULTS=$(RESULTS)"
	@echo "make check-all  compile every kernel for one GPU of each class it may run on (sm_75 ... sm_120) and"
	@echo "                check spills, registers and shared memory (CI checks sm_80, sm_90 and one more a run)"
	@echo "make venv       only set up $(VENV): torch (CPU, unless NA_RTC_SKIP_TORCH=1), then na_rtc editable with [tests,docs]"
	@echo "make venv-nvrtc     add NVRTC to $(VENV) ([nvrtc]: check, precompile and the tests that compile with NVRTC)"
	@echo "make venv-examples  add the examples' packages to $(VENV) ([examples]: scikit-learn, tqdm for examples/nat_digits.py)"
	@echo "make clean      remove build outputs and caches (keeps $(VENV))"
	@echo "make distclean  clean, and remove $(VENV) too"

# Set up once; redone only when pyproject.toml changes (the install is
# editable, so code changes need no reinstall). Torch goes in first, pinned,
# so that the [tests,docs] install never pulls a different torch build. Only what
# the tests, the demo and make docs use goes in here (the docs tools are small, pure Python); NVRTC, the examples' packages and
# the wheel builder are added by the targets that use them (below).
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	@if [ "$(NA_RTC_SKIP_TORCH)" = "1" ]; then \
		echo "NA_RTC_SKIP_TORCH=1: not installing torch"; \
	else \
		echo "$(VPY) -m pip install $(TORCH_PIP_ARGS) $(TORCH_SPEC)"; \
		$(VPY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; \
	fi
	$(VPY) -m pip install -e ".[tests,docs]"
	touch $@

$(NVRTC_STAMP): $(STAMP)
	$(VPY) -m pip install -e ".[nvrtc]"
	touch $@

$(EXAMPLES_STAMP): $(STAMP)
	$(VPY) -m pip install -e ".[examples]"
	touch $@

$(BUILD_STAMP): $(STAMP)
	$(VPY) -m pip install build
	touch $@

venv: $(STAMP)
venv-nvrtc: $(NVRTC_STAMP)
venv-examples: $(EXAMPLES_STAMP)

demo: $(STAMP)
	$(VPY) -m na_rtc demo

test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# The documentation site: docs/*.md and the API reference from the docstrings (mkdocstrings reads the
# sources statically), built offline into site/. --strict: a broken link or reference fails the build.
docs: $(STAMP)
	$(VPY) -m mkdocs build --strict -f mkdocs.yml

# Deliberately not on the .venv: GPU machines have no network, so this runs
# the checkout with the python that is there (torch, cupy, NVRTC installed).
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m na_rtc.gpu_check --results $(RESULTS)

# The benchmark harness on the .venv (CPU machines: the quick preset on the
# emulator; GPU machines: any preset). BENCH_ARGS="--preset targets --plot",
# "--resume FILE", "--readme-table FILE", ...; python -m na_rtc bench --help.
BENCH_ARGS ?= --preset quick --plot
.PHONY: bench
bench: $(STAMP)
	$(VPY) -m na_rtc bench $(BENCH_ARGS)

# Every kernel family compiled with NVRTC (no GPU needed) for one architecture of each class of GPU it
# may run on (na_rtc/runtime/archs.py CLASSES: sm_75, sm_80, sm_86, sm_90, sm_100, sm_120) and checked:
# no spills, registers and shared memory fit the largest launch. CI checks sm_80 and sm_90 on every run
# and one more class by rotation; this is the whole product. CHECK_JOBS compiles at once.
CHECK_JOBS ?= 2
check-all: $(NVRTC_STAMP)
	$(VPY) -m na_rtc check --arch classes --jobs $(CHECK_JOBS)

wheel: $(BUILD_STAMP)
	$(VPY) -m build --wheel --outdir $(DIST) .

clean:
	rm -rf build site $(DIST) *.egg-info .pytest_cache .hypothesis na_rtc_demo.png nat_digits_*.png
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
