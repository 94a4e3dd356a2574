"""The specification of ledger_servers.py, the PostgreSQL and Redis stores, in the order of
its code. Every store-parametrized test of test_ledger.py runs on these stores too
(through conftest.STORES); these cover what only a server store has: loading the
companion file, URLs, driver and connection errors, dropped connections, restarts,
schemas, wakeups across processes, round trips.

They use the local servers (postgresql://postgres@127.0.0.1:5432/test,
redis://127.0.0.1:6379/15) or the ones LEDGER_TEST_POSTGRES and LEDGER_TEST_REDIS
name, and skip without them (fail, under LEDGER_TEST_REQUIRE_ALL=1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse

import pytest

import ledger
import ledger_servers
from ledger import BLOCKED, Guard, LedgerError

from conftest import (  # test support shared by every test file (fixtures come from there too)
    FORK, POSTGRES_URL, REDIS_URL, SERVER_SCRATCH, STORES, TcpProxy, counter,
    drop_postgres_table, drop_redis_keys, finished_record, forked, free_port, has_module, need, need_postgres,
    need_redis, postgres_admin, postgres_store, redis_admin, redis_store, scratch_name, scratch_record, wait_for,
    with_address, writes_stalled,
)

HERE = pathlib.Path(__file__).resolve().parent
PASSWORD = "pw-Xq7-never-shown"
PAYMENTS = pathlib.Path(os.devnull)   # the current test's file of payments


def pay(order_id: int, amount: float = 10.0) -> dict:
    """A tool with a side effect, counted in an append-only file that every process shares."""
    with open(PAYMENTS, "a") as f:
        f.write(f"{order_id} {os.getpid()}\n")
    return {"paid": amount, "order": order_id}


def payments() -> list[int]:
    """The orders paid so far in this test, by any process."""
    return [int(line.split()[0]) for line in PAYMENTS.read_text().splitlines()] if PAYMENTS.exists() else []


@pytest.fixture(autouse=True)
def _payments_of_this_test(tmp_path):
    global PAYMENTS
    PAYMENTS = tmp_path / "payments"


# ---------------------------------------------------------------------------
# The companion file: ledger.py loads ledger_servers.py when a store URL or name asks
# for it, and says in one line which file to copy when it is missing.
# ---------------------------------------------------------------------------

_WITHOUT_THE_COMPANION = """
import sys
sys.path.insert(0, sys.argv[1])   # the folder that holds ledger.py alone
import ledger
from ledger import *   # every name of __all__ is ledger.py's own
assert ledger.__file__.startswith(sys.argv[1]), ledger.__file__
runs = []

def tool(n):
    runs.append(n)
    return n

attempts = {
    "Guard": lambda: ledger.Guard("postgresql://db.internal/agents", secret="s")(tool, 1),
    "open_store": lambda: ledger.open_store("redis://cache.internal:6379/0"),
    "from ledger import": lambda: exec("from ledger import PostgresStore"),
    "attribute": lambda: ledger.RedisStore,
}
for how, attempt in attempts.items():
    try:
        attempt()
    except ledger.ConfigError as e:
        print(how, "->", e)
    else:
        print(how, "-> no error")
for spec in (":memory:", sys.argv[1] + "/ledger.db"):
    guard = Guard(spec, quiet=True)
    print(spec == ":memory:" and "memory" or "sqlite", guard(tool, 2), guard(tool, 2) is BLOCKED)
