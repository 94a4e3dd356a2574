"""Test support shared by every test file: what a test needs from the machine (servers,
packages, a browser), store factories for every backend, a tool that counts its runs,
and the run's closing line saying what skipped and why."""

import collections
import importlib.util
import os
import pathlib
import signal
import threading
import time
import uuid

import pytest

import ledger
from ledger import Guard, MemoryStore, SQLiteStore


# ---------------------------------------------------------------------------
# What a test needs from the machine, store factories for every backend, and a
# tool that counts its runs.
# ---------------------------------------------------------------------------

def need(what: str, ok: bool, how: str) -> None:
    """Skip (or under CI, fail) a test whose server, package or browser is missing."""
    if ok:
        return
    message = f"{what} is not available: {how}"
    if os.environ.get("LEDGER_TEST_REQUIRE_ALL"):
        pytest.fail(message + " (LEDGER_TEST_REQUIRE_ALL is set, so this may not skip)")
    pytest.skip(message)


def memory_store(tmp_path: pathlib.Path) -> MemoryStore:
    return MemoryStore()


def sqlite_store(tmp_path: pathlib.Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "ledger.db")


def server_url(variable: str, local: str) -> tuple[str | None, str]:
    """The server a test uses, or None and why: $variable where it is set (set empty: none),
    else the local server at `local` if it answers within a few seconds."""
    if variable in os.environ:
        return os.environ[variable] or None, f"{variable} is set empty"
    try:
        if local.startswith("postgresql:"):
            import psycopg
            psycopg.connect(local, connect_timeout=3).close()
        else:
            import redis
            with redis.Redis.from_url(local, socket_connect_timeout=3, socket_timeout=3) as client:
                client.ping()
    except Exception as e:  # no driver, nothing listening, no such database: the tests that need it skip
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        return None, f"{local} did not answer ({reason}) and {variable} is not set"
    return local, ""


