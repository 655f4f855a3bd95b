"""``python -m trainer push``: a trained model directory to the Hugging Face Hub, with its card.

What goes up is what the bot, ``bot serve`` and vLLM load: the weights, config, tokenizer,
``generation_config.json``, the card, the metrics and the loss plot. Intermediate checkpoints
(``checkpoint-*``: weights plus optimizer state, ~3× the model each) and the training arguments
stay local. The token comes from ``HF_TOKEN`` only, never from the command line (it would end
up in the shell history and in process listings).
"""

from __future__ import annotations

import os
from pathlib import Path

from models.errors import error_line
from trainer.model_card import write_model_card

#: Left out of an upload: training state, not the model.
IGNORED = ["checkpoint-*", "checkpoint-*/**", "training_args.bin", "adapter/optimizer.pt"]


class PublishError(Exception):
    """The upload cannot be done; the message is one line saying why and what to do."""


def files_to_upload(model_dir: Path) -> list[str]:
    """The directory's files that :func:`push` sends, relative to it (what the Hub will hold)."""
    from fnmatch import fnmatch

    return sorted(
        str(path.relative_to(model_dir))
        for path in model_dir.rglob("*")
        if path.is_file()
        and not any(fnmatch(str(path.relative_to(model_dir)), pattern) for pattern in IGNORED)
    )


def push(model_dir: Path, repo_id: str, private: bool = False) -> str:
    """Render the card, create the repository if needed, upload; returns the model's URL."""
    if not (model_dir / "config.json").exists() or not (model_dir / "metrics.json").exists():
        raise PublishError(
            f"{model_dir} is not a trained model directory (no config.json and metrics.json): "
            "pass a run from checkpoints/, e.g. checkpoints/latest"
        )
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PublishError(
            "HF_TOKEN is not set: create a token with write access at "
            "https://huggingface.co/settings/tokens and run `HF_TOKEN=... python -m trainer push`"
        )
    write_model_card(model_dir, repo_id)
    import httpx2  # huggingface_hub's HTTP client: its transport errors are not OSErrors
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(model_dir),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=IGNORED,
            commit_message=f"Upload {model_dir.name}",
        )
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise PublishError(
            f"the Hub refused the upload (HTTP {status}): {error_line(error)}"
        ) from None
    except (OSError, httpx2.TransportError) as error:  # no network, DNS, refused, TLS
        raise PublishError(f"cannot reach the Hugging Face Hub: {error_line(error)}") from None
    return str(getattr(commit, "repo_url", f"https://huggingface.co/{repo_id}"))
