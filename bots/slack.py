"""``stackwise slack``: the Slack bot (slack-bolt) — Events API over HTTP by default, Socket Mode optional.

Configuration (environment): ``SLACK_BOT_TOKEN`` (``xoxb-…``, required); ``SLACK_SIGNING_SECRET`` (HTTP mode:
every request's signature is checked, a wrong or stale one gets 401) or ``SLACK_APP_TOKEN`` (``xapp-…``: Socket
Mode, no public URL needed); ``STACKWISE_SLACK_API_URL`` (the Web API base URL, for tests or a proxy);
``STACKWISE_SLACK_ALLOWED_USERS`` (member ids; empty: everyone in the workspace) and ``STACKWISE_SLACK_ADMINS``
(ids that may launch and cancel fine-tunes; when empty, every allowed user may); ``STACKWISE_SLACK_MAX_UPLOAD_MB``
(20). In HTTP mode point the app's Event Subscriptions and Interactivity request URLs at
``http(s)://<host>/slack/events``; subscribe to ``app_mention`` and ``message.im``. Scopes: ``app_mentions:read``,
``chat:write``, ``im:history``, ``files:read``, ``files:write``.

What the bot does lives in ``bots/slack_bot.py``; rendering in ``bots/slack_render.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
from dataclasses import dataclass, field
from typing import Any

from slack_bolt import App
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

from bots import channel as C
from bots import slack_render as R
from bots.slack_bot import SlackBot

log = logging.getLogger("stackwise.slack")
ENV = "STACKWISE_SLACK_"
EVENTS_PATH = "/slack/events"
MAX_EVENT_BYTES = 1_000_000


@dataclass(kw_only=True)
class SlackConfig:
    """Everything the bot reads from the environment (see the module docstring)."""

    bot_token: str = field(repr=False)
    signing_secret: str | None = field(default=None, repr=False)
    app_token: str | None = field(default=None, repr=False)
    api_url: str | None = None
    access: C.AccessList = field(default_factory=C.AccessList)
    max_upload_bytes: int = 20 * 2**20
    edit_interval: float = 1.0     # seconds between edits of one channel's progress message
    progress_grace: float = 1.0    # a turn shorter than this shows no progress message at all
    job_poll_s: float = 5.0

    @property
    def socket_mode(self) -> bool:
        return bool(self.app_token)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> SlackConfig:
        from agent.settings import SettingsError

        env = dict(os.environ if env is None else env)
        token = env.get("SLACK_BOT_TOKEN", "").strip()
        app_token = env.get("SLACK_APP_TOKEN", "").strip() or None
        secret = env.get("SLACK_SIGNING_SECRET", "").strip() or None
        if not token.startswith("xoxb-"):
            raise SettingsError("Set SLACK_BOT_TOKEN to the app's bot token (xoxb-…, under OAuth & Permissions).")
        if app_token is not None and not app_token.startswith("xapp-"):
            raise SettingsError("SLACK_APP_TOKEN must be an app-level token (xapp-…) with connections:write.")
        if app_token is None and secret is None:
            raise SettingsError("Set SLACK_SIGNING_SECRET (HTTP mode: Basic Information → Signing Secret) or "
                                "SLACK_APP_TOKEN (Socket Mode).")
        api_url = env.get(f"{ENV}API_URL", "").strip() or None
        if api_url and not api_url.endswith("/"):
            api_url += "/"
        try:
            upload_mb = float(env.get(f"{ENV}MAX_UPLOAD_MB") or 20)
        except ValueError:
            raise SettingsError(f"{ENV}MAX_UPLOAD_MB must be a number of megabytes.") from None
        return cls(bot_token=token, signing_secret=secret, app_token=app_token, api_url=api_url,
                   access=C.AccessList.from_env(f"{ENV}ALLOWED_USERS", f"{ENV}ADMINS", env),
                   max_upload_bytes=int(upload_mb * 2**20), **overrides)


def retry_delay(exc: BaseException) -> float | None:
    """Seconds to wait before calling Slack again: a 429's ``Retry-After`` (once the client's own retries are
    spent); a second for a refused connection; None for anything else (a time-out may have been delivered)."""
    if isinstance(exc, SlackApiError) and exc.response is not None and exc.response.status_code == 429:
        headers = {k.lower(): v for k, v in (exc.response.headers or {}).items()}
        value = headers.get("retry-after", "1")
        try:
            return float(value[0] if isinstance(value, list) else value)
        except ValueError:
            return 1.0
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, ConnectionRefusedError):
        return 1.0
    return None


def make_client(config: SlackConfig) -> WebClient:
    """The Web API client: ``STACKWISE_SLACK_API_URL`` as its base, 429s retried after their ``Retry-After``."""
    kwargs = {"base_url": config.api_url} if config.api_url else {}
    return WebClient(token=config.bot_token, retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=3)],
                     **kwargs)


def build_app(bot: SlackBot, config: SlackConfig) -> App:
    """The Bolt app: requests verified (signature, timestamp), acked at once, the work handed to ``bot``."""
    app = App(client=bot.client, signing_secret=config.signing_secret,
              request_verification_enabled=config.signing_secret is not None, process_before_response=False,
              logger=logging.getLogger("stackwise.slack.bolt"))

    def on_event(ack: Any, body: dict) -> None:
        ack()
        bot.on_event(body)

    def on_action(ack: Any, body: dict) -> None:
        ack()
        bot.on_action(body)

    app.event("app_mention")(on_event)
    app.event("message")(on_event)
    app.action(R.APPROVE)(on_action)
    app.action(R.DECLINE)(on_action)
    return app


def create_asgi(app: App) -> Any:
    """The HTTP endpoint (Starlette): ``POST /slack/events`` into Bolt (in a worker thread, so a slow dispatch
    never blocks the server), ``GET /healthz``."""
    import anyio
    from slack_bolt.adapter.starlette.handler import to_bolt_request, to_starlette_response
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def events(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_EVENT_BYTES:
            return PlainTextResponse("request body too large", status_code=413)
        body = await request.body()
        if len(body) > MAX_EVENT_BYTES:
            return PlainTextResponse("request body too large", status_code=413)
        answer = await anyio.to_thread.run_sync(app.dispatch, to_bolt_request(request, body))
        return to_starlette_response(answer)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route(EVENTS_PATH, events, methods=["POST"]), Route("/healthz", healthz)])


def http_server(app: App, host: str, port: int) -> Any:
    """A uvicorn server for the endpoint (``.run(sockets=[…])`` in tests, ``.run()`` for real)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(create_asgi(app), host=host, port=port, log_level="warning",
                                         access_log=False, lifespan="off"))


def serve(settings: Any, *, host: str = "127.0.0.1", port: int = 3000, env: dict[str, str] | None = None) -> int:
    """``stackwise slack``: run until interrupted (HTTP on ``host:port``; Socket Mode when SLACK_APP_TOKEN is set)."""
    from agent import Agent

    config = SlackConfig.from_env(env)
    agent = Agent(settings, channel="slack")
    bot = SlackBot(agent, config, make_client(config), retry_delay=retry_delay)
    try:
        bot.start()
        app = build_app(bot, config)
        if config.socket_mode:
            # Not testable offline: Socket Mode needs Slack's own WebSocket server (apps.connections.open).
            from slack_bolt.adapter.socket_mode import SocketModeHandler

            SocketModeHandler(app, config.app_token).start()
        else:
            log.warning("stackwise slack: listening on http://%s:%d%s", host, port, EVENTS_PATH)
            http_server(app, host, port).run()
    finally:
        bot.stop()
        agent.close()
    return 0


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (port 0: any free one) to hand to ``http_server(...).run(sockets=[sock])``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


__all__ = ["EVENTS_PATH", "SlackBot", "SlackConfig", "build_app", "create_asgi", "http_server", "make_client",
           "retry_delay", "serve"]
