# Two commands: `make run` (the whole DAG: dvc repro, its stages sharing one local Ray that starts and stops
# with it: scorelab.runtime.with_local_ray) and `make test`. Both create .venv on first use.
# `make run PRESET=toy2d` first validates presets/toy2d.yaml and copies it over params.yaml
# (presets: digits = the committed default, sweep_digits = it with a 34-trial sweep, toy2d, mnist, cifar10); `make demo` is the 2-D sampler demo.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

PRESET ?=

.PHONY: run demo test test-slow test-all setup lock bench

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
ifneq ($(PRESET),)
	$(PY) -m scorelab validate presets/$(PRESET).yaml
	cp presets/$(PRESET).yaml params.yaml
endif
	@# Nothing to run (dvc status -q exits 0): no Ray to start either.
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DVC_NO_ANALYTICS=1 sh -c 'if dvc status -q >/dev/null 2>&1; \
	  then dvc repro; else $(PY) -m scorelab with-local-ray -- dvc repro; fi'

demo: $(STAMP)
	$(PY) -m scorelab demo --params params.yaml --out outputs/demo

# The fast tier (a few minutes on 2 cores); the slow tier (faults, clusters, whole-DAG runs); both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

# The benchmarks of docs/BENCHMARKS.md, one after another (long; not run by CI); CSVs into docs/bench/.
bench: $(STAMP)
	$(PY) bench/quality_vs_diffusers.py --save-model outputs/bench/ddpm_model.pt
	$(PY) bench/ancestral_draws.py
	$(PY) bench/recipe_ablations.py
	$(PY) bench/samplers_one_net.py --model outputs/bench/ddpm_model.pt
	$(PY) bench/overheads.py
	$(PY) bench/train_throughput.py
	$(PY) bench/samplers_exact.py
	$(PY) bench/dag_end_to_end.py

# Re-pin every package after changing pyproject.toml's dependencies.
lock: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench,cluster]'
	$(PY) -m pip freeze --exclude-editable | sed '1i # Exact versions installed together on Python 3.11.\n# Regenerate: make lock' > requirements.lock
