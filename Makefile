# The two commands a new user types:  make run   and   make test
# Both create (or reuse) a local virtual environment in .venv with pyproject.toml's `all` extra: the
# research stack at its exact pins (`research`, torch==2.13.0 included) and the test tools (`dev`).
# A user who wants only the optimizer installs the core instead: pip install . (torch, pytorch-optimizer).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install run test test-kernels bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (pip's output: $(VENV)/install.log)"
	@$(PY) -m pip install --upgrade pip > $(VENV)/install.log 2>&1 || (tail -n 40 $(VENV)/install.log; exit 1)
	@$(PY) -m pip install -e ".[all]" >> $(VENV)/install.log 2>&1 || (tail -n 40 $(VENV)/install.log; exit 1)
	@touch $@

install: $(VENV)/.installed

# The main job: AdamW against DoPr-AdamW on the default task (lds), same seeds, both cores; prints
# val/loss and the test metric of both with the paired difference, and writes a figure.
# Arguments go through ARGS, e.g. make run ARGS="task=robomimic_lift seeds=0".
run: install
	$(PY) scripts/compare.py $(ARGS)

# The whole test suite (2-5 minutes on 2 CPU cores).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15 $(ARGS)

# The optimizer's tests again under every ATen CPU kernel set below the best one this CPU has
# (make test ran that one): the default, AVX2 and AVX-512 sets order floating-point sums differently,
# and the precision bounds are derived to hold under any order. CI runs it after make test.
test-kernels: install
	@for cap in $$($(PY) -c "import torch; print({'AVX512': 'default avx2', 'AVX2': 'default'}.get(torch.backends.cpu.get_cpu_capability(), 'default'))"); do \
	  echo "tests/optim under ATEN_CPU_CAPABILITY=$$cap"; \
	  ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests/optim || exit 1; \
	done

# Per-step time of each DoPr variant against its base optimizer; ARGS are key=value
# (e.g. make bench ARGS="threads=1 rounds=10 steps=5 out=results/bench"; ARGS=help lists the keys).
bench: install
	$(PY) scripts/bench_optim.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
