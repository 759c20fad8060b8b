# deftkit make targets. `make demo` and `make test` each create the environment they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
DEVICE_VENV ?= .venv-device
PIP_FLAGS ?= -q --disable-pip-version-check
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install install-device demo test test-fast test-device bench lint clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt torch==2.13.0
	$(VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e ".[test]"
	touch $@

# A device-only environment: the `device` extra and pytest, no torch / transformers / peft.
install-device: $(DEVICE_VENV)/.installed
$(DEVICE_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e ".[device]" pytest pytest-timeout
	touch $@

demo: install
	$(VENV)/bin/deft demo

test: install install-device
	$(VENV)/bin/python -m pytest tests -q
	DEFT_DEVICE_ONLY=1 $(DEVICE_VENV)/bin/python -m pytest tests/device_only -q

test-fast: install
	$(VENV)/bin/python -m pytest tests -q -m "not slow"

test-device: install-device
	DEFT_DEVICE_ONLY=1 $(DEVICE_VENV)/bin/python -m pytest tests/device_only -q

bench: install
	$(VENV)/bin/python bench/export_bench.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEVICE_VENV) .pytest_cache .hypothesis
