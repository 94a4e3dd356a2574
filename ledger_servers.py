"""ledger_servers.py: PostgreSQL and Redis stores for ledger.py, for workers on several machines.

A companion of ledger.py: copy both files side by side (or pip install
'tool-ledger[postgres]' / 'tool-ledger[redis]', which installs both and the
driver). ledger.py loads this file when a store URL names a server, so user code
only ever imports ledger. Every worker gets the same two settings::

    LEDGER_SECRET=<the same random key everywhere> LEDGER_DB=postgresql://app@db.internal:5432/agents python agent.py

or passes them to a guard::

    from ledger import Guard
    guard = Guard("redis://cache.internal:6379/0?prefix=agents:", secret=key)

Store URLs (also in $LEDGER_DB):

    postgresql://user[:password]@host[:port]/database[?table=ledger]   (or postgres://)
        any libpq parameter also works, such as ?sslmode=require; the table
        (optionally schema.table) is created on first use
    redis://[[user]:password@]host[:port][/db][?prefix=ledger:]        (rediss:// for TLS)

The drivers are imported only when a store opens: psycopg 3 (pip install
'psycopg[binary]') and redis-py (pip install redis); without one, opening the
store says in one line what to install.

LEDGER_SECRET is required: records are signed with it, and a key kept beside
the records on the server would not protect them. Set it to the same random value
on every worker (python -c 'import secrets; print(secrets.token_hex(32))') or
pass Guard(secret=...); without it the first call fails before its tool runs.

What each store guarantees, and how:

- Claims and transitions are atomic on the server: a claim is one INSERT ... ON
  CONFLICT DO NOTHING (PostgreSQL) or one Lua script (Redis); a transition is one
  UPDATE or script that takes effect only while the record still has the epoch
  and owner of the caller's lease (fencing), so a worker whose lease was taken
  over can no longer write.
- Claiming a call and reading the record that already holds it are one round
  trip (insert_or_get: one statement, one script), so a new call takes two round
  trips (claim, then complete) and a recorded one takes one.
- A connection that breaks mid-operation is retried once on a new connection,
  after reading back whether the claim or transition already took effect: never
  lost, never applied twice. Driver errors become ledger.StoreError, without
  the password.
- Leases and ttl windows run on the server's clock, measured against each
  worker's monotonic clock, so a worker whose wall clock steps moves no lease.
- Waiters in every process, threads and coroutines alike, wake when the record
  they wait for leaves RUNNING: LISTEN/NOTIFY on PostgreSQL, pub/sub on Redis,
  through one listener thread per store and process. A missed message costs a
  waiter its poll interval, never its result.
- Both stores are safe across fork(): a child opens its own connections.
- PostgreSQL: every statement has a time limit (PG_STATEMENT_TIMEOUT,
  PG_LOCK_TIMEOUT), so a stuck row lock fails a statement instead of a lease.
- Redis (6.2 or later, a single primary, not Cluster): the guarantees last as
  long as Redis keeps its data, so run it with appendonly yes (see the README on
  persistence). A record with a ttl expires on the server REDIS_EXPIRY_GRACE
  seconds after its window ends.

The file reads in the order of its sections: drivers and their errors -> what
both stores share (retries, the server's clock, wakeups) -> PostgreSQL -> Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import ledger
from ledger import (
    PRUNABLE, PRUNE_BATCH, RECORD_FIELDS, SCHEMA_VERSION, STATE_FIELDS, _SQL_PRUNE_INDEXES, ConfigError, Record,
    Status, Store, StoreError, _sql_prune_passes, _sqlite_type, _tally, log,
)

__all__ = ["PostgresStore", "RedisStore"]


# ---------------------------------------------------------------------------
# Drivers and their errors. A driver is imported when its store opens, or the
# store says in one line what installs it. A break of the connection is
# _Dropped (the operation may or may not have taken effect, so the caller reads
# back before trying again); any other driver error becomes a StoreError, on one
# line and without the password.
# ---------------------------------------------------------------------------

def _require(module: str, package: str, what: str) -> Any:
    """Import an optional driver, or say in one line what installs it (the driver itself: a
    user who copied ledger.py has no extras to install)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the {module} package: pip install '{package}'") from None


def _reason(error: BaseException, secret: str | None) -> str:
    """A driver's error message on one line, without the password."""
    text = " ".join(str(error).split()).rstrip(".") or type(error).__name__
    return text.replace(secret, "***") if secret else text


class _Dropped(StoreError):
    """The connection broke during an operation, which may or may not have taken effect."""


# ---------------------------------------------------------------------------
# What both server stores share: the Store interface on top of each one's
# primitives (_get, _insert, ...), one retry after a dropped connection that
# never applies a claim or a transition twice, the server's clock as the lease
# clock, and _Wakeups: one listener thread per store and process that wakes the
# threads and coroutines waiting for a record to leave RUNNING.
# ---------------------------------------------------------------------------

