"""PostgreSQL helpers every Postgres-backed store shares (the job records and the user memory): telling a
``postgresql://`` URL from a path, showing a URL without its password, connecting with errors that say which
server could not be reached, and a stable advisory-lock key for idempotent schema set-up.

psycopg 3 is imported only when a connection is made, so SQLite users never need it.

Example:
    >>> redact("postgresql://bot:s3cret@db.internal:5433/stackwise")
    'postgresql://bot:***@db.internal:5433/stackwise'
    >>> describe("postgresql://bot:s3cret@db.internal:5433/stackwise")
    'db.internal:5433 (database stackwise, user bot)'
    >>> is_postgres_url("jobs.sqlite"), is_postgres_url("postgres://db/x")
    (False, True)
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


class SharedConnection:
    """One autocommit psycopg connection to ``url`` for a store, shared by threads under a lock, with the server's
    ``lock_timeout`` set; :meth:`transaction` re-opens it first when the server dropped it (a restart, an idle
    timeout) and turns any database error into a :class:`StoreError` worded by ``describe``.

    ``what`` names the store in messages ("job database"); ``describe(exc) -> str`` may replace
    :meth:`describe_error` for a store with more to say; ``connect_kwargs`` go to ``psycopg.connect``.
    """

    def __init__(self, url: str, *, what: str, lock_timeout_s: float, describe_error: Any = None,
                 **connect_kwargs: Any):
        self.url, self.what = url, what
        self.where = describe(url)
        self.psycopg = require()
        self.lock_timeout_s = lock_timeout_s
        self._describe = describe_error or self.describe_error
        self._kwargs = connect_kwargs
        self._lock = threading.RLock()
        self._conn = self._connect()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self, begin: str = "BEGIN") -> Iterator[Any]:
        """The connection inside one transaction opened with ``begin``; committed when the block ends, rolled
        back when it raises."""
        errors = self.psycopg.Error
        with self._lock:
            try:
                if self._conn.closed or self._conn.broken:
                    self._reconnect()
                try:
                    self._conn.execute(begin)
                except self.psycopg.OperationalError:   # found dead only now; nothing was done yet
                    self._reconnect()
                    self._conn.execute(begin)
            except errors as exc:
                raise StoreError(self._describe(exc)) from None
            try:
                yield self._conn
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, errors):
                    raise StoreError(self._describe(exc)) from None
                raise
            try:
                self._conn.execute("COMMIT")
            except errors as exc:
                self._rollback()
                raise StoreError(self._describe(exc)) from None

    def describe_error(self, exc: BaseException) -> str:
        return failure_text(exc, self.url, self.what)

    def _connect(self) -> Any:
        conn = connect(self.url, what=self.what, **self._kwargs)
        try:
            ms = max(1, round(self.lock_timeout_s * 1000))
            conn.execute("SELECT set_config('lock_timeout', %s, false)", [f"{ms}ms"])
        except self.psycopg.Error as exc:
            conn.close()
            raise StoreError(self._describe(exc)) from None
        return conn

    def _reconnect(self) -> None:
        self._conn.close()
        self._conn = self._connect()

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except self.psycopg.Error:
            pass   # a dropped connection has no transaction left to roll back; the next one reconnects


def failure_text(exc: BaseException, url: str, what: str) -> str:
    """What went wrong with the server behind ``url`` (``what``: "job database"…), and what to do about it; never
    the password."""
    reason = error_text(exc, url)
    if isinstance(exc, require().OperationalError):
        return (f"The {what} at {describe(url)} cannot be used: {reason}. Check that the server is running "
                "and reachable; nothing was changed.")
    return f"The {what} at {describe(url)} failed: {reason}. Nothing was changed."


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