print("runs", runs)
"""


def test_without_its_companion_file_ledger_py_works_and_a_server_store_says_which_file_to_copy(tmp_path):
    shutil.copy(HERE / "ledger.py", tmp_path)
    script = tmp_path / "uses_ledger.py"
    script.write_text(_WITHOUT_THE_COMPANION)
    # -I -S: no site-packages either, where an installed ledger_servers could be found
    result = subprocess.run([sys.executable, "-I", "-S", str(script), str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for how, name in (("Guard", "PostgresStore"), ("open_store", "RedisStore"),
                      ("from ledger import", "PostgresStore"), ("attribute", "RedisStore")):
        line = next(line for line in lines if line.startswith(how + " ->"))
        assert f"{name} lives in ledger_servers.py: copy it next to ledger.py ({tmp_path})" in line, line
    assert "memory 2 True" in lines and "sqlite 2 True" in lines
    assert lines[-1] == "runs [2, 2]", "the guarded tool never ran for a server store it could not open"


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_ledger_py_run_as_a_script_opens_a_server_store_from_its_companion(tmp_path, kind):
    store = STORES[kind]()   # a scratch table or prefix, removed after the test
    url = (f"{POSTGRES_URL}?table={store.table}" if kind == "postgres"
           else f"{REDIS_URL}?prefix={store.prefix}")
    for name in ("ledger.py", "ledger_servers.py"):
        shutil.copy(HERE / name, tmp_path)
    result = subprocess.run([sys.executable, "ledger.py", "--db", url, "check"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok {store.url.split('?')[0]}") and "keeps the store contract" in result.stdout
    store.close()


# ---------------------------------------------------------------------------
# Drivers and their errors: opening a store from its URL, a missing driver, a server
# that refuses, credentials it rejects; never the password.
# ---------------------------------------------------------------------------

def test_postgres_urls_open_a_postgres_store_on_the_table_they_name(monkeypatch):
    need_postgres()
    table = scratch_name()
    SERVER_SCRATCH.append(lambda: drop_postgres_table(table))
    for scheme in ("postgresql", "postgres"):
        url = scheme + POSTGRES_URL[POSTGRES_URL.index(":"):] + "?table=" + table
        store = ledger.open_store(url)
        assert isinstance(store, ledger.PostgresStore) and store.table == table
        store.close()
    monkeypatch.setenv("LEDGER_DB", url)
    assert isinstance(Guard(quiet=True).store, ledger.PostgresStore)


def test_redis_urls_open_a_redis_store_under_the_prefix_they_name(monkeypatch):
    need_redis()
    prefix = scratch_name() + ":"
    SERVER_SCRATCH.append(lambda: drop_redis_keys(REDIS_URL, prefix))
    url = REDIS_URL + "?prefix=" + prefix
    store = ledger.open_store(url)
    assert isinstance(store, ledger.RedisStore) and store.prefix == prefix
    store.close()
    monkeypatch.setenv("LEDGER_DB", url)
    assert isinstance(Guard(quiet=True).store, ledger.RedisStore)
    port = free_port()
    with pytest.raises(ledger.StoreError, match=f"127.0.0.1:{port}"):
        ledger.open_store(f"rediss://127.0.0.1:{port}/0")


@pytest.mark.parametrize("module, package, url", [("psycopg", "psycopg[binary]", "postgresql://db/agents"),
                                                  ("redis", "redis", "redis://cache:6379/0")])
def test_a_missing_driver_names_the_package_that_installs_it(monkeypatch, module, package, url):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ledger.ConfigError) as err:
        ledger.open_store(url)
    assert f"pip install '{package}'" in str(err.value) and "\n" not in str(err.value)


def error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


@pytest.mark.parametrize("kind, url", [("postgres", "postgresql://postgres:{pw}@127.0.0.1:{port}/test"),
                                       ("redis", "redis://:{pw}@127.0.0.1:{port}/0")])
def test_a_refused_connection_names_host_and_port_but_not_the_password(kind, url):
    need(kind + " driver", has_module("psycopg" if kind == "postgres" else "redis"),
         f"pip install '.[{kind}]'")
    port = free_port()
    with pytest.raises(ledger.StoreError) as err:
        ledger.open_store(url.format(pw=PASSWORD, port=port))
    assert f"127.0.0.1:{port}" in str(err.value) and "refused" in str(err.value).lower()
    assert PASSWORD not in error_text(err.value)


@pytest.mark.parametrize("url", ["postgresql://postgres:{pw}@127.0.0.1:notaport/test",
                                 "redis://:{pw}@127.0.0.1:notaport/0"])
def test_an_unusable_url_is_a_ledger_error_without_the_password(url):
    need("drivers", has_module("psycopg") and has_module("redis"), "pip install '.[postgres,redis]'")
    with pytest.raises(LedgerError) as err:
        ledger.open_store(url.format(pw=PASSWORD))
    assert PASSWORD not in error_text(err.value)


@pytest.mark.parametrize("change, expected", [("user", 'role "nobody_here" does not exist'),
                                              ("dbname", 'database "no_such_db" does not exist')])
def test_postgres_names_an_unknown_role_or_database(change, expected):
    need_postgres()
    parts = urllib.parse.urlsplit(POSTGRES_URL)
    if change == "user":
        url = urllib.parse.urlunsplit(parts._replace(netloc=f"nobody_here:{PASSWORD}@{parts.hostname}:{parts.port}"))
    else:
        url = urllib.parse.urlunsplit(parts._replace(path="/no_such_db"))
    with pytest.raises(ledger.StoreError, match=expected) as err:
        ledger.PostgresStore(url)
    assert f"{parts.hostname}:{parts.port}" in str(err.value) and PASSWORD not in error_text(err.value)


def test_redis_names_rejected_credentials_without_showing_the_password():
    need_redis()
    parts = urllib.parse.urlsplit(REDIS_URL)
    url = urllib.parse.urlunsplit(parts._replace(netloc=f"nobody_here:{PASSWORD}@{parts.hostname}:{parts.port}"))
    with pytest.raises(ledger.StoreError, match="username-password") as err:
        ledger.RedisStore(url)
    assert f"{parts.hostname}:{parts.port}" in str(err.value) and PASSWORD not in error_text(err.value)


# ---------------------------------------------------------------------------
# What both server stores share: driver errors, the secret, dropped connections read
# back, schemas, wakeups across processes and in coroutines, fork, round trips.
# ---------------------------------------------------------------------------

SERVERS = ["postgres", "redis"]


@pytest.fixture(params=SERVERS)
def server_store(request):
    s = STORES[request.param]()
    yield s
    s.close()


def kill_connections(store) -> int:
    """Close every connection of `store` from the server side; how many there were."""
    if isinstance(store, ledger.PostgresStore):
        with postgres_admin() as admin:
            pids = [pid for (pid,) in admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                                    (store.table,))]
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
            wait_for(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)",
                                               (pids,)).fetchall(), what="the backends to exit")
        return len(pids)
    with redis_admin(store) as admin:
        ids = [c["id"] for c in admin.client_list() if c["name"] == store.prefix[:-1]]
        for id in ids:
            admin.client_kill_filter(_id=id)
    return len(ids)


def session_id(store):
    """Which server session the store's next operation uses."""
    if isinstance(store, ledger.PostgresStore):
        return store._run("SELECT pg_backend_pid()", rows=True)[0][0]
    return store._client.client_id()


