"""PostgreSQL helpers every Postgres-backed store shares (jobs now; threads and user memory later): telling a
``postgresql://`` URL from a path, showing a URL without its password, connecting with errors that say which
server could not be reached, and a stable advisory-lock key for idempotent schema set-up.

psycopg 3 is imported only when a connection is made, so SQLite users never need it.

Example:
    >>> redact("postgresql://bot:s3cret@db.internal:5433/stackwise")
    'postgresql://bot:***@db.internal:5433/stackwise'
    >>> describe("postgresql://bot:s3cret@db.internal:5433/stackwise")
    'db.internal:5433 (database stackwise, user bot)'
    >>> is_postgres_url("/home/me/.stackwise/jobs.sqlite"), is_postgres_url("postgres://db/x")
    (False, True)
"""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from memory.checkpoints import StoreError

SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT_S = 5

_USERINFO_PASSWORD = re.compile(r"(://[^/@:]*):[^/@]*@")
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&#]*")


def is_postgres_url(value: object) -> bool:
    """Whether ``value`` is a ``postgresql://`` (or ``postgres://``) URL rather than a file path."""
    return isinstance(value, str) and value.strip().lower().startswith(tuple(f"{s}://" for s in SCHEMES))


def redact(url: str) -> str:
    """``url`` with any password (``user:PASSWORD@`` or ``?password=``) shown as ``***``."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1:***@", url))


def describe(url: str) -> str:
    """Where ``url`` points, for messages: ``host:port (database D, user U)``; never the password."""
    try:
        params = conninfo(url)
    except StoreError:
        return redact(url)
    host = params.get("host") or params.get("hostaddr") or "localhost"
    where = f"{host}:{params.get('port') or 5432}"
    extra = [f"database {params['dbname']}" if params.get("dbname") else "",
             f"user {params['user']}" if params.get("user") else ""]
    extra = [e for e in extra if e]
    return f"{where} ({', '.join(extra)})" if extra else where


def conninfo(url: str) -> dict[str, Any]:
    """The connection parameters of a ``postgresql://`` URL (decoded), or :class:`StoreError` saying what is
    wrong with it (the message never shows the password)."""
    if not is_postgres_url(url):
        raise StoreError(f"{redact(str(url))!r} is not a PostgreSQL URL; it should look like "
                         "postgresql://user:password@host:5432/database.")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise StoreError(f"The database URL {redact(url)} is not valid ({_scrub(str(exc), url)}); it should look "
                         "like postgresql://user:password@host:5432/database.") from None
    psycopg = require()
    try:
        return psycopg.conninfo.conninfo_to_dict(url.strip())
    except psycopg.Error as exc:
        raise StoreError(f"The database URL {redact(url)} is not valid ({_scrub(_first_line(exc), url)}); it should "
                         "look like postgresql://user:password@host:5432/database.") from None


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead (same server, user and options)."""
    parts = urlsplit(url.strip())
    return urlunsplit(parts._replace(path=f"/{name}"))


def require() -> Any:
    """The ``psycopg`` module, or a :class:`StoreError` saying how to install it."""
    try:
        import psycopg
    except ImportError:
        raise StoreError("STACKWISE_DATABASE_URL names a PostgreSQL server, but psycopg is not installed: "
                         "pip install 'stackwise[postgres]' (or psycopg[binary]).") from None
    return psycopg


def connect(url: str, *, what: str = "database", **kwargs: Any) -> Any:
    """An autocommit psycopg connection to ``url``; :class:`StoreError` naming ``host:port`` (never the
    password) when the URL is malformed or the server cannot be reached or refuses the login.
    ``kwargs`` go to ``psycopg.connect`` (``row_factory``, …)."""
    params = conninfo(url)
    psycopg = require()
    if "connect_timeout" not in params:
        kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    try:
        return psycopg.connect(url.strip(), autocommit=True, **kwargs)
    except psycopg.Error as exc:
        raise StoreError(f"Cannot connect to the {what} at {describe(url)}: {_scrub(_first_line(exc), url)}. "
                         "Check STACKWISE_DATABASE_URL and that the server is running and reachable; "
                         "nothing was changed.") from None


def error_text(exc: BaseException, url: str) -> str:
    """A server error's first line, with the URL's password taken out should the server have echoed it."""
    return _scrub(_first_line(exc), url)


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock`` from a name such as ``"stackwise.jobs.schema"``.

    Example:
        >>> advisory_key("stackwise.jobs.schema") == advisory_key("stackwise.jobs.schema")
        True
    """
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for prefix in ("connection failed: ",):
        text = text.removeprefix(prefix)
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _scrub(text: str, url: str) -> str:
    try:
        password = urlsplit(url.strip()).password
    except ValueError:
        password = None
    secrets = {password, *re.findall(r"(?i)[?&]password=([^&#]*)", url)} - {None, ""}
    for secret in sorted(secrets | {unquote(s) for s in secrets}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
