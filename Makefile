# Two commands on a fresh machine: `make extract` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A pinned torch is installed first: on a GPU box PyPI serves the CUDA build of this
# release; on a CPU-only box with a local wheel (as in CI here) pip takes that one.
TORCH ?= torch==2.13.0
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: extract test test-fast bench lint format verify clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The offline default's corpus (standard library docstrings the sample models never saw) and
# the small T5 and GPT-2 trained on the others (lib/sample/train.py), built once in a second.
data/sample/sample.json: $(VENV)/.installed $(wildcard lib/sample/*.py lib/sample/models/*/*)
	$(PY) -m jobs.make_sample data/sample

# NPROC=N runs N processes through `accelerate launch` (one per GPU; on a CPU-only machine N
# gloo ranks, a test of the launch rather than a speed-up).
NPROC ?= 1
ifeq ($(NPROC),1)
RUN_JOB = $(PY) -m jobs.extract
else
# The job sets its own dtype (model.dtype): accelerate's mixed precision and dynamo stay off.
RUN_JOB = $(VENV)/bin/accelerate launch --multi_gpu --num_processes $(NPROC) --num_machines 1 \
	--mixed_precision no --dynamo_backend no -m jobs.extract
endif

extract: data/sample/sample.json
	$(RUN_JOB) --config $(CONFIG) $(ARGS)

# The suite on TEST_WORKERS processes, a test file to each at a time (a module's fixtures are
# built once), one torch thread each: 90-110 s on 2 idle cores.
TEST_WORKERS ?= 2
PYTEST = OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(VENV)/.installed
	$(PYTEST) tests

# The unit tests only: no real kills, second processes or benchmark runs.
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow" tests

bench: $(VENV)/.installed
	$(PY) -m jobs.bench $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build data/sample out
