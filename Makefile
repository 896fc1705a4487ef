# The two commands a new user types:  make run   and   make test
# Both create (or reuse) a local virtual environment in .venv with everything pinned in pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install run test bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all]"
	touch $@

install: $(VENV)/.installed

# The default job: trains the default task with the default optimizer, prints val/loss and the test metric.
run: install
	$(PY) run.py logger=none $(ARGS)

# The whole test suite (2-5 minutes on 2 CPU cores).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15 $(ARGS)

# Per-step time of each DoPr variant against its base optimizer; ARGS are key=value
# (e.g. make bench ARGS="threads=1 rounds=10 steps=5 out=results/bench"; ARGS=help lists the keys).
bench: install
	$(PY) scripts/bench_optim.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