def session_alive(store, session):
    """Whether the server still holds that session open (the store may pool several)."""
    if isinstance(store, ledger.PostgresStore):
        query = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
        return store._again(store._run, query, (session,), True)[0][0] == 1
    return any(int(client["id"]) == session for client in store._client.client_list())


def test_driver_errors_become_store_errors(server_store):
    server_store.insert(scratch_record())
    if isinstance(server_store, ledger.PostgresStore):
        drop_postgres_table(server_store.table)
    else:
        server_store._client.set(server_store._key("r1"), "not a hash")
    with pytest.raises(ledger.StoreError):
        server_store.get("r1")


def test_a_server_store_without_a_secret_fails_before_the_tool_runs(server_store, monkeypatch):
    monkeypatch.delenv("LEDGER_SECRET", raising=False)
    with pytest.raises(ledger.ConfigError, match="LEDGER_SECRET"):
        Guard(server_store, quiet=True)(pay, 1)
    assert payments() == [] and server_store.records() == []


def test_a_connection_killed_while_the_tool_runs_is_survived_and_the_tool_runs_once(server_store):
    guard = Guard(server_store, quiet=True, secret="s")
    killed = []

    @guard.once(name="tool")
    def tool():
        killed.append(kill_connections(server_store))
        return "done"
    assert guard(tool) == "done" and killed[0] >= 1
    assert guard(tool) is BLOCKED and len(killed) == 1
    assert [r.status for r in server_store.records()] == ["SUCCESS"]


@pytest.mark.parametrize("write, answer", [("swap", True), ("insert", True), ("insert_or_get", "the record")])
def test_a_write_whose_connection_was_killed_is_settled_by_reading_the_record_back(server_store, write, answer):
    record = scratch_record()
    if write == "swap":   # a transition of a claimed record
        server_store.insert(record)
        written = record.evolve(status="SUCCESS", result='"v"', runs=1)
        args = (written, 1, "a")
    else:                 # a claim
        written, args = record, (record,) if write == "insert" else (record.id, lambda: record)
    results = []
    with writes_stalled(server_store, record.id) as stalled:
        writer = threading.Thread(target=lambda: results.append(getattr(server_store, write)(*args)))
        writer.start()
        wait_for(stalled, what="the write to wait on the server")
        assert kill_connections(server_store) >= 1
    writer.join(10)
    assert results == [written if answer == "the record" else answer]
    assert server_store.get(record.id).as_dict() == written.as_dict()


def test_a_claim_or_read_that_took_effect_before_its_connection_broke_is_the_callers_claim(server_store,
                                                                                            monkeypatch):
    record = scratch_record()
    claim_and_break = server_store._insert_or_get

    def claimed_then_dropped(r):
        claim_and_break(r)   # it took effect on the server, but the answer never arrived
        raise ledger_servers._Dropped("connection lost")
    monkeypatch.setattr(server_store, "_insert_or_get", claimed_then_dropped)
    assert server_store.insert_or_get(record.id, lambda: record) is record
    other = record.evolve(owner="b")
    assert server_store.insert_or_get(other.id, lambda: other).as_dict() == record.as_dict(), \
        "someone else's claim is read"


def mark_schema(store, version: int) -> None:
    if isinstance(store, ledger.PostgresStore):
        with postgres_admin() as admin:
            admin.execute(f'COMMENT ON TABLE "{store.table}" IS \'ledger.py records, schema {version}\'')
    else:
        import redis
        with redis.Redis.from_url(REDIS_URL) as admin:
            admin.set(store.prefix + "schema", version)


def schema_of(store) -> int:
    if isinstance(store, ledger.PostgresStore):
        with postgres_admin() as admin:
            comment = admin.execute("SELECT obj_description(%s::regclass, 'pg_class')", (store.table,)).fetchone()[0]
        return int(comment.rsplit(" ", 1)[1])
    import redis
    with redis.Redis.from_url(REDIS_URL) as admin:
        return int(admin.get(store.prefix + "schema"))


