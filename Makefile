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

# The demo is the main job at a size that fits 10 minutes on 2 CPU cores (docs/BENCHMARKS.md §24): CRAM searched on
# a shifted target (minicity:dusk), 4 trials × 60 iterations after a shared 200-iteration source-only start, batch 4,
# selected on 100 target images, then the winner and the defaults rerun on 3 fresh seeds and compared on 500 others.
# The full default (`python -m rayuda.tune cram`: 6 trials × 400 iterations, top 2 × 3 seeds) takes about 40 minutes.
DEMO_ARGS ?= --target minicity:dusk --num-samples 4 --max-iters 60 --set stages.source_only.iters=200 \
	--set data.batch_size=4 --set data.holdout=600 --set data.max_selection=100 --confirm-top 1 --confirm-seeds 3

demo: $(STAMP)
	$(VENV)/bin/python -m rayuda.tune cram $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n auto --dist loadfile

lock:
	$(VENV)/bin/pip freeze --exclude-editable | grep -v '^rayuda' > requirements.lock
