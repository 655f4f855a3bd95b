# The index of everything an operator or developer runs; README.md explains each target.
# Every target works from a fresh clone: the ones that need .venv create it first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

INPUT ?= data/russian_dialogues.parquet
SAMPLE := data/sample/russian_dialogues_sample.parquet
DATA_DIR ?= data/processed
SPLIT ?= 90/5/5

.PHONY: install test lint dataset sample finetune run chat bench migrate clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Clean INPUT into train/val/test splits; without a real file, use the project's sample.
dataset: install
	@if [ -f "$(INPUT)" ]; then in="$(INPUT)"; else \
	  echo "$(INPUT) not found: using the bundled sample $(SAMPLE) (set INPUT=... for real data)"; \
	  in="$(SAMPLE)"; fi; \
	$(PY) -m dataset_tools prepare --input "$$in" --output-dir $(DATA_DIR) --split $(SPLIT)

# Regenerate the bundled sample (deterministic: the committed file does not change).
sample: install
	$(PY) -m dataset_tools make-sample --output $(SAMPLE)

finetune run chat bench migrate:
	@echo "'make $@' is not built yet (see the open issues)"; exit 1

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