def test_a_schema_1_server_store_keeps_its_records_and_is_marked_so_older_workers_stay_out(server_store):
    guard = Guard(server_store, quiet=True, secret="s")
    guard(pay, 1)
    guard.stats()   # writes the buffered counters now, so the counter thread cannot change a record below
    before = [r.as_dict() for r in server_store.records()]
    mark_schema(server_store, 1)
    reopened = (ledger.PostgresStore(POSTGRES_URL, table=server_store.table)
                if isinstance(server_store, ledger.PostgresStore)
                else ledger.RedisStore(REDIS_URL, prefix=server_store.prefix))
    assert schema_of(server_store) == ledger.SCHEMA_VERSION
    assert [r.as_dict() for r in reopened.records()] == before
    assert Guard(reopened, quiet=True, secret="s")(pay, 1) is BLOCKED and payments() == [1]


def _finish_until_stopped(store, record, stop):
    done = record.evolve(status="SUCCESS")
    while not stop.is_set():
        store.swap(done, record.epoch, record.owner)
        store.swap(record, done.epoch, done.owner)
        time.sleep(0.05)


def test_a_waiter_in_another_process_is_woken_by_the_server_not_its_timeout(server_store):
    record = scratch_record()
    server_store.insert(record)
    started = time.monotonic()
    server_store.wait(record.id, 0.3)   # nothing finishes: it sleeps its timeout
    assert time.monotonic() - started >= 0.29
    stop = FORK.Event()
    finisher = forked(_finish_until_stopped, server_store, record, stop)
    finisher.start()
    try:
        started = time.monotonic()
        server_store.wait(record.id, 10.0)
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        finisher.join(10)


def _log_run(path: str, where: str) -> None:
    with open(path, "a") as f:   # append-only: one line per run, from any process
        f.write(f"{where} {os.getpid()}\n")


def _lead_until_released(store, path, release):
    guard = Guard(store, quiet=True, secret="s")

    @guard.once(name="job", replay=True, lease=30)
    def job():
        _log_run(path, "leader")
        release.wait(30)
        return f"done-{os.getpid()}"
    job()


def test_async_waiters_wake_on_the_servers_notification_without_blocking_their_loop(server_store, tmp_path,
                                                                                      monkeypatch):
    """A leader in another process finishes; 50 coroutines here that wait for it wake within
    a small fraction of their poll interval, through the store's one listener thread."""
    poll = 5.0   # the waiters' poll interval: waking by polling would take up to this long
    monkeypatch.setattr(ledger, "POLL_FIRST", poll)
    monkeypatch.setattr(ledger, "POLL_MAX", poll)
    path, release = str(tmp_path / "runs"), FORK.Event()
    leader = forked(_lead_until_released, server_store, path, release)
    leader.start()
    wait_for(lambda: os.path.exists(path), what="the leader to start")
    guard = Guard(server_store, quiet=True, secret="s")

    @guard.once(name="job", replay=True, lease=30)
    async def job():
        _log_run(path, "waiter")
        return "ran here"

    def waiting() -> int:
        return sum(len(wakes) for wakes in server_store._wakeups.waiting.values())

    async def main():
        gaps, woken = [], []

        async def ticker():   # how long the loop is ever kept from running a ready callback
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - before - 0.01)

        async def waiter():
            value = await job()
            woken.append(time.monotonic())
            return value
        waiters = [asyncio.create_task(waiter()) for _ in range(50)]
        deadline = time.monotonic() + 10
        while waiting() < 50 and time.monotonic() < deadline:   # each has read the running record
            await asyncio.sleep(0.01)
        registered = waiting()
        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.5)   # while all of them wait (and the listener subscribes)
        ticking.cancel()
        listeners = [t.name for t in threading.enumerate() if t.name.startswith("ledger-wakeups")]
        released = time.monotonic()
        release.set()
        values = await asyncio.gather(*waiters)
        return values, registered, [t - released for t in woken], max(gaps), listeners
    values, registered, latencies, longest_gap, listeners = asyncio.run(main())
    leader.join(10)
    assert values == [f"done-{leader.pid}"] * 50
    assert registered == 50, "every waiter waits on the store's listener"
    assert [line.split()[0] for line in pathlib.Path(path).read_text().splitlines()] == ["leader"]
    assert max(latencies) < poll / 5, f"woken {min(latencies):.3f}..{max(latencies):.3f}s after the release"
    assert longest_gap < 0.5, f"waiting blocked the event loop for {longest_gap:.3f}s"
    assert len(listeners) == 1, listeners


def _pay_after_fork_and_tell_the_session(store, queue):
    queue.put(Guard(store, quiet=True, secret="s")(pay, 99))
    queue.put(session_id(store))