class _ServerStore(Store):
    """What the stores on a database server share. Driver errors become StoreError.
    An operation whose connection broke is tried once more on a new connection; a
    claim (insert, insert_or_get) or transition (swap) is first read back, so that one which took
    effect before the break is neither lost nor applied twice. Counters are not
    retried: a failed add_counts stays buffered in the engine for its next flush.

    The lease clock is the server's: each process measures the server clock's lead
    over its own monotonic clock (to within half a round trip), again every
    CLOCK_RESYNC seconds, so a step of a worker's wall clock moves no lease.

    Subclasses implement _get, _insert, _insert_or_get (in one round trip), _swap, _delete,
    _records, _clear, _prune, add_counts, _server_time() (the server's clock, in seconds) and
    _listen(deliver, stopped), which relays "record left RUNNING" messages.
    """

    where = "?"
    shared_looks = True   # a look is a round trip: concurrent ones in a process share one

    def __init__(self) -> None:
        self._wakeups = _Wakeups(self._listen, f"ledger-wakeups {self.where}")
        self._clock_lead, self._clock_due = 0.0, -math.inf

    def now(self) -> float:
        mono = time.monotonic()
        if mono >= self._clock_due:
            self._sync_clock()
            mono = time.monotonic()
        return mono + self._clock_lead

    def _sync_clock(self) -> None:
        """Measure the server clock's lead over this process's monotonic clock. The first
        measurement must succeed; a later failure keeps the last one and tries again soon."""
        before = time.monotonic()
        try:
            server = self._again(self._server_time)
        except StoreError as e:
            if self._clock_due == -math.inf:
                raise
            log.warning("%s: could not read the server's clock (%s); using the last reading", self.where, e)
            self._clock_due = time.monotonic() + 1.0
            return
        after = time.monotonic()
        self._clock_lead, self._clock_due = server - (before + after) / 2, after + CLOCK_RESYNC

    def get(self, id: str) -> Record | None:
        return self._again(self._get, id)

    def insert(self, record: Record) -> bool:
        return self._claim_once(self._insert, record, lambda stored: _is_claim(stored, record))

    def insert_or_get(self, id: str, claim: Callable[[], Record]) -> Record | None:
        record = claim()   # sent with the read: one round trip either way
        return self._claim_once(self._insert_or_get, record,
                                lambda stored: record if _is_claim(stored, record) else stored)

    def _claim_once(self, claim: Callable[[Record], Any], record: Record, answer: Callable[[Record], Any]) -> Any:
        """claim(record); after a break, what it answered is read back: with no record stored
        the claim is made again, else answer(the stored record) says whether it was this one."""
        try:
            return claim(record)
        except _Dropped:
            stored = self._get(record.id)
            return claim(record) if stored is None else answer(stored)

    def swap(self, record: Record, epoch: int, owner: str) -> bool:
        try:
            return self._swap(record, epoch, owner)
        except _Dropped:
            stored = self._get(record.id)
            if stored is not None and all(getattr(stored, f) == getattr(record, f) for f in STATE_FIELDS):
                return True
            if stored is None or (stored.epoch, stored.owner) != (epoch, owner):
                return False
            return self._swap(record, epoch, owner)

    def delete(self, id: str, epoch: int | None = None) -> bool:
        return self._again(self._delete, id, epoch)

    def records(self, workflow: str | None = None, tool: str | None = None) -> list[Record]:
        return self._again(self._records, workflow, tool)

    def clear(self, workflow: str | None = None) -> int:
        return self._again(self._clear, workflow)

    def prune(self, before: float, now: float, statuses: tuple[str, ...] = PRUNABLE, workflow: str | None = None,
              dry_run: bool = False, batch: int | None = None) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}

        def attempt() -> None:
            # Tried again after a break: a deletion adds to what the batches before it deleted,
            # a dry run counts from the start.
            if dry_run:
                counts.clear()
            self._prune(before, now, statuses, workflow, dry_run, batch or PRUNE_BATCH, counts)
        self._again(attempt)
        return counts

    def wait(self, id: str, timeout: float) -> None:
        self._wakeups.wait(id, timeout)

    async def wait_async(self, id: str, timeout: float) -> None:
        await self._wakeups.wait_async(id, timeout)

    def close(self) -> None:
        self._wakeups.closed = True

    def secret(self) -> bytes:
        raise ConfigError(
            f"{type(self).__name__} keeps no signing key (one stored beside the records would not protect "
            f"them): set LEDGER_SECRET to the same random value on every worker, for example the output of "
            f"python -c 'import secrets; print(secrets.token_hex(32))', or pass Guard(secret=...)")

    @staticmethod
    def _again(operation: Callable, *args: Any) -> Any:
        try:
            return operation(*args)
        except _Dropped:
            return operation(*args)

    def _listen(self, deliver: Callable[[str], None], stopped: Callable[[], bool]) -> None:
        raise NotImplementedError

    def _server_time(self) -> float:
        raise NotImplementedError


def _is_claim(stored: Record, record: Record) -> bool:
    """Whether the stored record is the claim `record`, which took effect before a break."""
    return (stored.epoch, stored.owner) == (record.epoch, record.owner)


CLOCK_RESYNC = 10.0   # seconds between measurements of a server's clock


