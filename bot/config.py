"""Settings, read once from the environment and `.env` (documented in `.env.example`).

The token is a ``SecretStr``: it never appears in ``repr``, logs or tracebacks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.hub import missing_model

DEFAULT_PERSONA = (
    "Я дружелюбный собеседник. Отвечаю коротко, по-русски и по делу, с уважением к собеседнику."
)


#: What Telegram accepts as a webhook's secret token (setWebhook's ``secret_token``).
WEBHOOK_SECRET_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,256}")


#: DATABASE_TIMEOUT_S's default: the longest one database statement may wait (bot.db.engine).
DEFAULT_DATABASE_TIMEOUT_S = 10.0
#: SQLITE_SYNCHRONOUS's default (bot.db.engine.create_engine says why).
DEFAULT_SQLITE_SYNCHRONOUS = "NORMAL"
#: The async driver the bot uses for each database it supports (DATABASE_URL's scheme).
ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
DATABASE_URL_EXAMPLES = (
    "sqlite+aiosqlite:///data/bot.db or postgresql+asyncpg://user:password@host/dbname"
)


def async_database_url(url: str) -> str:
    """DATABASE_URL with the async driver the bot needs, or a ValueError saying what to set.

    Hosts hand out PostgreSQL URLs as ``postgres://`` or ``postgresql://`` with libpq's
    ``sslmode``; SQLAlchemy then loads psycopg (not installed, and not async) and asyncpg takes
    ``ssl`` instead. Both are translated, so the URL a host gives works as it is. The URL
    itself (it holds the password) never goes into the message.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ValueError(f"not a database URL; examples: {DATABASE_URL_EXAMPLES}")
    backend, _, driver = scheme.lower().partition("+")
    backend = "postgresql" if backend == "postgres" else backend
    wanted = ASYNC_DRIVERS.get(backend)
    if wanted is None:
        raise ValueError(
            f"{backend} is not supported, only SQLite and PostgreSQL ({DATABASE_URL_EXAMPLES})"
        )
    if driver and driver != wanted:
        raise ValueError(
            f"the bot talks to {backend} through {wanted} (async), not {driver}: "
            f"write {backend}+{wanted}://..."
        )
    if backend == "postgresql":
        path, mark, query = rest.partition("?")
        if mark:
            params = [
                f"ssl={p.removeprefix('sslmode=')}" if p.startswith("sslmode=") else p
                for p in query.split("&")
            ]
            rest = f"{path}?{'&'.join(params)}"
    return f"{backend}+{wanted}://{rest}"


class ConfigError(Exception):
    """A setting is missing or wrong; the message is one line saying what to set."""


