# Two entry points that work on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# SkyPilot pins click below what huggingface-hub needs, so its own parser (which checks
# tpu_scripts/skypilot.yaml in the tests) lives in a venv of its own.
SKY := $(VENV)/skypilot
$(SKY)/.installed:
	python3 -m venv $(SKY)
	$(SKY)/bin/python -m pip install -q 'skypilot>=0.10'
	touch $@

install: $(VENV)/.installed $(SKY)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/jaxtune assets smollm2 chitchat
	$(VENV)/bin/jaxtune train configs/quickstart.py

# Two workers (pytest-xdist): XLA compiles on one core, so two test processes keep both busy.
test: $(VENV)/.installed $(SKY)/.installed
	$(PY) -m pytest -q -n 2

.PHONY: install demo test