class _Wakeups:
    """Wakes this process's waiters when the server says a record left RUNNING.

    One daemon thread per store and process listens, started by the first wait.
    A waiting thread blocks on an Event; a waiting coroutine awaits a future that
    the listener resolves on the coroutine's own loop (call_soon_threadsafe), so
    neither blocks an event loop nor costs a thread. A message missed (while it
    connects, or reconnects after a break) only costs a waiter its timeout, after
    which the engine reads the record again.
    """

    def __init__(self, listen: Callable[[Callable[[str], None], Callable[[], bool]], None], name: str):
        self.listen, self.name = listen, name
        self.waiting: dict[str, list[Callable[[], None]]] = {}
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.closed = False

    def wait(self, id: str, timeout: float) -> None:
        woken = threading.Event()
        with self._waiting(id, woken.set):
            woken.wait(timeout)

    async def wait_async(self, id: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake() -> None:   # on the listener thread
            with contextlib.suppress(RuntimeError):   # that loop has closed; nobody is waiting there
                loop.call_soon_threadsafe(ledger._resolve, [woken])
        with self._waiting(id, wake):
            await asyncio.wait([woken], timeout=timeout)

    @contextlib.contextmanager
    def _waiting(self, id: str, wake: Callable[[], None]) -> Iterator[None]:
        """`wake` is called (on the listener thread) while the block runs, if id leaves RUNNING."""
        if self.pid != os.getpid():
            self._start()
        with self.lock:
            self.waiting.setdefault(id, []).append(wake)
        try:
            yield
        finally:
            with self.lock:
                wakes = self.waiting.get(id, [])
                if wake in wakes:
                    wakes.remove(wake)
                if not wakes:
                    self.waiting.pop(id, None)

    def deliver(self, id: str) -> None:
        with self.lock:
            for wake in self.waiting.get(id, ()):
                wake()

    def _start(self) -> None:
        # First wait in this process (also after fork(), which leaves the thread behind).
        self.lock, self.waiting, self.pid = threading.Lock(), {}, os.getpid()
        threading.Thread(target=self._loop, args=(self.pid,), name=self.name, daemon=True).start()

    def _loop(self, pid: int) -> None:
        def stopped() -> bool:
            return self.closed or self.pid != pid
        while not stopped():
            try:
                self.listen(self.deliver, stopped)
            except Exception as e:
                log.debug("%s: %s; listening again shortly", self.name, e)
                time.sleep(0.5)

# ---------------------------------------------------------------------------
# PostgreSQL: one table, one autocommitted statement per operation on a small
# pool of connections per process; a record leaving RUNNING is a NOTIFY on the
# channel named after the table, in the statement that writes it.
# ---------------------------------------------------------------------------

_PG_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,30}"   # so that "schema.table" fits a NOTIFY channel name
_PG_TYPES = {"INTEGER": "bigint", "REAL": "double precision", "TEXT": "text"}
_PG_DEFAULTS = {"connect_timeout": "10", "application_name": "ledger.py",
                "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3"}
# Every statement has a bounded time: one stuck behind another session's row lock
# fails (and is retried by its caller) instead of stopping a lease renewal for good.
PG_STATEMENT_TIMEOUT, PG_LOCK_TIMEOUT = 10.0, 5.0
_PG_IDLE_CONNECTIONS = 8
_PG_SCHEMA_COMMENT = "ledger.py records, schema "


