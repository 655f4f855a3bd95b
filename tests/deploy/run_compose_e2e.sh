#!/usr/bin/env bash
# compose.yaml end to end: build the images, start PostgreSQL, Redis, the model server, two bot
# replicas and nginx, with the fake Telegram (tests/deploy/fake_telegram_service.py) as the Bot API
# and the driver of the conversation; it checks every message is answered once, in order.
# `make test-compose`. Needs Docker with Compose (v2 `docker compose`, or v1 `docker-compose`).
#
# On a machine with no container registry (this project's CI machines), two environment
# variables make it work from Debian's archive and PyPI alone:
#   BASE_ROOTFS=/path/to/debootstrap-bookworm   imported as debian:bookworm-slim
#   TORCH_WHEEL=/path/to/torch-...+cpu-...whl   preinstalled instead of PyTorch's CPU index
#   PIP_CA=/etc/ssl/certs/ca-certificates.crt    the CA bundle pip must trust (a TLS-inspecting
#                                                proxy between the machine and PyPI)
set -euo pipefail
cd "$(dirname "$0")/../.."
project=tgbot-e2e
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
files=(-f compose.yaml -f tests/deploy/compose.e2e.yaml)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  if [ -n "${BASE_ROOTFS:-}" ]; then
    tar -C "$BASE_ROOTFS" -c . | docker import - debian:bookworm-slim
  else
    docker pull debian:bookworm-slim
  fi
fi
build_args=()
if [ -n "${TORCH_WHEEL:-}" ]; then  # a base with torch already in /opt/venv
  cp "$TORCH_WHEEL" "$work/"
  cp "${PIP_CA:-/dev/null}" "$work/pip-ca.crt"
  cat > "$work/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
COPY pip-ca.crt /etc/pip-ca.crt
RUN if [ -s /etc/pip-ca.crt ]; then echo "[global]\ncert = /etc/pip-ca.crt" > /etc/pip.conf; fi
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
COPY *.whl /tmp/
RUN /opt/venv/bin/pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl
DOCKERFILE
  docker build -q -t tgbot-e2e-base "$work" >/dev/null
  build_args=(--build-arg BASE_IMAGE=tgbot-e2e-base)
fi
docker build -t tgbot:latest "${build_args[@]}" .
docker build -t tgbot-e2e-services:latest -f tests/deploy/services.Dockerfile tests/deploy

# A tiny random model (the code path is the real one; replies are not meant to make sense).
model=checkpoints/e2e-tiny
.venv/bin/python - "$model" <<'PY'
import sys, torch
from dataset_tools.dialogue_format import render_dialogue
from dataset_tools.sample_data import generate_dialogues
from trainer.modeling import build_scratch_model, train_scratch_tokenizer
tokenizer = train_scratch_tokenizer((render_dialogue(d) for d in generate_dialogues()), 600)
torch.manual_seed(0)
model = build_scratch_model(tokenizer, {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 1024})
model.save_pretrained(sys.argv[1]); tokenizer.save_pretrained(sys.argv[1])
PY
chmod -R a+rX checkpoints

cat > "$work/env" <<ENV
TELEGRAM_BOT_TOKEN=123456:e2e-token
WEBHOOK_URL=https://bot.example/webhook
WEBHOOK_SECRET=e2e-secret
POSTGRES_PASSWORD=e2e-password
LLM_API_KEY=e2e-key
MODEL_PATH=/app/checkpoints/e2e-tiny
ENV
compose_e2e() { "${compose[@]}" -p "$project" --env-file "$work/env" "${files[@]}" "$@"; }
started=$(date +%s)
compose_e2e up -d --scale bot=2
status=$(docker wait "$(compose_e2e ps -q telegram)")
echo "--- the fake Telegram (the driver) ---"
compose_e2e logs --no-color telegram | tail -20
echo "--- webhook requests each bot replica answered (nginx spreads them) ---"
for container in $(compose_e2e ps -q bot); do
  echo "$(docker inspect -f '{{.Name}}' "$container"): $(docker logs "$container" 2>&1 | grep -c 'POST /webhook')"
done
echo "--- service states ---"
compose_e2e ps
if [ "$status" != 0 ]; then compose_e2e logs --no-color bot model proxy | tail -80; fi
compose_e2e down -v --remove-orphans >/dev/null 2>&1 || true
rm -rf "$model"
echo "compose e2e: exit $status after $(( $(date +%s) - started )) s"
exit "$status"
