# The bot, its inference server (`python -m bot serve`) and the tools, in one image.
#
#   docker build -t tgbot .                                   # CPU (PyTorch's CPU wheels)
#   docker build -t tgbot:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# The CUDA wheels bring their own CUDA runtime: the same image runs on a GPU host with the
# NVIDIA container toolkit (`gpus: all` in compose). No model is baked in: mount a checkpoint
# directory at /app/checkpoints (compose.yaml does), or set MODEL_PATH to a hub id.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Debian's Python 3.11: the version the project is tested on. Versions are not pinned: Debian's
# stable updates are security fixes, and a pinned version disappears from the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt .
# torch first, from the chosen index (CPU by default: PyPI's default build pulls CUDA, GBs).
RUN pip install --index-url "${TORCH_INDEX_URL}" "$(grep -E '^torch==' requirements.txt)" \
    && pip install -r requirements.txt

COPY alembic.ini ./
COPY alembic/ alembic/
COPY dataset_tools/ dataset_tools/
COPY trainer/ trainer/
COPY models/ models/
COPY bot/ bot/

RUN useradd --create-home --uid 10001 bot \
    && mkdir -p /app/data /app/checkpoints \
    && chown bot:bot /app/data
USER 10001

# 8080: webhook + /healthz + /metrics; 8000: `python -m bot serve`.
EXPOSE 8080 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HEALTH_CHECK_PORT', '8080'), timeout=4)"]
CMD ["python", "-m", "bot"]
