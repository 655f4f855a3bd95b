"""Where a model named by a Hugging Face hub id comes from: the hub, or this machine's cache.

Why: ``from_pretrained`` on a hub id asks the hub first, and huggingface_hub retries a failed
request five times with backoff (1 + 2 + 4 + 8 + 8 s) for every file it looks up. On a machine
without access to the hub (a server behind a firewall, a DNS failure) the bot or the trainer
printed a wall of retry warnings for about a minute before failing, and even a model already in
the local cache took as long to load. One short connection attempt tells the cases apart first:
with the hub unreachable a cached model loads at once from the cache (``local_files_only``), and
a model that is not cached is one clear error at once.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache

logger = logging.getLogger(__name__)

#: How long the one connection attempt to the hub may take before it counts as unreachable.
PROBE_TIMEOUT_S = 3.0
#: With one of these set, requests go through a proxy: only the hub client can tell whether the
#: hub is reachable, so it is left to do so.
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


class HubUnreachable(OSError):
    """The model is a hub id, the hub cannot be reached, and the model is not in the cache.
    An ``OSError``, as ``from_pretrained``'s own "cannot find it" errors are, so the callers'
    one-line messages cover it."""


def _hub_unreachable_because() -> str | None:
    """Why a TCP connection to the hub's endpoint (``HF_ENDPOINT``) fails, or None if it opens."""
    endpoint = urlsplit(hub_constants.ENDPOINT)
    host = endpoint.hostname or ""
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        return str(error) or type(error).__name__
    return None


@dataclass(frozen=True)
class PretrainedSource:
    """How to call ``from_pretrained`` for one model: as usual, or from the local cache only."""

    cache_only: bool = False

    @property
    def tokenizer_kwargs(self) -> dict[str, Any]:
        return {"local_files_only": True} if self.cache_only else {}

    @property
    def model_kwargs(self) -> dict[str, Any]:
        # transformers' look-up of a PEFT adapter (with peft installed) does not pass
        # ``local_files_only`` on, and would retry the hub for adapter_config.json: told apart.
        if not self.cache_only:
            return {}
        return {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}


def pretrained_source(name: str) -> PretrainedSource:
    """Where ``from_pretrained(name)`` should read: as usual for a directory, an offline setup
    (``HF_HUB_OFFLINE``), a proxy, or a reachable hub; the cache only for a hub id that is
    cached while the hub cannot be reached. Raises :class:`HubUnreachable` when the hub cannot
    be reached and the model is not cached."""
    if (
        Path(name).exists()
        or hub_constants.HF_HUB_OFFLINE
        or any(os.environ.get(variable) for variable in PROXY_VARIABLES)
    ):
        return PretrainedSource()
    reason = _hub_unreachable_because()
    if reason is None:
        return PretrainedSource()
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        logger.warning(
            "%s cannot be reached (%s): loading %s from the local cache",
            hub_constants.ENDPOINT,
            reason,
            name,
        )
        return PretrainedSource(cache_only=True)
    raise HubUnreachable(
        f"{hub_constants.ENDPOINT} cannot be reached from this machine ({reason}) and {name!r} "
        f"is not in the local Hugging Face cache ({hub_constants.HF_HUB_CACHE})"
    )


def missing_model(path: str) -> str | None:
    """Why ``path`` (MODEL_PATH) names no model, or None: an existing directory, or what can
    only be a hub id (``owner/name``), which the loader fetches. One line, saying what to do."""
    local = Path(path)
    looks_local = local.is_absolute() or path.startswith(".") or local.parent.exists()
    if not local.exists() and (looks_local or path.count("/") != 1):  # not a hub id either
        return (
            f"no model at {path!r}: train one (`make finetune PROFILE=tiny-scratch`) or set "
            "MODEL_PATH to a Hugging Face model directory or hub id"
        )
    return None
