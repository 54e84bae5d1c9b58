# One entry point for people and CI. Every target installs what it needs into .venv first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test bench lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# The CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build); then the project.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The tests: machinery unit tests plus the whole suite end to end on the tiny model through a real Triton.
test: $(STAMP)
	$(VENV)/bin/pytest --model tiny $(PYTEST_ARGS)

# The main job: the CPU suite on the BLIP-base architecture, with its report.
bench: $(STAMP)
	$(VENV)/bin/pytest suite --model base --variant base_model_cpu $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) reports .pytest_cache