class PostgresStore(_ServerStore):
    """Records in one PostgreSQL table, shared by every worker that reaches the server.

    Each operation is one autocommitted statement (a claim is one INSERT ... ON
    CONFLICT DO NOTHING, which also returns the record it conflicts with; a transition
    one conditional UPDATE), on a small pool of connections per process; a child
    process after fork() opens its own. The table
    (`table`, optionally schema-qualified) is created on first use. Waiters in other
    processes are woken by NOTIFY when a record leaves RUNNING. Needs the `postgres`
    extra (psycopg 3).
    """

    def __init__(self, dsn: str, *, table: str = "ledger"):
        self._pg = _require("psycopg", "psycopg[binary]", "PostgresStore")
        if not re.fullmatch(rf"(?:{_PG_NAME}\.)?{_PG_NAME}", table):
            raise ConfigError(f"PostgresStore table must be a name like 'ledger' or 'myschema.ledger' "
                              f"(letters, digits, _), not {table!r}")
        self.table = table
        self._quoted = ".".join(f'"{part}"' for part in table.split("."))
        try:
            params = self._pg.conninfo.conninfo_to_dict(dsn)
        except self._pg.Error:
            raise ConfigError("cannot parse the PostgreSQL URL or DSN: use postgresql://user[:password]@host"
                              "[:port]/database, for example postgresql://app@db.internal:5432/agents") from None
        self._password = params.get("password")
        timeouts = (f"-c statement_timeout={int(PG_STATEMENT_TIMEOUT * 1000)} "
                    f"-c lock_timeout={int(PG_LOCK_TIMEOUT * 1000)}")
        self._params = {**_PG_DEFAULTS, **params, "options": f"{timeouts} {params.get('options', '')}".strip()}
        host = params.get("host") or os.environ.get("PGHOST") or "localhost"
        port = params.get("port") or os.environ.get("PGPORT") or "5432"
        self.where = f"{host}:{port}"
        user = params.get("user") or os.environ.get("PGUSER") or ""
        self.url = f"postgresql://{user + '@' if user else ''}{self.where}/{params.get('dbname', '')}?table={table}"
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._statements()
        super().__init__()
        self._migrate()
        self._sync_clock()

    # -- connections -------------------------------------------------------

    def _connect(self) -> Any:
        try:
            return self._pg.connect(**self._params, autocommit=True)
        except self._pg.Error as e:
            raise StoreError(f"cannot connect to PostgreSQL at {self.where} (database "
                             f"{self._params.get('dbname', '?')!r}, user {self._params.get('user', '?')!r}): "
                             f"{_reason(e, self._password)} (check the store URL or LEDGER_DB, and that the "
                             f"server is running)") from None

    def _take(self) -> Any:
        if self._pid != os.getpid():
            # After fork() the parent's connections stay the parent's: a child that
            # used (or closed) one would corrupt the parent's session.
            self._lock, self._idle, self._pid = threading.Lock(), [], os.getpid()
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give(self, conn: Any) -> None:
        with self._lock:
            if len(self._idle) < _PG_IDLE_CONNECTIONS and self._pid == os.getpid():
                self._idle.append(conn)
                return
        conn.close()

    def _forget_idle(self) -> None:
        # One broken connection means the others (idle since) are broken too, as after a restart.
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _run(self, sql: str, params: Iterable = (), rows: bool = False) -> Any:
        conn = self._take()
        try:
            cursor = conn.execute(sql, params)
            result = cursor.fetchall() if rows else cursor.rowcount
        except self._pg.Error as e:
            if conn.broken or conn.closed:
                conn.close()
                self._forget_idle()
                raise _Dropped(f"PostgreSQL at {self.where}: connection lost ({_reason(e, self._password)})") \
                    from e
            self._give(conn)
            raise StoreError(f"PostgreSQL at {self.where}, table {self.table}: {_reason(e, self._password)}") from e
        except BaseException:
            # Not the server's answer (a value psycopg cannot encode, an interrupt mid-statement):
            # the connection's state is unknown, so it is closed rather than pooled or left open.
            conn.close()
            raise
        self._give(conn)
        return result

    # -- schema ------------------------------------------------------------

    def _statements(self) -> None:
        t, columns = self._quoted, ", ".join(RECORD_FIELDS)
        insert = (f"INSERT INTO {t} ({columns}) VALUES ({', '.join(['%s'] * len(RECORD_FIELDS))}) "
                  f"ON CONFLICT (id) DO NOTHING")
        swap = (f"UPDATE {t} SET {', '.join(f'{f} = %s' for f in STATE_FIELDS)} "
                f"WHERE id = %s AND epoch = %s AND owner = %s")
        self._sql = {
            "get": f"SELECT {columns} FROM {t} WHERE id = %s",
            "insert": insert,
            # A claim, or else the record it conflicts with, in one round trip: one row of (whether
            # it inserted, the stored record as the statement's snapshot shows it, else NULLs).
            "insert_or_get": f"WITH claimed AS ({insert} RETURNING id) "
                             f"SELECT (SELECT count(*) FROM claimed), r.* FROM (SELECT 1) AS one "
                             f"LEFT JOIN (SELECT {columns} FROM {t} WHERE id = %s) AS r ON true",
            "swap": swap,
            # A record leaving RUNNING wakes waiters in other processes, in the same statement.
            "finish": f"WITH done AS ({swap} RETURNING id) SELECT pg_notify(%s, id) FROM done",
            "delete": f"DELETE FROM {t} WHERE id = %s",
            "delete_at": f"DELETE FROM {t} WHERE id = %s AND epoch = %s",
            # Rows are locked in id order, so two concurrent flushes cannot deadlock; a row
            # another session holds locked is skipped, not waited for, and its id returned.
            "add_counts": f"WITH v AS (SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS v(id, a, b)), "
                          f"locked AS MATERIALIZED (SELECT t.id FROM {t} t JOIN v ON t.id = v.id "
                          f"ORDER BY t.id FOR UPDATE OF t SKIP LOCKED), "
                          f"done AS (UPDATE {t} t SET attempts = t.attempts + v.a, blocked = t.blocked + v.b "
                          f"FROM v JOIN locked ON locked.id = v.id WHERE t.id = v.id RETURNING t.id) "
                          f"SELECT v.id FROM v JOIN {t} t ON t.id = v.id WHERE v.id NOT IN (SELECT id FROM done)",
            "records": f"SELECT {columns} FROM {t}",
            "clear": f"DELETE FROM {t}",
        }

    def _schema_version(self) -> int | None:
        """None if the table does not exist yet; StoreError if it is not a ledger table."""
        exists, comment = self._run("SELECT to_regclass(%s) IS NOT NULL, obj_description(to_regclass(%s), "
                                    "'pg_class')", (self._quoted, self._quoted), rows=True)[0]
        if not exists:
            return None
        if not (comment or "").startswith(_PG_SCHEMA_COMMENT):
            raise StoreError(f"table {self.table} in PostgreSQL at {self.where} exists but is not a ledger.py "
                             f"table; choose another with PostgresStore(..., table=...) or ?table= in the URL")
        return int(comment[len(_PG_SCHEMA_COMMENT):])

    def _migrate(self) -> None:
        version = self._schema_version()
        if version is None or version < SCHEMA_VERSION:
            self._create()  # idempotent: creates the table or upgrades an older one
            version = self._schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(f"table {self.table} in PostgreSQL at {self.where} was written by a newer "
                             f"ledger.py (schema {version}); upgrade ledger.py")
        if version < SCHEMA_VERSION:
            self._run(f"COMMENT ON TABLE {self._quoted} IS '{_PG_SCHEMA_COMMENT}{SCHEMA_VERSION}'")

    def _create(self) -> None:
        columns = ", ".join(f"{f} {_PG_TYPES[_sqlite_type(f)]}" for f in RECORD_FIELDS)
        index = '"' + self.table.split(".")[-1] + '_workflow"'
        conn = self._take()
        try:
            with conn.transaction():
                # Serialize creation: concurrent CREATE TABLE IF NOT EXISTS can collide.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("ledger.py " + self.table,))
                conn.execute(f"CREATE TABLE IF NOT EXISTS {self._quoted} ({columns}, PRIMARY KEY (id))")
                conn.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {self._quoted} (workflow, created)")
                for name, definition in _SQL_PRUNE_INDEXES:
                    conn.execute(f'CREATE INDEX IF NOT EXISTS "{self.table.split(".")[-1]}_{name}" '
                                 f'ON {self._quoted} {definition}')
                conn.execute(f"COMMENT ON TABLE {self._quoted} IS '{_PG_SCHEMA_COMMENT}{SCHEMA_VERSION}'")
        except self._pg.Error as e:
            conn.close()
            raise StoreError(f"cannot create table {self.table} in PostgreSQL at {self.where}: "
                             f"{_reason(e, self._password)}") from e
        self._give(conn)

    # -- the Store interface ---------------------------------------------------

    def _get(self, id: str) -> Record | None:
        rows = self._run(self._sql["get"], (id,), rows=True)
        return Record(*rows[0]) if rows else None

    def _insert(self, record: Record) -> bool:
        return self._run(self._sql["insert"], [getattr(record, f) for f in RECORD_FIELDS]) == 1

    def _insert_or_get(self, record: Record) -> Record | None:
        values = [getattr(record, f) for f in RECORD_FIELDS] + [record.id]
        while True:
            (inserted, *stored), = self._run(self._sql["insert_or_get"], values, rows=True)
            if inserted:
                return record
            if stored[0] is not None:
                return Record(*stored)
            # The record it conflicts with was committed after this statement's snapshot was
            # taken, so the statement could not read it; a new statement can (unless it was
            # deleted since, and the claim is tried again).
            found = self._get(record.id)
            if found is not None:
                return found

    def _swap(self, record: Record, epoch: int, owner: str) -> bool:
        values = [getattr(record, f) for f in STATE_FIELDS] + [record.id, epoch, owner]
        if record.status == Status.RUNNING:
            return self._run(self._sql["swap"], values) == 1
        return len(self._run(self._sql["finish"], values + [self.table], rows=True)) == 1

    def _delete(self, id: str, epoch: int | None) -> bool:
        if epoch is None:
            return self._run(self._sql["delete"], (id,)) == 1
        return self._run(self._sql["delete_at"], (id, epoch)) == 1

    def add_counts(self, counts: Mapping[str, tuple[int, int]]) -> list[str]:
        ids = sorted(counts)
        skipped = self._run(self._sql["add_counts"], (ids, [counts[i][0] for i in ids], [counts[i][1] for i in ids]),
                            rows=True)
        return [id for id, in skipped]

    def _records(self, workflow: str | None, tool: str | None) -> list[Record]:
        where = [(name, value) for name, value in (("workflow", workflow), ("tool", tool)) if value is not None]
        sql = self._sql["records"] + "".join((" WHERE " if i == 0 else " AND ") + f"{name} = %s"
                                             for i, (name, _) in enumerate(where))
        return [Record(*row) for row in self._run(sql + " ORDER BY created", [v for _, v in where], rows=True)]

    def _clear(self, workflow: str | None) -> int:
        if workflow is None:
            return self._run(self._sql["clear"])
        return self._run(self._sql["clear"] + " WHERE workflow = %s", (workflow,))

    def _prune(self, before: float, now: float, statuses: tuple[str, ...], workflow: str | None, dry_run: bool,
               batch: int, counts: dict[tuple[str, str], int]) -> None:
        for where, params in _sql_prune_passes(before, now, statuses, workflow, "%s"):
            if dry_run:
                for status, tool, n in self._run(f"SELECT status, tool, count(*) FROM {self._quoted} WHERE {where} "
                                                 f"GROUP BY status, tool", params, rows=True):
                    _tally(counts, status, tool, n)
                continue
            # Candidates come through the index; each is then locked, skipping those another
            # statement holds (prune never waits, so it cannot deadlock with a claim or a flush
            # of counters), and checked again on its latest version: a record claimed since
            # the scan is left alone. Skipped ones go in a later batch or a later prune.
            t = self._quoted
            sql = (f"WITH candidates AS (SELECT id FROM {t} WHERE {where} LIMIT {int(batch)}), "
                   f"locked AS MATERIALIZED (SELECT r.id FROM {t} r JOIN candidates c ON r.id = c.id "
                   f"WHERE {where} ORDER BY r.id FOR UPDATE OF r SKIP LOCKED) "
                   f"DELETE FROM {t} r USING locked WHERE r.id = locked.id RETURNING r.status, r.tool")
            while rows := self._run(sql, params + params, rows=True):
                for status, tool in rows:
                    _tally(counts, status, tool)

    def _server_time(self) -> float:
        return self._run("SELECT extract(epoch FROM clock_timestamp())::float8", rows=True)[0][0]

    def _listen(self, deliver: Callable[[str], None], stopped: Callable[[], bool]) -> None:
        conn = self._connect()
        try:
            conn.execute(f'LISTEN "{self.table}"')
            while not stopped():
                for note in conn.notifies(timeout=1.0):
                    deliver(note.payload)
        finally:
            conn.close()

    def close(self) -> None:
        super().close()
        if self._pid == os.getpid():
            self._forget_idle()

