# The two quick-start commands (README): `make demo` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint lock

$(STAMP): requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.lock
	$(VENV)/bin/pip install --quiet --no-deps -e .
	$(VENV)/bin/python -c "import torch, torchvision.ops; torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)"
	touch $(STAMP)

setup: $(STAMP)

# The demo is the main job at a size that fits 15 minutes on 2 CPU cores (docs/BENCHMARKS.md §13); the full
# default (`python -m rayuda.tune cram`: 6 trials × 400 iterations, top 2 × 3 seeds) takes about 40.
DEMO_ARGS ?= --num-samples 4 --max-iters 200 --set stages.source_only.iters=300 --confirm-top 1 --confirm-seeds 3

demo: $(STAMP)
	$(VENV)/bin/python -m rayuda.tune cram $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n auto --dist loadfile

lock:
	$(VENV)/bin/pip freeze --exclude-editable | grep -v '^rayuda' > requirements.lock
