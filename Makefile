# Two commands: `make run` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup lock

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m scorelab demo --params params.yaml --out outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q

# Re-pin every package after changing pyproject.toml's dependencies.
lock: $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip freeze --exclude-editable | sed '1i # Exact versions installed together on Python 3.11.\n# Regenerate: make lock' > requirements.lock