def test_server_stores_never_share_a_connection_across_fork(server_store):
    guard = Guard(server_store, quiet=True, secret="s")
    guard(pay, 1)
    session = session_id(server_store)
    queue = FORK.Queue()
    child = forked(_pay_after_fork_and_tell_the_session, server_store, queue)
    child.start()
    assert queue.get(timeout=10) == {"paid": 10.0, "order": 99}
    assert queue.get(timeout=10) != session, "the child must open its own connection"
    child.join(10)
    assert session_alive(server_store, session), "the parent's connection must outlive the child untouched"
    assert guard(pay, 99) is BLOCKED and guard(pay, 2)["order"] == 2 and payments() == [1, 99, 2]





@contextlib.contextmanager
def statements_sent(store):
    """The requests this thread sends the server while the block runs, counted in the driver:
    each one waits for its answer, so each is a round trip."""
    sent, me = [], threading.get_ident()

    def note(what):
        if threading.get_ident() == me:   # not the counter flush or the wakeup listener
            sent.append(what)
    if isinstance(store, ledger.PostgresStore):
        import psycopg

        class Counting(psycopg.Cursor):
            def execute(self, query, *args, **kwargs):
                note(str(query).split()[0])
                return super().execute(query, *args, **kwargs)
        connect = store._connect
        store._forget_idle()   # from here on, every connection the store takes counts

        def counting_connect():
            conn = connect()
            conn.cursor_factory = Counting
            return conn
        store._connect = counting_connect
    else:
        execute = store._client.execute_command
        store._client.execute_command = lambda *args, **kwargs: note(args[0]) or execute(*args, **kwargs)
    try:
        yield sent
    finally:
        del (store.__dict__ if isinstance(store, ledger.PostgresStore) else store._client.__dict__)[
            "_connect" if isinstance(store, ledger.PostgresStore) else "execute_command"]


@pytest.fixture
def counted_store(server_store, monkeypatch):
    """A server store whose lease clock needs no reading during the test, warmed by a first call."""
    monkeypatch.setattr(ledger_servers, "CLOCK_RESYNC", 3600.0)
    server_store._sync_clock()
    Guard(server_store, quiet=True, secret="s")(pay, 0)   # loads the scripts, opens a connection
    return server_store


def test_a_call_already_recorded_takes_one_round_trip(counted_store):
    guard = Guard(counted_store, quiet=True, secret="s")
    guard(pay, 1)
    with statements_sent(counted_store) as sent:
        assert guard(pay, 1) is BLOCKED
    assert len(sent) == 1, sent


def test_a_new_call_takes_two_round_trips_claim_or_read_then_complete(counted_store):
    guard = Guard(counted_store, quiet=True, secret="s")
    with statements_sent(counted_store) as sent:
        assert guard(pay, 1) == {"paid": 10.0, "order": 1}
    assert len(sent) == 2, sent


def slow_pay(order_id: int) -> dict:
    time.sleep(0.2)
    return pay(order_id)


def looks_counted(monkeypatch, store, before=None):
    """Count the store's first looks (insert_or_get); `before(n)` runs ahead of the n-th."""
    looks = []
    real = store.insert_or_get

    def counted(*args, **kwargs):
        looks.append(threading.get_ident())
        if before is not None:
            before(len(looks))
        return real(*args, **kwargs)
    monkeypatch.setattr(store, "insert_or_get", counted)
    return looks


def same_call_at_once(guard, tool, threads=30):
    """`threads` threads make the same call at the same moment; what each got."""
    barrier, results = threading.Barrier(threads), []

    def call():
        barrier.wait()
        try:
            results.append(guard(tool, 7))
        except Exception as e:   # noqa: BLE001 - the test looks at what each caller got
            results.append(e)
    workers = [threading.Thread(target=call) for _ in range(threads)]
    [w.start() for w in workers]
    [w.join() for w in workers]
    return results


def test_callers_in_one_process_looking_at_one_call_at_once_share_one_round_trip(server_store, monkeypatch):
    guard = Guard(server_store, quiet=True, secret="s")
    guard.policy(slow_pay, replay=True)
    looks = looks_counted(monkeypatch, server_store)
    assert same_call_at_once(guard, slow_pay) == [{"paid": 10.0, "order": 7}] * 30
    assert len(looks) == 1 and payments() == [7]


def test_callers_behind_a_look_that_failed_look_for_themselves(server_store, monkeypatch):
    guard = Guard(server_store, quiet=True, secret="s")
    guard.policy(slow_pay, replay=True)

    def first_fails(n):
        if n == 1:
            time.sleep(0.2)   # long enough for the others to queue behind it
            raise ledger.StoreError("the server went away")
    looks = looks_counted(monkeypatch, server_store, first_fails)
    results = same_call_at_once(guard, slow_pay)
    assert sum(isinstance(r, ledger.StoreError) for r in results) == 1
    assert results.count({"paid": 10.0, "order": 7}) == 29 and payments() == [7]
    assert 2 <= len(looks) < 30   # the next caller looked, and the rest shared its look


