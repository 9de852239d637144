# Two entry points that work on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEMO_PROMPT ?= Hi! What do you like to do on weekends?

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/jaxtune generate "$$($(VENV)/bin/jaxtune assets smollm2)" --chat --max-new-tokens 64 --prompt "$(DEMO_PROMPT)"

test: $(VENV)/.installed
	$(PY) -m pytest -q

.PHONY: install demo test