class Settings(BaseSettings):
    """Everything the bot can be told. Names are the environment variables, case-insensitive."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    telegram_bot_token: SecretStr | None = None
    telegram_api_url: str | None = Field(
        None, description="Bot API server base URL, e.g. http://127.0.0.1:8081 (local server)"
    )
    database_url: str = "sqlite+aiosqlite:///data/bot.db"
    database_timeout_s: float = Field(
        DEFAULT_DATABASE_TIMEOUT_S,
        gt=0,
        description="longest wait of one database statement (a lock, a server not answering)",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        DEFAULT_SQLITE_SYNCHRONOUS,
        description="SQLite's commit durability: NORMAL survives a crash of the bot, FULL also "
        "an operating system crash or power loss, at an fsync per commit (bot.db.engine)",
    )
    model_path: str = "checkpoints/latest"
    model_device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    model_dtype: str = "float32"  # auto | float32 | bfloat16 | float16 (see models.loading)
    model_quantize: str = "none"  # none | int8 (dynamic int8 projections, for CPUs)
    model_cpu_onednn: bool = True  # float32 projections through oneDNN on a CPU (models.onednn)
    cpu_attention_kernel: str = "auto"  # auto | on | off (bot.engine.cpu_attention)
    context_tokens: int | None = Field(None, ge=32, description="default: the model's window")
    reply_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.8, ge=0.1, le=2.0)
    temperature_min: float = Field(0.1, gt=0.0)
    temperature_max: float = Field(2.0, le=5.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.15, ge=1.0, le=3.0)
    num_beams: int = Field(1, ge=1, le=16, description=">1: beam search, served outside batches")
    # Serving many users at once (bot.engine).
    max_batch: int = Field(8, ge=1, le=512, description="rows decoded together")
    kv_cache_mb: float = Field(1024, ge=0, description="memory for dialogues' cached prefixes")
    prefill_chunk_tokens: int = Field(
        64, ge=0, description="prompt tokens encoded per step while replies stream (0: all)"
    )
    engine_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="threads of the engine's worker (0: up to one per core, chosen from its steps)",
    )
    history_trim_step: int = Field(
        4, ge=1, description="exchanges dropped at once when the history outgrows the context"
    )
    stream_replies: bool = True
    stream_edit_interval_s: float = Field(1.0, ge=0, description="per chat; Telegram allows ~1/s")
    stream_drafts: bool = Field(True, description="private chats: stream as sendMessageDraft")
    telegram_outage_s: float = Field(
        120.0, ge=0, description="how long a reply's final text is tried while Telegram fails"
    )
    system_prompt: str = DEFAULT_PERSONA
    history_messages: int = Field(60, ge=2, description="messages read from the DB per prompt")
    memory_tokens: int = Field(
        300, ge=0, description="prompt tokens for recalled old exchanges (0: recall none)"
    )
    queue_size: int = Field(32, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    polling_concurrency: int = Field(64, ge=1)
    log_level: str = "INFO"
    console_user_id: int = Field(0, description="the user id `python -m bot chat` talks as")
    # Abuse limits and access.
    max_message_chars: int = Field(2000, ge=1, description="longer user messages are cut")
    rate_limit_messages: int = Field(
        20, ge=0, description="messages per sender per RATE_LIMIT_WINDOW_S; 0: no limit"
    )
    rate_limit_window_s: float = Field(60, gt=0)
    allowed_user_ids: str = Field("", description="comma-separated ids; empty: everyone")
    blocked_user_ids: str = Field("", description="comma-separated ids the bot ignores")
    admin_user_ids: str = Field("", description="comma-separated ids allowed to use /stats")
    retention_days: float = Field(0, ge=0, description="prune older messages; 0 keeps all")
    pending_reply_max_age_s: float = Field(
        600, ge=0, description="answer owed or sent-while-down messages this recent; 0: none"
    )
    # The model behind an OpenAI-compatible server (`python -m bot serve`, vLLM): when
    # LLM_BASE_URL is set the bot loads no model and sends each turn there (bot.engine.remote).
    llm_base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1")
    llm_api_key: SecretStr | None = None
    llm_model: str | None = Field(None, description="default: the first model the server lists")
    tokenizer_path: str | None = Field(None, description="local tokenizer; default: MODEL_PATH")
    llm_timeout_s: float = Field(30.0, gt=0, description="longest wait for the next chunk")
    llm_connect_timeout_s: float = Field(2.0, gt=0)
    # `python -m bot serve`: the OpenAI-compatible server over the local engine (bot.engine.server).
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(8000, ge=1, le=65535)
    served_model_name: str | None = Field(None, description="default: the model directory's name")
    api_keys: SecretStr | None = Field(None, description="comma-separated bearer keys; none: open")
    # Several replicas in webhook mode (bot.replicas): they agree through Redis when it is set.
    redis_url: SecretStr | None = Field(None, description="e.g. redis://127.0.0.1:6379/0")
    replica_lease_s: float = Field(
        15.0, ge=1, description="a dead replica's users are answered by others after this"
    )
    replica_sweep_interval_s: float = Field(
        5.0, gt=0, description="how often each replica looks for owed replies nobody answers"
    )
    # Webhook mode (when WEBHOOK_URL is set) and the health/metrics server.
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_path: str = "/webhook"
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(8080, ge=1, le=65535)
    health_port: int = Field(0, ge=0, le=65535, description="polling mode; 0: no server")
    # The Mini App (bot.webapp): the page's public URL, its port in polling mode, its limits.
    webapp_url: str | None = Field(None, description="https://.../app/: the menu button opens it")
    webapp_port: int = Field(0, ge=0, le=65535, description="polling mode; 0: no page")
    webapp_auth_max_age_s: float = Field(86400, gt=0, description="launch data accepted this long")
    webapp_max_body_bytes: int = Field(16384, ge=1024)

    @field_validator("sqlite_synchronous", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("webapp_url")
    @classmethod
    def _https_page(cls, value: str | None) -> str | None:
        # Telegram opens Mini Apps over https only; a plain http URL fails at setChatMenuButton,
        # long after the model has loaded.
        if value and not value.startswith("https://"):
            raise ValueError("Telegram opens Mini Apps over https only: https://host/app/")
        return value or None

    @field_validator("allowed_user_ids", "blocked_user_ids", "admin_user_ids")
    @classmethod
    def _id_list(cls, value: str) -> str:
        for part in value.replace(" ", "").split(","):
            if part and not part.lstrip("-").isdigit():
                raise ValueError(f"expected comma-separated Telegram user ids, got {part!r}")
        return value

    @staticmethod
    def _ids(value: str) -> frozenset[int]:
        return frozenset(int(p) for p in value.replace(" ", "").split(",") if p)

    @property
    def allowed_ids(self) -> frozenset[int]:
        return self._ids(self.allowed_user_ids)

    @property
    def blocked_ids(self) -> frozenset[int]:
        return self._ids(self.blocked_user_ids)

    @property
    def admin_ids(self) -> frozenset[int]:
        return self._ids(self.admin_user_ids)

    @field_validator("webhook_secret")
    @classmethod
    def _telegram_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Telegram refuses any other secret at setWebhook, which the bot reaches only after
        # loading the model; the value itself never goes into the message.
        secret = value.get_secret_value() if value is not None else ""
        if secret and not WEBHOOK_SECRET_PATTERN.fullmatch(secret):
            raise ValueError(
                "WEBHOOK_SECRET must be 1-256 characters of A-Z, a-z, 0-9, _ and - "
                "(what Telegram accepts as a secret token)"
            )
        return value

    @field_validator("model_dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError("MODEL_DTYPE must be auto, float32, bfloat16 or float16")
        return value

    @field_validator("model_quantize")
    @classmethod
    def _known_quantize(cls, value: str) -> str:
        if value not in ("none", "int8"):
            raise ValueError("MODEL_QUANTIZE must be none or int8")
        return value

    @field_validator("cpu_attention_kernel")
    @classmethod
    def _known_attention_mode(cls, value: str) -> str:
        if value not in ("auto", "on", "off"):
            raise ValueError("CPU_ATTENTION_KERNEL must be auto, on or off")
        return value

    @field_validator("database_url")
    @classmethod
    def _async_database_url(cls, value: str) -> str:
        return async_database_url(value)

    @field_validator("telegram_api_url", "llm_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else None

    @property
    def server_api_keys(self) -> frozenset[str]:
        """The bearer keys `python -m bot serve` accepts (empty: no key needed)."""
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return frozenset(k.strip() for k in raw.split(",") if k.strip())

    @model_validator(mode="after")
    def _temperature_range(self) -> Settings:
        if not self.temperature_min <= self.temperature <= self.temperature_max:
            raise ValueError(
                f"TEMPERATURE {self.temperature} is outside "
                f"[{self.temperature_min}, {self.temperature_max}]"
            )
        return self

    @property
    def model_dir(self) -> Path:
        return Path(self.model_path)

    def require_token(self) -> str:
        """The bot's token, or a ConfigError saying where to get one."""
        token = self.telegram_bot_token.get_secret_value() if self.telegram_bot_token else ""
        if not token:
            raise ConfigError(
                "TELEGRAM_BOT_TOKEN is not set: get a token from @BotFather and put it in .env "
                "(see .env.example)"
            )
        return token

    def require_webhook_secret(self) -> str | None:
        """The webhook's secret token in webhook mode (WEBHOOK_URL set), else None; a
        ConfigError when webhook mode has none (anyone could post updates to the bot)."""
        if not self.webhook_url:
            return None
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret else ""
        if not secret:
            raise ConfigError(
                "WEBHOOK_SECRET is not set: webhook mode needs a secret token "
                "(1-256 characters of A-Z, a-z, 0-9, _ and -)"
            )
        return secret

    def require_model(self) -> None:
        """A ConfigError when the model this process would load is not there (with
        LLM_BASE_URL the model is the server's, and only its tokenizer is read here)."""
        if not self.llm_base_url and (reason := missing_model(self.model_path)):
            raise ConfigError(reason)