def test_callers_behind_a_stalled_look_stop_waiting_for_it(server_store, monkeypatch):
    monkeypatch.setattr(ledger, "LOOK_WAIT", 0.3)
    guard = Guard(server_store, quiet=True, secret="s")
    guard.policy(slow_pay, replay=True)
    looks = looks_counted(monkeypatch, server_store, lambda n: n == 1 and time.sleep(2))
    started = time.monotonic()
    results = same_call_at_once(guard, slow_pay, threads=5)
    assert results == [{"paid": 10.0, "order": 7}] * 5 and payments() == [7]
    assert len(looks) >= 2   # they stopped waiting: one looked and ran it (the rest may wait on its run)
    assert time.monotonic() - started < 2.5


# ---------------------------------------------------------------------------
# PostgreSQL: table names, schema marks, pooled connections, prune's locks, time
# limits, a restart, fail-open.
# ---------------------------------------------------------------------------

def test_postgres_table_names_must_be_plain_identifiers():
    need("psycopg", has_module("psycopg"), "pip install '.[postgres]'")
    with pytest.raises(ledger.ConfigError, match="table"):
        ledger.PostgresStore("postgresql://db/x", table='ledger"; DROP TABLE users; --')


def test_postgres_records_its_schema_version_and_refuses_a_newer_one():
    store = postgres_store()
    with postgres_admin() as admin:
        comment = admin.execute("SELECT obj_description(%s::regclass, 'pg_class')", (store.table,)).fetchone()[0]
        assert comment == f"ledger.py records, schema {ledger.SCHEMA_VERSION}"
        admin.execute(f'COMMENT ON TABLE "{store.table}" IS \'ledger.py records, schema 99\'')
    with pytest.raises(ledger.StoreError, match="newer"):
        ledger.PostgresStore(POSTGRES_URL, table=store.table)


def test_postgres_refuses_a_table_that_is_not_a_ledger_table():
    need_postgres()
    table = scratch_name()
    SERVER_SCRATCH.append(lambda: drop_postgres_table(table))
    with postgres_admin() as admin:
        admin.execute(f'CREATE TABLE "{table}" (id int)')
    with pytest.raises(ledger.StoreError, match="not a ledger.py table"):
        ledger.PostgresStore(POSTGRES_URL, table=table)


def test_postgres_closes_a_connection_whose_statement_failed_outside_psycopg():
    """A value psycopg cannot send (text with a lone surrogate) fails before the server sees
    the statement; the connection it took is closed, not left open outside the pool."""
    store = postgres_store()
    with pytest.raises(UnicodeEncodeError) as raised:   # held: a leaked connection would stay open
        store.insert(scratch_record().evolve(tool="t\ud800"))
    with postgres_admin() as admin:
        sessions = lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                         (store.table,)).fetchone()[0]
        wait_for(lambda: sessions() == len(store._idle), what="only the pooled connections to stay open")
    assert raised.value is not None and store.get("r1") is None


def test_postgres_insert_or_get_reads_a_conflicting_record_committed_after_its_snapshot():
    """The claim waits for another session's uncommitted record with its id; once that commits,
    the claim does nothing, and its statement's snapshot, older than that record, cannot show
    it: the record is read by a statement of its own."""
    store = postgres_store()
    theirs, answers = scratch_record().evolve(owner="theirs"), []
    columns, values = ", ".join(ledger.RECORD_FIELDS), ", ".join(["%s"] * len(ledger.RECORD_FIELDS))
    with postgres_admin() as admin:
        with admin.transaction():
            admin.execute(f'INSERT INTO "{store.table}" ({columns}) VALUES ({values})',
                          [getattr(theirs, f) for f in ledger.RECORD_FIELDS])
            claimer = threading.Thread(target=lambda: answers.append(store.insert_or_get(scratch_record().id, scratch_record)))
            claimer.start()
            wait_for(lambda: admin.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND "
                                           "wait_event_type = 'Lock'", (store.table,)).fetchall(),
                     what="the claim to wait for the uncommitted record")
    claimer.join(10)
    assert [a.as_dict() for a in answers] == [theirs.as_dict()]


def test_postgres_upgrades_a_schema_1_table_in_place_keeping_every_record():
    store = postgres_store()
    now = time.time()
    records = [finished_record(1, now - 7200), finished_record(2, now, status="RUNNING")]
    for r in records:
        store.insert(r)
    name = store.table
    with postgres_admin() as admin:   # back to what ledger.py made before prune existed
        for index in ("finished", "expiring"):
            admin.execute(f'DROP INDEX "{name}_{index}"')
        admin.execute(f'COMMENT ON TABLE "{name}" IS \'ledger.py records, schema 1\'')
    store = ledger.PostgresStore(POSTGRES_URL, table=name)
    assert [r.as_dict() for r in store.records()] == [r.as_dict() for r in records]
    with postgres_admin() as admin:
        indexes = {row[0] for row in admin.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (name,))}
        comment = admin.execute("SELECT obj_description(%s::regclass, 'pg_class')", (name,)).fetchone()[0]
    assert {f"{name}_finished", f"{name}_expiring"} <= indexes
    assert comment == f"ledger.py records, schema {ledger.SCHEMA_VERSION}"
    assert store.prune(now - 3600, now) == {("SUCCESS", "t"): 1}


