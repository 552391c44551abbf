"""The Telegram bot's settings from the environment, and Telegram's rules the bot follows (how long flood control
asks to wait; which chat a thread id belongs to)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("PTB_TIMEDELTA", "1")   # python-telegram-bot's future time periods (no deprecation warnings)

from telegram.error import BadRequest, NetworkError, RetryAfter, TimedOut  # noqa: E402

from bots import channel as C  # noqa: E402

ENV = "STACKWISE_TELEGRAM_"


@dataclass(kw_only=True)
class TelegramConfig:
    """Everything the bot reads from the environment (see the module docstring)."""

    token: str
    base_url: str | None = None
    base_file_url: str | None = None
    access: C.AccessList = field(default_factory=C.AccessList)
    max_upload_bytes: int = 20 * 2**20
    webhook_url: str | None = None
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = 8443
    webhook_secret: str | None = None
    edit_interval: float = 1.0     # seconds between edits of one chat's progress message
    progress_grace: float = 1.0    # a turn shorter than this shows no progress message at all
    job_poll_s: float = 5.0
    poll_timeout: int = 30         # getUpdates long-poll seconds

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> TelegramConfig:
        from agent.settings import SettingsError

        env = dict(os.environ if env is None else env)
        token = env.get(f"{ENV}TOKEN", "").strip()
        if not token:
            raise SettingsError(f"Set {ENV}TOKEN to the bot token @BotFather gave you.")
        base = env.get(f"{ENV}BASE_URL", "").strip() or None
        if base and not base.rstrip("/").endswith("/bot"):
            base = base.rstrip("/") + "/bot"
        files = env.get(f"{ENV}FILE_URL", "").strip() or (base[:-len("/bot")] + "/file/bot" if base else None)
        try:
            upload_mb = float(env.get(f"{ENV}MAX_UPLOAD_MB") or 20)
            port = int(env.get(f"{ENV}WEBHOOK_PORT") or 8443)
        except ValueError as exc:
            raise SettingsError(f"{ENV}MAX_UPLOAD_MB / {ENV}WEBHOOK_PORT must be numbers ({exc}).") from None
        return cls(token=token, base_url=base, base_file_url=files,
                   access=C.AccessList.from_env(f"{ENV}ALLOWED_USERS", f"{ENV}ADMINS", env),
                   max_upload_bytes=int(upload_mb * 2**20), webhook_url=env.get(f"{ENV}WEBHOOK_URL") or None,
                   webhook_listen=env.get(f"{ENV}WEBHOOK_LISTEN") or "127.0.0.1", webhook_port=port,
                   webhook_secret=env.get(f"{ENV}WEBHOOK_SECRET") or None, **overrides)


def retry_delay(exc: BaseException) -> float | None:
    """Seconds to wait before sending again: Telegram's ``retry_after``; a second for a dropped connection; None
    for anything else (a time-out may have been delivered — sending again could duplicate the message)."""
    if isinstance(exc, RetryAfter):
        wait = exc.retry_after
        return wait.total_seconds() if hasattr(wait, "total_seconds") else float(wait)
    if isinstance(exc, NetworkError) and not isinstance(exc, BadRequest | TimedOut):
        return 1.0
    return None


def chat_of_thread(thread_id: str) -> int | None:
    """The chat a thread id belongs to: ``tg:-100123:42~ab12cd34`` → -100123."""
    m = re.match(r"^tg:(-?\d+)", thread_id or "")
    return int(m.group(1)) if m else None