# ---------------------------------------------------------------------------
# Redis: one Lua script per operation, atomic on the server; a record leaving
# RUNNING is published on PREFIX done by the script that writes it.
# ---------------------------------------------------------------------------

# Each Redis operation is one Lua script, atomic on the server. A record is a
# hash under PREFIX r:ID (a field per Record field; None is an absent field);
# PREFIX w:WORKFLOW is a sorted set of a workflow's ids by creation time, and
# PREFIX workflows the set of workflow names. Keys a script derives (rather
# than receives) make these scripts unfit for Redis Cluster.

# PREFIX f:WORKFLOW holds the workflow's finished (prunable) ids by the time they
# finished, PREFIX x:WORKFLOW those with a ttl by the end of their window: prune
# reads its candidates there, and checks each record itself before deleting it.
_REDIS_INDEX_FINISHED = """
local PRUNABLE = {""" + ", ".join(f"{s} = true" for s in PRUNABLE) + """}
local function index_finished(record, id, finished, expiring)
  local s = redis.call('HMGET', record, 'status', 'updated', 'expires')
  if PRUNABLE[s[1]] then
    redis.call('ZADD', finished, s[2], id)
    if s[3] then redis.call('ZADD', expiring, s[3], id) else redis.call('ZREM', expiring, id) end
  else
    redis.call('ZREM', finished, id)
    redis.call('ZREM', expiring, id)
  end
end
"""

