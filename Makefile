# The index of everything an operator or developer runs; README.md lists each target.
# Every target works from a fresh clone: the ones that need .venv create it first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

INPUT ?= data/russian_dialogues.parquet
SAMPLE := data/sample/russian_dialogues_sample.parquet
DATA_DIR ?= data/processed
SPLIT ?= 90/5/5
PROFILE ?= rugpt3-medium
MODEL ?= checkpoints/latest
SHAPE ?= tiny
TRAIN_SHAPE ?= small
ARGS ?=
NPROC ?= 1
# pytest-xdist workers for `make test`: most tests wait on bot processes and servers, so two
# workers on 2 cores overlap those waits (docs/development.md).
TEST_WORKERS ?= 2
COMPOSE ?= docker compose

.PHONY: install test test-stress test-chaos lint dataset sample finetune evaluate bench bench-train bench-memory bench-report run serve chat migrate demo loadtest up down test-compose clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -c "from bot.engine.cpu_attention import main; raise SystemExit(main())"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The suite beside a CPU hog of our own (a busy process per core, bounded in time): a test that
# only passes on a quiet machine fails here. Not part of `make test`; extra pytest options in ARGS.
test-stress: install
	$(PY) -m tests.load.stress -- $(ARGS)

# Faults mid-conversation (a replica stalled past its lease or killed, Redis or PostgreSQL
# restarting, Redis 300 ms slower each way, Telegram failing for 20 s, the single process
# killed), each RUNS times, then one summary line. Real servers and processes; 10-30 s a run.
# JSON=benchmarks/results/chaos-....json keeps the counts (make bench-report renders them).
# Extra pytest options in ARGS.
RUNS ?= 5
test-chaos: install
	$(PY) -m tests.load.chaos --runs $(RUNS) $(if $(JSON),--json $(JSON)) -- $(ARGS)

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

# Fine-tune PROFILE (rugpt3-medium, rugpt3-small, tiny-scratch) on DATA_DIR; extra options in ARGS.
# NPROC=N: N processes with DDP (torchrun; gloo over loopback on a CPU, NCCL on GPUs), the same
# global batch as one process; one run directory, written by the main process.
finetune: install
	@test -f $(DATA_DIR)/train.parquet || $(MAKE) --no-print-directory dataset
ifeq ($(NPROC),1)
	$(PY) -m trainer finetune --profile $(PROFILE) --data-dir $(DATA_DIR) $(ARGS)
else
	GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=$$(( $$(nproc) / $(NPROC) > 0 ? $$(nproc) / $(NPROC) : 1 )) \
	$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m trainer finetune \
	  --profile $(PROFILE) --data-dir $(DATA_DIR) --run-name $(PROFILE)-$$(date +%Y%m%d-%H%M%S) $(ARGS)
endif

# Perplexity, BLEU/chrF and distinct-n of MODEL on the test split.
evaluate: install
	$(PY) -m trainer evaluate --model $(MODEL) --data $(DATA_DIR)/test.parquet $(ARGS)

# Serving: USERS x TURNS conversations at once, the naive design vs the engine (ARGS="--designs
# naive,engine,remote" adds the bot on `bot serve` over HTTP; engine:int8, engine:bfloat16,
# engine:chunk=0, engine:threads=N are variants in the same run; --background-load N runs N busy
# processes beside them; --join-tokens N times a long prompt joining streaming replies)
# (SHAPE=tiny|small|medium; e.g. make bench SHAPE=medium ARGS="--users 8 --json bench.json").
bench: install
	$(PY) -m bot.engine.bench --shape $(SHAPE) $(ARGS)

# Training throughput: packed data path vs the naive recipe (TRAIN_SHAPE=tiny|small|medium).
bench-train: install
	$(PY) -m trainer.bench --shape $(TRAIN_SHAPE) $(ARGS)

# Memory: long dialogues with planted facts (filler from ../shared/data, or the bundled sample),
# the bot's prompt for a question about each (MODEL, MEMORY=on|off, DATABASE_URL optional), and
# how often the answer is in it, by distance; extra options for the scorer in ARGS (--json FILE).
MEMORY ?= on
MEMORY_SET ?= data/memory_set.jsonl
bench-memory: install
	@test -f $(MEMORY_SET) || $(PY) -m benchmarks.memory_set --output $(MEMORY_SET)
	$(PY) -m bot.memory_eval --input $(MEMORY_SET) --output data/memory_prompts.jsonl \
	  --model $(MODEL) --memory $(MEMORY) $${DATABASE_URL:+--database-url $$DATABASE_URL}
	$(PY) -m benchmarks.memory_score --set $(MEMORY_SET) --results data/memory_prompts.jsonl \
	  --memory $(MEMORY) --database $$(echo $${DATABASE_URL:-sqlite} | cut -d: -f1 | cut -d+ -f1) $(ARGS)

# docs/benchmarks.md and the README's headline table, rendered from benchmarks/results/*.json.
bench-report: install
	$(PY) -m benchmarks.report

# Bring the bot's database to the newest schema (the bot also does this at start).
migrate: install
	$(PY) -m alembic upgrade head

# 50 users x 5 messages at once against the real bot process (tiny model, fake Bot API).
loadtest: install
	$(PY) -m tests.load.loadtest $(ARGS)

# The Telegram bot (long polling); settings from .env (see .env.example).
run: install
	$(PY) -m bot

# The model behind an OpenAI-compatible API (SERVE_HOST/SERVE_PORT, API_KEYS; docs/serving.md).
serve: install
	$(PY) -m bot serve $(ARGS)

# Talk to MODEL_PATH (default checkpoints/latest) in the terminal, with the bot's memory.
chat: install
	$(PY) -m bot chat

# One command from a fresh clone: install, prepare the sample, train tiny-scratch once, chat.
demo: install
	@test -f $(DATA_DIR)/train.parquet || $(MAKE) --no-print-directory dataset
	@if [ -e checkpoints/latest/config.json ]; then echo "using the trained model in checkpoints/latest"; \
	else $(PY) -m trainer finetune --profile tiny-scratch --data-dir $(DATA_DIR); fi
	MODEL_PATH=$${MODEL_PATH:-checkpoints/latest} $(PY) -m bot chat
	@echo "That was a 4M-parameter model trained from scratch in minutes: its replies are not meant to make sense."
	@echo "For real replies: make dataset INPUT=<your russian_dialogues.parquet>, then make finetune (PROFILE=rugpt3-medium on a GPU) and make run."

# The deployment of compose.yaml (PostgreSQL, Redis, the model server, two bot replicas in
# webhook mode behind nginx); settings from .env. docs/deploy.md.
up:
	@test -e checkpoints/latest/config.json || { echo "no model in checkpoints/latest: run make finetune first (or set MODEL_PATH to a hub id in .env)"; exit 1; }
	$(COMPOSE) -p tgbot up -d --build --wait

down:
	$(COMPOSE) -p tgbot down

# compose.yaml end to end against the fake Telegram (needs Docker; not part of `make test`).
test-compose: install
	tests/deploy/run_compose_e2e.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
