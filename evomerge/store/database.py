"""Opening a study database, and the one place where database failures become one-line errors.

A storage URL is typed by the user (space file, `--storage`), so everything that can go wrong on
the way to a working database is a user mistake: a URL SQLAlchemy cannot parse, a database kind
it does not know, a driver that is not installed, a server that does not answer, a file that is
not SQLite, a folder that does not exist. `database_errors` turns each into a `StorageError` that
names the URL (password hidden) and what was expected, as optuna's `_create_scoped_session` maps
its errors to `StorageInternalError` in one place.

Read-only opening (`front`, `export`, `studies`) never creates a file or a table: a SQLite file is
opened with `mode=ro`, and a file that is not there is an error.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from evomerge.errors import EvomergeError
from evomerge.stop_signals import watch_connections

SQLITE_BUSY_SECONDS = 120.0  # how long a SQLite writer waits for the lock before giving up
URL_EXAMPLES = "e.g. sqlite:///path/study.db or postgresql+psycopg://user@host/db"


class StorageError(EvomergeError):
    """The study database cannot be used as given: `storage URL: what is wrong and what to do`."""


def display_url(url: str) -> str:
    """A database URL safe to print, log or write into a model card (password hidden)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a parseable URL: show nothing that could be a secret
        return re.sub(r"//[^@/]*@", "//***@", str(url))


def parse_url(url: str) -> URL:
    """The URL as SQLAlchemy reads it, with its dialect loadable; StorageError otherwise."""
    with database_errors(url):
        parsed = make_url(str(url))
        parsed.get_dialect()  # an unknown kind ("sqlit://") fails here, not at the first query
    return parsed


SQLITE_MAGIC = b"SQLite format 3\x00"


def is_sqlite_file(path: Path) -> bool:
    """Whether `path` is a SQLite database file (by its header), e.g. a study database typed
    where a space file or a URL was expected."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def sqlite_path(url: str | URL) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = make_url(str(url)) if not isinstance(url, URL) else url
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    database = parsed.database
    if database.startswith("file:"):  # a SQLite URI filename
        database = database[len("file:") :].split("?", 1)[0]
    return Path(database)


@contextmanager
def database_errors(url: str, doing: str = "") -> Iterator[None]:
    """Re-raise what SQLAlchemy, optuna's storage or a database driver raises as a StorageError."""
    try:
        yield
    except EvomergeError:
        raise
    except (SQLAlchemyError, ImportError, sqlite3.Error) as error:
        raise StorageError(storage_message(url, error, doing)) from error
    except Exception as error:
        cause = error.__cause__ or error.__context__
        if type(error).__name__ == "StorageInternalError" and cause is not None:  # optuna's wrapper
            raise StorageError(storage_message(url, cause, doing)) from error
        raise


def storage_message(url: str, error: BaseException, doing: str = "") -> str:
    """One line: which database, what went wrong, what to do."""
    where = f"storage {display_url(url)}" + (f" ({doing})" if doing else "")
    original = getattr(error, "orig", None) or error
    detail = " ".join(str(original).split()) or type(original).__name__
    lowered = detail.lower()
    if isinstance(error, ArgumentError) and "parse" in lowered:
        return f"{where}: not a database URL; expected {URL_EXAMPLES}"
    if isinstance(error, NoSuchModuleError):
        kind = str(url).split(":", 1)[0]
        return f"{where}: unknown database kind '{kind}'; expected {URL_EXAMPLES}"
    if isinstance(error, ImportError):
        module = getattr(error, "name", None) or detail
        return (
            f"{where}: the database driver '{module}' is not installed; install it, or name an installed "
            "driver in the URL (postgresql+psycopg://, the `postgres` extra)"
        )
    if "file is not a database" in lowered or "not a database" in lowered:
        return f"{where}: the file is not a SQLite database; point search.storage at a study database or a new file"
    if "malformed" in lowered or "file is encrypted" in lowered:
        return f"{where}: the SQLite file is damaged ({_first_clause(detail)}); restore it from a copy or choose another file"
    if "no such column" in lowered or "no such table" in lowered or "undefinedcolumn" in lowered.replace(" ", ""):
        return (
            f"{where}: its {'evomerge_* ' if 'evomerge_' in lowered else ''}tables have another layout than this "
            f"evomerge and optuna write ({_first_clause(detail)}); "
            "use another database for this study"
        )
    if "unable to open database file" in lowered:
        path = sqlite_path(url)
        folder = path.parent if path else None
        if folder is not None and not folder.is_dir():
            return f"{where}: the folder {folder} does not exist; create it or choose another path"
        return f"{where}: cannot open the database file (is its folder writable?)"
    if "readonly database" in lowered or "read-only" in lowered:
        return f"{where}: the database is read-only here; this command needs to write to it"
    if any(
        word in lowered
        for word in (
            "connection refused",
            "could not connect",
            "connection failed",
            "connection is bad",
            "could not translate host",
            "name or service not known",
            "timeout expired",
            "no route to host",
        )
    ):
        return f"{where}: cannot connect to the database server ({_first_clause(detail)})"
    if "password authentication failed" in lowered or "authentication failed" in lowered:
        return f"{where}: the server refused the login ({_first_clause(detail)})"
    if "does not exist" in lowered and "database" in lowered:
        return f"{where}: {_first_clause(detail)}; create the database first"
    return f"{where}: {type(original).__name__}: {_first_clause(detail)}"