POSTGRES_URL, POSTGRES_MISSING = server_url("LEDGER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL, REDIS_MISSING = server_url("LEDGER_TEST_REDIS", "redis://127.0.0.1:6379/15")
SERVER_SCRATCH: list = []   # how to remove what a test left on a shared server


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def scratch_name() -> str:
    return "ledger_test_" + uuid.uuid4().hex[:12]


def need_postgres() -> None:
    need("PostgreSQL", bool(POSTGRES_URL) and has_module("psycopg"),
         f"{POSTGRES_MISSING}; start one or set LEDGER_TEST_POSTGRES=postgresql://..., "
         f"and pip install 'psycopg[binary]'")


def need_redis() -> None:
    need("Redis", bool(REDIS_URL) and has_module("redis"),
         f"{REDIS_MISSING}; start one or set LEDGER_TEST_REDIS=redis://..., and pip install redis")


def postgres_store(tmp_path: pathlib.Path | None = None, url: str | None = None) -> ledger.PostgresStore:
    """A store on its own table (and application_name, to find its connections), dropped after the test."""
    need_postgres()
    table = scratch_name()
    url = url or POSTGRES_URL
    SERVER_SCRATCH.append(lambda: drop_postgres_table(table))
    separator = "&" if "?" in url else "?"
    return ledger.PostgresStore(f"{url}{separator}application_name={table}", table=table)


def redis_store(tmp_path: pathlib.Path | None = None, url: str | None = None) -> ledger.RedisStore:
    """A store under its own key prefix (and client name, to find its connections), removed after the test."""
    need_redis()
    name = scratch_name()
    url = url or REDIS_URL
    SERVER_SCRATCH.append(lambda: drop_redis_keys(url, name + ":"))
    separator = "&" if "?" in url else "?"
    return ledger.RedisStore(f"{url}{separator}client_name={name}", prefix=name + ":")


def postgres_admin():
    import psycopg
    return psycopg.connect(POSTGRES_URL, autocommit=True)


def drop_postgres_table(table: str) -> None:
    with postgres_admin() as admin:
        admin.execute(f'DROP TABLE IF EXISTS "{table}"')


def drop_redis_keys(url: str, prefix: str) -> None:
    import redis
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.ConnectionError:
        pass   # a private server the test already stopped
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _remove_server_scratch():
    yield
    if SERVER_SCRATCH:
        for core in list(ledger._HEARTBEAT.cores):   # counters still buffered go before their table
            core.flush(quietly=True)
    while SERVER_SCRATCH:
        SERVER_SCRATCH.pop()()


STORES = {"memory": memory_store, "sqlite": sqlite_store, "postgres": postgres_store, "redis": redis_store}


@pytest.fixture(params=list(STORES))
def store(request, tmp_path):
    s = STORES[request.param](tmp_path)
    yield s
    s.close()


@pytest.fixture
def g(tmp_path):
    """A guard on its own SQLite file."""
    guard = Guard(str(tmp_path / "ledger.db"), quiet=True)
    yield guard
    guard.close()


class Counter:
    """A tool that records each run."""

    def __init__(self, result=None, fail=False, sleep=0.0):
        self.calls = []
        self.result, self.fail, self.sleep = result, fail, sleep

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.sleep:
            time.sleep(self.sleep)
        if self.fail:
            raise RuntimeError("tool failed")
        return self.result if self.result is not None else {"args": list(args), "kwargs": kwargs}


def counter(guard, **behaviour):
    """A Counter as a tool: an instance whose state changes has no name of its own, so it gets one."""
    return guard.once(Counter(**behaviour), name="counter")


@pytest.fixture(autouse=True)
def _own_scope():
    """Each test starts outside any workflow()/as_caller() a test before it set as a statement."""
    yield
    for var in (ledger._WORKFLOW, ledger._CALLER, ledger._STATEMENT):
        var.set(None)
    ledger._SCOPE_TOKENS.set(())


# ---------------------------------------------------------------------------
# The ledgers the command line and the dashboard are tested on, and children
# that run `python ledger.py ...` as a user would.
# ---------------------------------------------------------------------------

LEDGER_PY = str(pathlib.Path(__file__).resolve().parent / "ledger.py")
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture
def ledger_db(tmp_path):
    """A ledger of five calls in three workflows: blocked and replayed duplicates, one failure
    (whose message is markup), one stale call, and an argument that looks like an XSS attack."""
    path = tmp_path / "ledger.db"
    g = Guard(str(path), quiet=True)

    def lookup(q):
        return {"q": q}

    def flaky(x):
        raise ValueError("<svg onload=alert(2)> upstream said no")

    def interrupted(job):
        raise KeyboardInterrupt

    def charge(order_id, amount):
        return {"charged": amount, "order": order_id}

    tools = g.wrap_tools({"charge_card": charge, "crm.lookup": lookup, "flaky_api": flaky,
                          "nightly_job": interrupted})
    g.policy("crm.lookup", replay=True, cost=0.25)
    g.policy("nightly_job", lease=0.05, recover="block")
    with g.workflow("order-7"):
        tools["charge_card"](7, 9.5)
        tools["charge_card"](7, 9.5)
        tools["crm.lookup"](q=XSS)
        tools["crm.lookup"](q=XSS)
        with pytest.raises(ValueError):
            tools["flaky_api"](x=1)
    with g.workflow("triage").as_caller("agent-2"):
        for _ in range(3):
            tools["crm.lookup"](q="acme corp")
    with pytest.raises(KeyboardInterrupt):  # interrupted under recover="block": RUNNING until its lease runs out
        tools["nightly_job"](job=1)
    g.close()
    time.sleep(0.06)
    return path


@pytest.fixture
def unknown_db(tmp_path):
    """A ledger holding one UNKNOWN call (charge_card timed out) and one SUCCESS."""
    path = tmp_path / "ledger.db"
    g = Guard(str(path), quiet=True)

    def timed_out(order):
        raise TimeoutError("no answer from the provider")
    g.wrap_tools({"charge_card": timed_out, "lookup": lambda q: q})["lookup"](q="acme")
    with pytest.raises(TimeoutError):
        g.wrap_tools({"charge_card": timed_out})["charge_card"](order=7)
    g.close()
    return path


def records_of(path) -> list[dict]:
    return [r.as_dict() for r in SQLiteStore(path, create=False).records()]


def interruptible() -> None:
    """In a child before it starts: take Ctrl-C as a terminal's foreground program does, even when
    this test run was started with SIGINT ignored (as shells start background jobs)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Lines:
    """The lines a child process prints, read in the background so a test can wait with a timeout."""

    def __init__(self, stream):
        import queue
        self.queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def until(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"the process exited before printing {text!r}"
            if text in line:
                return line


# ---------------------------------------------------------------------------
# Reporting: the run ends with one line saying what skipped and why.
# ---------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost, so after pytest's own summary
def pytest_terminal_summary(terminalreporter):
    yield
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ").split(":")[0]] += 1
    if not reasons:
        terminalreporter.write_line("skipped: nothing")
        return
    terminalreporter.write_line(f"skipped {sum(reasons.values())}: " + "; ".join(
        f"{count} because {what}" for what, count in reasons.most_common()) + " (see the skip reasons above)")
