# One entry point for the common jobs. `make toy` is the main job; `make test` runs the suite.
PY ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test toy clean-venv

setup: $(STAMP)

# Re-install only when requirements.txt changes, so `make setup` is quick when already done.
$(STAMP): requirements.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -r requirements.txt
	@touch $(STAMP)

test: setup
	$(PYTHON) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