# A claim: 1 if it inserted, else the stored record (HGETALL), left alone.
_REDIS_INSERT = _REDIS_INDEX_FINISHED + """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
index_finished(KEYS[1], ARGV[1], KEYS[4], KEYS[5])
if ARGV[4] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
-- Forget the index entries of a few records that expired: sampling two per
-- insert keeps an index within about twice the records still alive.
for _, other in ipairs(redis.call('ZRANDMEMBER', KEYS[2], 2)) do
  if redis.call('EXISTS', ARGV[5] .. other) == 0 then redis.call('ZREM', KEYS[2], other) end
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"""

_REDIS_SWAP = _REDIS_INDEX_FINISHED + """
local current = redis.call('HMGET', KEYS[1], 'epoch', 'owner')
if current[1] ~= ARGV[1] or current[2] ~= ARGV[2] then return 0 end
local nils = tonumber(ARGV[6])
if nils > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 7, 6 + nils)) end
redis.call('HSET', KEYS[1], unpack(ARGV, 7 + nils))
index_finished(KEYS[1], ARGV[5], KEYS[2], KEYS[3])
if ARGV[3] == '' then redis.call('PERSIST', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""

_REDIS_DELETE = """
local found = redis.call('HMGET', KEYS[1], 'epoch', 'workflow')
if not found[1] or (ARGV[1] ~= '' and found[1] ~= ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[2] .. found[2], ARGV[3])
redis.call('ZREM', ARGV[4] .. found[2], ARGV[3])
redis.call('ZREM', ARGV[5] .. found[2], ARGV[3])
return 1
"""

_REDIS_ADD_COUNTS = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 'attempts', ARGV[2 * i - 1])
    redis.call('HINCRBY', key, 'blocked', ARGV[2 * i])
  end
end
return 0
"""

_REDIS_CLEAR = """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
local removed = 0
for _, id in ipairs(ids) do removed = removed + redis.call('DEL', ARGV[1] .. id) end
if #ids > 0 then
  for _, index in ipairs({KEYS[1], KEYS[3], KEYS[4]}) do redis.call('ZREM', index, unpack(ids)) end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('DEL', KEYS[3], KEYS[4])  -- and the ids of records that expired on the server
end
return {removed, #ids}
"""

# One batch of one pass of prune over one workflow's index KEYS[1] (x: for the
# ttl'd records whose window ended, f: for the others finished before `before`),
# from the first `offset` entries kept. KEYS[2..5]: the workflow's w:, f: and x:
# indexes and the set of workflow names. Returns {entries seen, entries kept,
# status, tool, status, tool, ... of each record deleted (or, dry, to delete)}.
_REDIS_PRUNE = _REDIS_INDEX_FINISHED + """
local bound, now, before = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local prefix, limit, offset, pass, dry = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8] == '1'
local wanted = {}
for i = 10, #ARGV do wanted[ARGV[i]] = true end
local ids = redis.call('ZRANGE', KEYS[1], '-inf', bound, 'BYSCORE', 'LIMIT', offset, limit)
local result, kept = {#ids, 0}, 0
for _, id in ipairs(ids) do
  local r = redis.call('HMGET', prefix .. id, 'status', 'tool', 'updated', 'expires')
  local expired = r[4] and tonumber(r[4]) <= now
  if not PRUNABLE[r[1]] then
    -- expired on the server, or running again: no longer an entry of these indexes
    if dry then kept = kept + 1 else redis.call('ZREM', KEYS[3], id); redis.call('ZREM', KEYS[4], id) end
  elseif wanted[r[1]] and ((pass == 'x' and expired) or (pass == 'f' and not expired and tonumber(r[3]) < before)) then
    if dry then
      kept = kept + 1
    else
      redis.call('DEL', prefix .. id)
      for i = 2, 4 do redis.call('ZREM', KEYS[i], id) end
    end
    table.insert(result, r[1])
    table.insert(result, r[2])
  else
    kept = kept + 1
  end
end
result[2] = kept
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SREM', KEYS[5], ARGV[9]) end  -- no record left
return result
"""

