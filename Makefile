# pyvision-rl — every target is self-contained on a fresh machine (runs as root; installs what it needs).
SHELL := /bin/bash
PY    := .venv/bin/python
PIP   := .venv/bin/pip
CACHE := .cache
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(CACHE)/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1
export DOCKER_HOST ?= unix:///var/run/docker.sock
SANDBOX_IMAGE ?= pyvision-sandbox:latest
PYTEST_ARGS ?=

.PHONY: all setup setup-vllm sysdeps docker-up sandbox-image test test-fast test-docker test-slow test-gpu test-vllm \
        check-no-torchvision demo train lint format bench clean distclean

all: setup

# ---------------------------------------------------------------- environment
# torch first, from the CPU wheel on disk (otherwise pip fetches a multi-GB CUDA build), then the lock.
.venv/.stamp: pyproject.toml requirements.lock constraints.txt
	@test -x .venv/bin/python || python3 -m venv .venv
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch==2.14.0"; \
	  else $(PIP) install -q "torch==2.13.0"; fi; fi
	@mkdir -p $(CACHE)
	@grep -v '^torch==' requirements.lock > $(CACHE)/requirements.notorch.txt  # torch is chosen above
	$(PIP) install -q -c constraints.txt -r $(CACHE)/requirements.notorch.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $@

setup: .venv/.stamp

# Debian packages: docker engine, bubblewrap (process sandbox), debootstrap (offline sandbox image).
$(CACHE)/sysdeps.stamp:
	@mkdir -p $(CACHE)
	@missing=""; for p in docker.io bubblewrap debootstrap; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "warning: missing Debian packages:$$missing (run as root, or install them); docker/process sandbox tests may skip"; fi; fi
	@touch $@

sysdeps: $(CACHE)/sysdeps.stamp

docker-up: sysdeps
	@bash sandbox_image/start-dockerd.sh

sandbox-image: docker-up
	@bash sandbox_image/build.sh $(SANDBOX_IMAGE)

check-no-torchvision: setup
	@if $(PY) -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then \
	  echo "ERROR: torchvision is installed in .venv; it breaks the CPU torch and transformers' processors." \
	       "Run: .venv/bin/pip uninstall -y torchvision  (constraints.txt keeps it out)"; exit 1; fi

# ---------------------------------------------------------------- tests
# Everything that can run on this machine: unit, slow and docker tests (gpu/vllm ones skip with a reason).
test: setup sysdeps check-no-torchvision sandbox-image
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# Inner loop: no Docker, no slow tests.
test-fast: setup check-no-torchvision
	$(PY) -m pytest -q -ra -m "not slow and not docker" $(PYTEST_ARGS)

test-docker: setup sandbox-image
	$(PY) -m pytest -q -ra -m docker $(PYTEST_ARGS)

test-slow: setup sandbox-image
	$(PY) -m pytest -q -ra -m slow $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -q -ra -m gpu $(PYTEST_ARGS)

# vLLM engine tests: need `pip install -e .[vllm]` on a CUDA machine (vLLM's PyPI wheels are CUDA-only and
# its Qwen-VL processor needs torchvision, which the CPU environment must not have); they skip elsewhere.
# GPU machines only: vLLM 0.33 (pins torch 2.14.0 and a CUDA torchvision, which is fine on CUDA; the
# CPU environment must never get torchvision, hence no constraints file here).
setup-vllm: setup
	$(PIP) install -q "vllm==0.33.0"

test-vllm: setup
	$(PY) -m pytest -q -ra -m vllm $(PYTEST_ARGS)

# ---------------------------------------------------------------- main job
# The embedded default: tiny model, synthetic tasks, SFT cold start then RL on local Ray (CPU).
demo: setup sysdeps check-no-torchvision
	@-$(MAKE) --no-print-directory sandbox-image || echo "note: no Docker engine; the demo uses the process sandbox"
	$(PY) -m pyvision_rl.cli demo configs/tiny_cpu.yaml $(ARGS)

train: setup
	$(PY) -m pyvision_rl.cli train $(or $(CONFIG),configs/tiny_cpu.yaml) $(ARGS)

# ---------------------------------------------------------------- tooling
lint: setup
	.venv/bin/ruff check pyvision_rl tests benchmarks
	.venv/bin/ruff format --check pyvision_rl tests benchmarks

format: setup
	.venv/bin/ruff format pyvision_rl tests benchmarks
	.venv/bin/ruff check --fix pyvision_rl tests benchmarks

bench: setup sandbox-image
	$(PY) benchmarks/sandbox.py
	$(PY) benchmarks/rollout.py
	$(PY) benchmarks/learner.py

clean:
	rm -rf runs/ .pytest_cache build *.egg-info benchmarks/results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv $(CACHE)
