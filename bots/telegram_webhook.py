"""Webhook mode of the Telegram bot: Telegram POSTs updates to ``STACKWISE_TELEGRAM_WEBHOOK_URL``; a small ASGI app
(served by uvicorn, which stackwise already ships for its HTTP API) checks the secret token header and hands each
update to the bot's application. python-telegram-bot's own webhook server would need tornado; this needs nothing
new."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from telegram import Update

log = logging.getLogger("stackwise.telegram")
SECRET_HEADER = b"x-telegram-bot-api-secret-token"
MAX_BODY = 1 << 20


def webhook_app(bot: Any) -> Any:
    """A plain ASGI app: ``POST <path of the webhook URL>`` → the update queue; anything else 404/403/400."""
    path = urlsplit(bot.config.webhook_url).path or "/"
    secret = (bot.config.webhook_secret or "").encode()

    async def respond(send: Any, status: int) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != path or scope["method"] != "POST":
            return await respond(send, 404)
        given = dict(scope["headers"]).get(SECRET_HEADER, b"")
        if secret and not hmac.compare_digest(given, secret):
            return await respond(send, 403)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                return await respond(send, 413)
            if not message.get("more_body"):
                break
        try:
            update = Update.de_json(json.loads(body), bot.app.bot)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("a webhook body that is not an update: %s", exc)
            return await respond(send, 400)
        await bot.app.update_queue.put(update)
        await respond(send, 200)

    return app


async def run_webhook(bot: Any, *, stop: asyncio.Event | None = None, sock: Any = None) -> None:
    """Register the webhook with Telegram and serve it until interrupted (or ``stop`` is set)."""
    import uvicorn

    config = bot.config
    server = uvicorn.Server(uvicorn.Config(webhook_app(bot), host=config.webhook_listen, port=config.webhook_port,
                                           log_level="warning", lifespan="off", ws="none"))
    async with bot.app:
        await bot.app.bot.set_webhook(config.webhook_url, secret_token=config.webhook_secret,
                                      allowed_updates=["message", "callback_query"])
        await bot.on_start(bot.app)
        await bot.app.start()
        try:
            if stop is None:
                await server.serve(sockets=[sock] if sock else None)
            else:
                serving = asyncio.create_task(server.serve(sockets=[sock] if sock else None))
                await stop.wait()
                server.should_exit = True
                await serving
        finally:
            await bot.app.stop()
            await bot.on_stop(bot.app)
