# Two entry points on a fresh machine: `make demo` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# PyTorch + torchvision builds that match each other (transformers 5's Qwen-VL processors need torchvision).
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install browser demo test test-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,qlora]"
	# donut-python's evaluator is the reference the Donut protocol is tested against; its model deps are not needed
	$(PY) -m pip install -q --no-deps "donut-python==1.0.9"
	touch $@

demo: install
	$(VENV)/bin/qwenvl-tune demo

# Browser tests drive Debian's Chromium through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core) \
	  || echo "warning: could not install Debian's chromium; browser tests will be skipped" >&2; }

# pytest exits 5 when it collects no test; that is a failure of the suite, reported as such.
test: install browser
	$(PY) -m pytest -q -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# On a GPU machine: the GPU-marked tests only.
test-gpu: install
	$(PY) -m pytest -q -ra -m gpu $(PYTEST_ARGS)

clean:
	rm -rf demo_output .pytest_cache