_REDIS_SCHEMA = """
local version = tonumber(redis.call('GET', KEYS[1]) or '0')
if version >= tonumber(ARGV[1]) then return version end
redis.call('SET', KEYS[1], ARGV[1])
return tonumber(ARGV[1])
"""

REDIS_EXPIRY_GRACE = 60.0   # seconds a ttl'd record outlives its expiry on the server
_REDIS_BATCH = 500
_REDIS_KINDS = {"INTEGER": int, "REAL": float, "TEXT": str}


class RedisStore(_ServerStore):
    """Records in Redis (6.2 or later, not Cluster), shared by every worker that reaches it.

    Each operation is one Lua script, so claims and transitions are atomic on the
    server; a claim that finds a record returns it in the same script. A record with
    a ttl expires on the server REDIS_EXPIRY_GRACE seconds after its ttl ran out.
    Waiters in other processes are woken by pub/sub. The
    guarantees last only as long as Redis keeps its data: see the README on
    persistence (appendonly yes). Needs the `redis` extra (redis-py).
    """

    def __init__(self, url: str, *, prefix: str = "ledger:"):
        redis = self._redis = _require("redis", "redis", "RedisStore")
        parts = urllib.parse.urlsplit(url)
        self._password = parts.password
        try:
            self.where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
            db = parts.path.strip("/") or "0"
        except ValueError:
            raise ConfigError("cannot parse the Redis URL: use redis://[:password@]host[:port][/db] or "
                              "rediss:// for TLS, for example redis://cache.internal:6379/0") from None
        self.prefix = prefix
        self.url = f"{parts.scheme}://{self.where}/{db}?prefix={prefix}"
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        try:
            # No silent retries by the driver: a retried claim could look like a duplicate.
            # _ServerStore retries, after reading back what took effect.
            self._client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=10,
                                                socket_connect_timeout=5, client_name="ledger.py")
        except ValueError as e:
            raise ConfigError(f"cannot parse the Redis URL for {self.where}: {_reason(e, self._password)}") from None
        self._scripts = {name: self._client.register_script(lua) for name, lua in (
            ("insert", _REDIS_INSERT), ("swap", _REDIS_SWAP), ("delete", _REDIS_DELETE),
            ("add_counts", _REDIS_ADD_COUNTS), ("clear", _REDIS_CLEAR), ("schema", _REDIS_SCHEMA),
            ("prune", _REDIS_PRUNE))}
        self._fields = {f: _REDIS_KINDS[_sqlite_type(f)] for f in RECORD_FIELDS}
        super().__init__()
        self._migrate()
        self._sync_clock()

    def _call(self, operation: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return operation(*args, **kwargs)
        except (self._redis.ConnectionError, self._redis.TimeoutError) as e:
            raise _Dropped(f"Redis at {self.where}: {_reason(e, self._password)} (check the store URL or "
                           f"LEDGER_DB, and that the server is running)") from None
        except self._redis.RedisError as e:
            raise StoreError(f"Redis at {self.where}, prefix {self.prefix!r}: {_reason(e, self._password)}") \
                from None

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._call(self._scripts[name], keys, args)

    def _migrate(self) -> None:
        info = self._again(self._call, self._client.info, "server")
        if tuple(int(n) for n in str(info.get("redis_version", "0")).split(".")[:2]) < (6, 2):
            raise StoreError(f"Redis at {self.where} is version {info.get('redis_version')}; RedisStore "
                             f"needs 6.2 or later")
        mark = self.prefix + "schema"
        self._call(self._client.set, mark, SCHEMA_VERSION, nx=True)   # a new prefix starts at this schema
        version = int(self._call(self._client.get, mark))
        if version > SCHEMA_VERSION:
            raise StoreError(f"Redis at {self.where}, prefix {self.prefix!r} was written by a newer ledger.py "
                             f"(schema {version}); upgrade ledger.py")
        if version < 2:   # before the mark moves on, so that a crash here leaves it to the next worker
            self._again(self._index_finished_records)
        if version < SCHEMA_VERSION:   # 3 changes no key: the mark keeps workers of schema 1 out
            self._script("schema", [mark], [SCHEMA_VERSION])   # raised at once, never lowered

    def _index_finished_records(self) -> None:
        """Schema 1 to 2: put the finished records written before prune existed in its indexes.
        Safe beside running workers: prune checks each record itself, so an entry made stale
        by a concurrent claim is skipped, and only ever misses a record, never deletes one."""
        for name in self._workflows(None):
            ids = [id.decode() for id in self._call(self._client.zrange, self.prefix + "w:" + name, 0, -1)]
            for start in range(0, len(ids), _REDIS_BATCH):
                batch = ids[start:start + _REDIS_BATCH]
                pipe = self._client.pipeline(transaction=False)
                for id in batch:
                    pipe.hmget(self._key(id), "status", "updated", "expires")
                finished, expiring = {}, {}
                for id, (status, updated, expires) in zip(batch, self._call(pipe.execute)):
                    if status is not None and status.decode() in PRUNABLE:
                        finished[id] = float(updated)
                        if expires is not None:
                            expiring[id] = float(expires)
                for suffix, scores in (("f:", finished), ("x:", expiring)):
                    if scores:
                        self._call(self._client.zadd, self.prefix + suffix + name, scores)

    # -- encoding ------------------------------------------------------------

    def _key(self, id: str) -> str:
        return self.prefix + "r:" + id

    def _decode(self, fields: Mapping[bytes, bytes]) -> Record | None:
        if not fields:
            return None
        values = {name.decode(): value.decode() for name, value in fields.items()}
        return Record(**{f: kind(values[f]) if f in values else None for f, kind in self._fields.items()})

    @staticmethod
    def _encode(value: Any) -> str:
        return repr(value) if isinstance(value, float) else str(value)

    def _expiry(self, record: Record) -> str:
        if record.expires is None:
            return ""
        return str(max(1, int((record.expires - self.now() + REDIS_EXPIRY_GRACE) * 1000)))

    # -- the Store interface ---------------------------------------------------

    def _get(self, id: str) -> Record | None:
        return self._decode(self._call(self._client.hgetall, self._key(id)))

    def _insert(self, record: Record) -> bool:
        return self._claim(record) == 1

    def _insert_or_get(self, record: Record) -> Record | None:
        stored = self._claim(record)
        return record if stored == 1 else self._decode(dict(zip(stored[::2], stored[1::2])))

    def _claim(self, record: Record) -> Any:
        pairs = [x for f in RECORD_FIELDS if getattr(record, f) is not None
                 for x in (f, self._encode(getattr(record, f)))]
        keys = [self._key(record.id), self.prefix + "w:" + record.workflow, self.prefix + "workflows",
                *self._finished_indexes(record.workflow)]
        args = [record.id, repr(float(record.created)), record.workflow, self._expiry(record),
                self.prefix + "r:"] + pairs
        return self._script("insert", keys, args)

    def _swap(self, record: Record, epoch: int, owner: str) -> bool:
        nils = [f for f in STATE_FIELDS if getattr(record, f) is None]
        pairs = [x for f in STATE_FIELDS if getattr(record, f) is not None
                 for x in (f, self._encode(getattr(record, f)))]
        channel = self.prefix + "done" if record.status != Status.RUNNING else ""
        args = [str(epoch), owner, self._expiry(record), channel, record.id, len(nils)] + nils + pairs
        return self._script("swap", [self._key(record.id), *self._finished_indexes(record.workflow)], args) == 1

    def _finished_indexes(self, workflow: str) -> list[str]:
        return [self.prefix + "f:" + workflow, self.prefix + "x:" + workflow]

    def _delete(self, id: str, epoch: int | None) -> bool:
        args = ["" if epoch is None else str(epoch), self.prefix + "w:", id, self.prefix + "f:", self.prefix + "x:"]
        return self._script("delete", [self._key(id)], args) == 1

    def add_counts(self, counts: Mapping[str, tuple[int, int]]) -> None:
        if counts:
            self._script("add_counts", [self._key(id) for id in counts],
                         [n for attempts, blocked in counts.values() for n in (attempts, blocked)])

    def _workflows(self, workflow: str | None) -> list[str]:
        if workflow is not None:
            return [workflow]
        return sorted(name.decode() for name in self._call(self._client.smembers, self.prefix + "workflows"))

    def _records(self, workflow: str | None, tool: str | None) -> list[Record]:
        found: list[Record] = []
        for name in self._workflows(workflow):
            index = self.prefix + "w:" + name
            ids = [id.decode() for id in self._call(self._client.zrange, index, 0, -1)]
            for start in range(0, len(ids), _REDIS_BATCH):
                batch = ids[start:start + _REDIS_BATCH]
                pipe = self._client.pipeline(transaction=False)
                for id in batch:
                    pipe.hgetall(self._key(id))
                for id, fields in zip(batch, self._call(pipe.execute)):
                    record = self._decode(fields)
                    if record is None:  # expired: its index entry goes too
                        self._call(self._client.zrem, index, id)
                    elif tool is None or record.tool == tool:
                        found.append(record)
        return sorted(found, key=lambda r: r.created)

    def _clear(self, workflow: str | None) -> int:
        removed = 0
        for name in self._workflows(workflow):
            while True:
                count, seen = self._script("clear", [self.prefix + "w:" + name, self.prefix + "workflows",
                                                     *self._finished_indexes(name)],
                                           [self.prefix + "r:", name, _REDIS_BATCH])
                removed += count
                if seen < _REDIS_BATCH:
                    break
        return removed

    def _prune(self, before: float, now: float, statuses: tuple[str, ...], workflow: str | None, dry_run: bool,
               batch: int, counts: dict[tuple[str, str], int]) -> None:
        for name in self._workflows(workflow):
            finished, expiring = self._finished_indexes(name)
            for index, bound, kind in ((expiring, repr(now), "x"), (finished, "(" + repr(before), "f")):
                keys = [index, self.prefix + "w:" + name, finished, expiring, self.prefix + "workflows"]
                offset = 0
                while True:
                    seen, kept, *removed = self._script("prune", keys, [
                        bound, repr(now), repr(before), self.prefix + "r:", batch, offset, kind,
                        "1" if dry_run else "", name, *statuses])
                    for status, tool in zip(removed[::2], removed[1::2]):
                        _tally(counts, status.decode(), tool.decode())
                    offset += kept
                    if seen < batch:
                        break

    def _server_time(self) -> float:
        seconds, microseconds = self._call(self._client.time)
        return seconds + microseconds / 1e6

    def _listen(self, deliver: Callable[[str], None], stopped: Callable[[], bool]) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.prefix + "done")
            while not stopped():
                message = pubsub.get_message(timeout=1.0)
                if message is not None:
                    deliver(message["data"].decode())
        finally:
            pubsub.close()

    def close(self) -> None:
        super().close()
        self._client.close()