def test_postgres_prune_never_waits_for_a_record_another_transaction_holds():
    """Waiting is what lets a multi-row delete deadlock with claims and counter flushes."""
    store = postgres_store()
    now = time.time()
    for n in range(3):
        store.insert(finished_record(n, now - 7200))
    with postgres_admin() as admin:
        with admin.transaction():
            admin.execute(f'SELECT id FROM "{store.table}" WHERE id = %s FOR UPDATE', ("r1",))
            done = []
            pruner = threading.Thread(target=lambda: done.append(store.prune(now - 3600, now)))
            pruner.start()
            pruner.join(10)
            assert done == [{("SUCCESS", "t"): 2}]
    assert store.prune(now - 3600, now) == {("SUCCESS", "t"): 1}


def test_every_postgres_statement_has_a_time_limit():
    store = postgres_store()
    limits = [store._run(f"SHOW {name}", rows=True)[0][0] for name in ("statement_timeout", "lock_timeout")]
    assert limits == [f"{ledger_servers.PG_STATEMENT_TIMEOUT:g}s", f"{ledger_servers.PG_LOCK_TIMEOUT:g}s"]


def test_postgres_survives_a_restart_between_claim_and_completion():
    need_postgres()
    parts = urllib.parse.urlsplit(POSTGRES_URL)
    proxy = TcpProxy((parts.hostname, parts.port or 5432))
    store = postgres_store(url=with_address(POSTGRES_URL, proxy.port, parts.netloc.rpartition("@")[0] + "@"))
    guard = Guard(store, quiet=True, secret="s")
    runs = []

    @guard.once(name="tool")
    def tool():
        runs.append(1)
        proxy.cut()   # every connection drops, and the server refuses new ones for a while
        threading.Timer(0.3, proxy.restore).start()
        return "done"
    assert guard(tool) == "done"
    assert guard(tool) is BLOCKED and runs == [1] and proxy.cuts == 1
    assert [r.status for r in store.records()] == ["SUCCESS"]
    guard.close()
    proxy.cut()


def test_fail_open_runs_lookups_unguarded_while_postgres_is_unreachable():
    need_postgres()
    parts = urllib.parse.urlsplit(POSTGRES_URL)
    proxy = TcpProxy((parts.hostname, parts.port or 5432))
    url = with_address(POSTGRES_URL, proxy.port, parts.netloc.rpartition("@")[0] + "@")
    guard = Guard(postgres_store(url=url), quiet=True, secret="s")
    lookups = []
    lookup = guard.wrap_tools({"lookup": lambda q: lookups.append(q) or q})["lookup"]
    guard.policy("lookup", fail_open=True)
    assert lookup("acme") == "acme" and lookup("acme") is BLOCKED
    proxy.cut()
    try:
        assert guard.execute(lookup, "acme").source == "unguarded"
        with pytest.raises(ledger.StoreError, match="PostgreSQL"):
            guard(pay, 1)
        assert lookups == ["acme"] * 2 and payments() == []
    finally:
        proxy.restore()
    guard.close()
    proxy.cut()


# ---------------------------------------------------------------------------
# Redis: schema marks, prune's indexes, a restart of a private server, fail-open,
# expiry on the server.
# ---------------------------------------------------------------------------

def test_redis_refuses_records_from_a_newer_version():
    store = redis_store()
    import redis
    with redis.Redis.from_url(REDIS_URL) as admin:
        admin.set(store.prefix + "schema", 99)
    with pytest.raises(ledger.StoreError, match="newer"):
        ledger.RedisStore(REDIS_URL, prefix=store.prefix)


def test_redis_upgrades_a_schema_1_prefix_so_that_prune_finds_its_old_records():
    store = redis_store()
    now = time.time()
    records = [finished_record(1, now - 7200), finished_record(2, now - 7200, status="FAILED"),
               finished_record(3, now - 7200, status="RUNNING"), finished_record(4, now, expires=now - 1)]
    for r in records:
        store.insert(r)
    import redis
    with redis.Redis.from_url(REDIS_URL) as admin:   # back to what ledger.py kept before prune existed
        admin.delete(store.prefix + "f:w", store.prefix + "x:w")
        admin.set(store.prefix + "schema", 1)
    assert store.prune(now - 3600, now) == {}
    store = ledger.RedisStore(REDIS_URL, prefix=store.prefix)
    with redis.Redis.from_url(REDIS_URL) as admin:
        assert int(admin.get(store.prefix + "schema")) == ledger.SCHEMA_VERSION
    assert store.prune(now - 3600, now) == {("SUCCESS", "t"): 2, ("FAILED", "t"): 1}
    assert [r.id for r in store.records()] == ["r3"]