def _first_clause(detail: str, limit: int = 300) -> str:
    detail = detail.split("(Background on this error")[0].strip()
    return detail if len(detail) <= limit else detail[: limit - 1] + "…"


def make_engine(url: str, *, read_only: bool = False, echo: bool = False) -> Engine:
    """An engine for the trial store: SQLite writers take the lock up front and wait for it.

    `read_only`: a SQLite file is opened with `mode=ro` (never created, never written, even by
    a pragma); it must exist.
    """
    parsed = parse_url(url)
    path = sqlite_path(parsed)
    with database_errors(url):
        if parsed.get_backend_name() != "sqlite":
            engine = create_engine(parsed, echo=echo, pool_pre_ping=True)
            watch_connections(engine)
            return engine
        if read_only and path is not None:
            if not path.is_file():
                raise StorageError(f"storage {display_url(url)}: no database file at {path}; run `evomerge run` first")
            ro_url = parsed.set(database=f"file:{path}", query={**parsed.query, "mode": "ro", "uri": "true"})
            engine = create_engine(ro_url, echo=echo, connect_args={"timeout": SQLITE_BUSY_SECONDS})
        else:
            engine = create_engine(parsed, echo=echo, connect_args={"timeout": SQLITE_BUSY_SECONDS})

    watch_connections(engine)  # a stop signal waits until the main thread's connection is back

    # pysqlite's own transaction handling starts transactions late and cannot take the write
    # lock up front; hand BEGIN over to SQLAlchemy (the recipe from SQLAlchemy's SQLite docs).
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    if not read_only:
        # A reader changes nothing in the file; the store switches it to WAL on its first write
        # (`use_wal`), as optuna's engine does when `run` opens it (`tune_sqlite`).
        @event.listens_for(engine, "connect")
        def _sync(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE: a writer waits for the lock on BEGIN (under the busy timeout) rather than
        # failing half-way when it upgrades a read lock that another writer wants too.
        write = conn.get_execution_options().get("evomerge_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def tune_sqlite(engine: Engine) -> None:
    """Write-ahead log + synchronous=NORMAL on every new connection of a SQLite engine.

    A study commits about ten small transactions per trial (optuna's ask, sampler and tell, the
    trial store); with a rollback journal and full fsync each one waits for the disk. In WAL mode with NORMAL
    sync a commit is an append, readers (optuna-dashboard) never block the writer, and a killed
    process still loses nothing it committed: only an OS crash or power cut can drop the last
    few transactions. Used for our engine and for optuna's, which share the file.
    """
    if engine.url.get_backend_name() != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        use_wal(dbapi_connection)
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    engine.dispose()  # connections opened before the listener get the pragmas when reopened


def use_wal(dbapi_connection: Any) -> None:
    """Switch a SQLite file to write-ahead logging (a property of the file, kept once set).

    Switching needs a moment of exclusive access and bypasses the busy timeout, so processes
    opening a new database together retry briefly; one that still cannot goes on in the current
    mode, as does a read-only file.
    """
    for attempt in range(40):
        try:
            if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "busy" not in str(error):
                return  # not a race with another process (a read-only file): keep its mode
            time.sleep(0.05 * (1 + attempt % 4))


def check_storage(url: str, *, must_exist: bool = False) -> str:
    """Open the study database the way `run` will, without creating anything; say what is there.

    For `validate` and for `run` before it loads models: an unparseable URL, an unknown database
    kind, a missing driver, an unreachable server, a garbage file or a missing folder is a
    StorageError. A SQLite file that does not exist yet is fine (run creates it) when its folder
    exists and is writable, unless `must_exist`.
    """
    parsed = parse_url(url)
    path = sqlite_path(parsed)
    if path is not None and not path.exists():
        if must_exist:
            raise StorageError(f"storage {display_url(url)}: no database file at {path}; run `evomerge run` first")
        folder = path.parent
        if not folder.is_dir():
            raise StorageError(
                f"storage {display_url(url)}: the folder {folder} does not exist; create it or choose another path"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StorageError(
                f"storage {display_url(url)}: the folder {folder} is not writable; a new database cannot be created there"
            )
        return "a new SQLite database (created on the first run)"
    if path is not None and path.is_dir():
        raise StorageError(f"storage {display_url(url)}: {path} is a folder; name a database file inside it")
    engine = make_engine(url, read_only=True)
    try:
        with database_errors(url), engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    if "studies" in tables or any(name.startswith("evomerge_") for name in tables):
        return "an existing study database"
    if tables:
        return f"an existing database ({len(tables)} other tables; evomerge and optuna add their own)"
    return "an empty database"
