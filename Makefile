# One entry point for people and CI. Every target installs what it needs into .venv first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Which ONNX Runtime build (the project's extra): gpu where nvidia-smi lists a GPU, else cpu; `make install ORT=cpu`
# overrides. Only one may be installed: both builds own the `onnxruntime` package.
ORT ?= $(if $(shell nvidia-smi -L 2>/dev/null | grep '^GPU '),gpu,cpu)
ifeq ($(filter $(ORT),cpu gpu),)
$(error ORT must be cpu or gpu, not '$(ORT)')
endif
# Records the build installed: a different choice has no such file, so the install step runs again.
ORT_STAMP := $(VENV)/.onnxruntime-$(ORT)

.PHONY: install check test bench lint clean

$(STAMP): pyproject.toml $(ORT_STAMP)
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# The CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build); then the project.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	# Neither ONNX Runtime build first, so switching ORT never leaves the other's files under `onnxruntime/`.
	$(PYTHON) -m pip uninstall --quiet --yes onnxruntime onnxruntime-gpu
	$(PYTHON) -m pip install --quiet -e '.[dev,cluster,$(ORT)]'
	rm -f $(VENV)/.onnxruntime-*
	touch $(ORT_STAMP) $(STAMP)

# No recipe: while the file is missing (first install, or ORT changed) make counts it as remade, so $(STAMP) is too.
$(ORT_STAMP):

install: $(STAMP)

# The unit tier of tests/ (pure code: no server, no Docker, no pytest subprocess), for use while working: under
# 2 minutes on the 2-core CI machine. `make test` still runs every tier.
check: $(STAMP)
	$(VENV)/bin/pytest tests -m unit -q $(PYTEST_ARGS)

# Load levels sized for the tiny model, which answers hundreds of requests a second on 2 cores: 1 s windows hold
# plenty, and the default 5 s windows (up to 10 of them) cost about 17 of the test run's minutes for the same checks.
TINY_LEVELS := --window-s 1 --warmup-s 0.5 --max-windows 4
# The container pass checks what differs with a container: serving, correctness and one short level per variant.
CONTAINER_LEVELS := $(TINY_LEVELS) --concurrency 2 --caption-concurrency 2

# The tests: machinery unit tests plus the whole suite end to end on the tiny model through a real Triton,
# with the local provider; then the suite again through the container provider when a Docker engine answers.
test: $(STAMP)
	$(VENV)/bin/pytest --model tiny --server local --sweep-variant base_model_cpu $(TINY_LEVELS) --durations=25 $(PYTEST_ARGS)
	@if $(PYTHON) -c "from blip_triton_bench.servers.container import docker_available as a; raise SystemExit(not a())"; then \
		$(VENV)/bin/pytest suite --model tiny --server container $(CONTAINER_LEVELS) --durations=25 $(PYTEST_ARGS); \
	else \
		echo "No Docker engine answers: the container-provider pass was not run (start one: sudo server/docker_engine.sh)"; \
	fi

# The main job: the CPU suite on the BLIP-base architecture, with its report: every variant this host can
# serve (FP32, INT8, the distilled student, the split captioner; GPU variants skip without a GPU) and the
# batching sweep around base_model_cpu, best config under a 2.5 s p99 budget.
bench: $(STAMP)
	$(VENV)/bin/pytest suite --model base --server local --sweep-variant base_model_cpu --latency-budget-ms 2500 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) reports .pytest_cache