def test_redis_prune_forgets_the_workflows_and_index_entries_it_emptied():
    store = redis_store()
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(pay, ttl=600)
    for n in range(3):
        guard.workflow(f"order-{n}")(pay, n)
    assert guard.prune(0)["removed"] == 3
    import redis
    with redis.Redis.from_url(REDIS_URL) as admin:
        assert sorted(k.decode() for k in admin.scan_iter(match=store.prefix + "*")) == [store.prefix + "schema"]


class RedisServer:
    """A private redis-server that logs every write to its append-only file before answering."""

    def __init__(self, folder: pathlib.Path):
        self.port, self.folder, self.process = free_port(), folder, None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""], stdout=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                                        text=True).stdout.strip() == "PONG", what="redis-server to start")

    def kill(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture
def private_redis(tmp_path):
    need("redis-server", shutil.which("redis-server") is not None and has_module("redis"),
         "install redis-server (apt-get install redis-server) and pip install '.[redis]'")
    server = RedisServer(tmp_path)
    yield server
    server.kill()


def test_redis_survives_a_restart_between_claim_and_completion(private_redis):
    store = redis_store(url=private_redis.url)
    guard = Guard(store, quiet=True, secret="s")
    runs = []

    @guard.once(name="tool")
    def tool():
        runs.append(1)
        private_redis.kill()   # SIGKILL: only what the append-only file holds comes back
        threading.Timer(0.2, private_redis.start).start()
        return "done"
    assert guard(tool) == "done"
    assert guard(tool) is BLOCKED and runs == [1]
    private_redis.kill()
    private_redis.start()
    assert [r.status for r in store.records()] == ["SUCCESS"]
    assert guard(tool) is BLOCKED and runs == [1]
    guard.close()


def test_fail_open_runs_lookups_unguarded_while_a_redis_server_is_down_and_guards_again_after(private_redis):
    guard = Guard(redis_store(url=private_redis.url), quiet=True, secret="s")
    lookups = []
    lookup = guard.wrap_tools({"lookup": lambda q: lookups.append(q) or q})["lookup"]
    guard.policy("lookup", fail_open=True)
    assert lookup("acme") == "acme" and lookup("acme") is BLOCKED and lookups == ["acme"]
    private_redis.kill()
    assert [guard.execute(lookup, "acme").source for _ in range(2)] == ["unguarded"] * 2
    with pytest.raises(ledger.StoreError, match="Redis"):
        guard(pay, 1)   # fail-closed: never run without the ledger
    assert lookups == ["acme"] * 3 and payments() == []
    private_redis.start()
    assert lookup("acme") is BLOCKED and lookups == ["acme"] * 3
    guard.close()


def test_redis_gives_a_ttl_record_a_server_expiry_only_while_it_is_not_running():
    store = redis_store()
    guard = Guard(store, quiet=True, secret="s")
    running, done = [], []

    def expiry_ms():
        return store._client.pttl(store._key(store.records()[0].id))

    @guard.once(name="tool")
    def tool():
        running.append(expiry_ms())
        return 1
    guard.policy(tool, ttl=0.3)
    for _ in range(2):
        guard(tool)
        done.append(expiry_ms())
        time.sleep(0.35)
    assert running == [-1, -1], "a running record never vanishes, also when a ttl'd one runs again"
    grace = ledger_servers.REDIS_EXPIRY_GRACE
    low, high = (0.3 + grace - 1) * 1000, (0.3 + grace) * 1000
    assert all(low < ms <= high for ms in done), done


def test_a_redis_record_that_expired_on_the_server_runs_again(monkeypatch):
    monkeypatch.setattr(ledger_servers, "REDIS_EXPIRY_GRACE", 0.0)
    store = redis_store()
    guard = Guard(store, quiet=True, secret="s")
    tool = counter(guard, result="fresh")
    guard.policy(tool, ttl=0.2, replay=True)
    assert guard(tool) == "fresh" and guard(tool) == "fresh" and len(tool.calls) == 1
    key = store._key(store.records()[0].id)
    wait_for(lambda: not store._client.exists(key), what="the server to expire the record")
    assert store.records() == []
    assert guard(tool) == "fresh" and len(tool.calls) == 2


def test_the_redis_workflow_index_forgets_expired_records(monkeypatch):
    monkeypatch.setattr(ledger_servers, "REDIS_EXPIRY_GRACE", 0.0)
    store = redis_store()
    for n in range(200):
        store.insert(scratch_record(f"r{n}", expires=time.time()))
        time.sleep(0.001)
    assert store._client.zcard(store.prefix + "w:wf") < 50
