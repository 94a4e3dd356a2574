"""The specification of ledger.py, grouped by the section of ledger.py each part covers.

Run with `python -m pytest`. Tests that need a PostgreSQL or Redis server or a
Chromium browser skip where there is none (set LEDGER_TEST_POSTGRES,
LEDGER_TEST_REDIS, LEDGER_TEST_CHROMIUM to enable them); with
LEDGER_TEST_REQUIRE_ALL=1, as under CI, they fail instead of skipping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import decimal
import enum
import functools
import json
import multiprocessing
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import NamedTuple

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import ledger
from ledger import (BLOCKED, Guard, LedgerError, MemoryStore, Record, SQLiteStore, Status, check_store,
                    current_key)

HERE = pathlib.Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# Test support: what a test needs from the machine, store factories for every
# backend, and a tool that counts its runs.
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


STORES = {"memory": memory_store, "sqlite": sqlite_store}


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
        self.__name__ = self.__qualname__ = "counter"

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.sleep:
            time.sleep(self.sleep)
        if self.fail:
            raise RuntimeError("tool failed")
        return self.result if self.result is not None else {"args": list(args), "kwargs": kwargs}


def charge(order_id: int, amount: float = 10.0, currency: str = "usd") -> dict:
    CHARGES.append((order_id, amount, currency))
    return {"charged": amount, "order": order_id}


CHARGES: list = []


@pytest.fixture(autouse=True)
def _reset_charges():
    CHARGES.clear()


# ---------------------------------------------------------------------------
# Normalize: canonical forms of argument values.
# ---------------------------------------------------------------------------

def fp(**arguments):
    return ledger.fingerprint("t", "wf", ledger._canonical_arguments(arguments))


def test_dict_order_never_matters():
    assert fp(x={"a": 1, "b": 2}) == fp(x={"b": 2, "a": 1})


def test_tuples_equal_lists():
    assert fp(x=(1, 2, 3)) == fp(x=[1, 2, 3])


def test_float_drift_is_absorbed():
    assert fp(amount=99.99) == fp(amount=99.9900000001)
    assert fp(amount=0.1 + 0.2) == fp(amount=0.3)


def test_integral_float_equals_int():
    assert fp(amount=99.0) == fp(amount=99)


def test_negative_zero_equals_zero():
    assert fp(x=-0.0) == fp(x=0.0) == fp(x=0)


def test_nan_and_infinities_are_stable_and_distinct():
    values = [fp(x=float("nan")), fp(x=float("inf")), fp(x=float("-inf"))]
    assert values == [fp(x=float("nan")), fp(x=float("inf")), fp(x=float("-inf"))]
    assert len(set(values)) == 3


def test_bool_is_not_int():
    assert fp(x=True) != fp(x=1)
    assert fp(x=False) != fp(x=0)


def test_distinct_values_give_distinct_fingerprints():
    values = [1, "1", 1.5, "1.5", decimal.Decimal("1.5"), [1], {"1": 1}, None, "", b"1",
              ["\x00decimal", "1.5"], "\x00x", {1: 1}, {"\x00map": []}]
    assert len({fp(x=v) for v in values}) == len(values)


@given(st.floats(min_value=-1e307, max_value=1e307))
def test_float_rule_is_ten_significant_digits(x):
    assert fp(x=x) == fp(x=float(format(x, ".10g")))


@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=6))
def test_dict_fingerprint_ignores_insertion_order(d):
    assert fp(x=d) == fp(x=dict(reversed(list(d.items()))))


@given(st.frozensets(st.integers() | st.text(max_size=4), max_size=8))
def test_sets_and_frozensets_agree(s):
    assert fp(x=set(s)) == fp(x=frozenset(s))


def test_set_fingerprint_is_the_same_whatever_the_hash_seed():
    code = ("import sys; sys.path.insert(0, %r); import ledger; "
            "print(ledger.fingerprint('t', 'w', ledger._canonical_arguments({'x': {'a', 'b', 'c', 'zz', 'q'}})))"
            % str(HERE))
    seen = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in (1, 2, 3)}
    assert len(seen) == 1


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Pair(NamedTuple):
    a: int
    b: str


class Model:
    """Looks like a pydantic model."""

    def __init__(self, **fields):
        self.fields = fields

    def model_dump(self):
        return dict(self.fields)


@pytest.mark.parametrize("make", [
    lambda: decimal.Decimal("1.50"),
    lambda: dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
    lambda: dt.date(2026, 1, 2),
    lambda: uuid.UUID("12345678-1234-5678-1234-567812345678"),
    lambda: Color.RED,
    lambda: pathlib.PurePosixPath("/a/b"),
    lambda: b"\x00\xff",
    lambda: Point(1, 2),
    lambda: Pair(1, "x"),
    lambda: Model(a=1, b=[1, 2]),
], ids=["decimal", "datetime", "date", "uuid", "enum", "path", "bytes", "dataclass", "namedtuple", "model"])
def test_special_values_have_canonical_forms(make):
    assert fp(x=make()) == fp(x=make())


def test_decimal_trailing_zeros_do_not_matter():
    assert fp(x=decimal.Decimal("1.50")) == fp(x=decimal.Decimal("1.5"))


def test_aware_datetimes_compare_in_utc():
    utc = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)
    paris = utc.astimezone(dt.timezone(dt.timedelta(hours=1)))
    assert fp(x=utc) == fp(x=paris)
    assert fp(x=utc) != fp(x=utc.replace(tzinfo=None))


def test_unsupported_argument_raises_a_typeerror_naming_it():
    with pytest.raises(ledger.FingerprintError) as err:
        fp(payload={"items": [1, object()]})
    assert isinstance(err.value, TypeError) and isinstance(err.value, LedgerError)
    assert "payload['items'][1]" in str(err.value) and "key=" in str(err.value)


# ---------------------------------------------------------------------------
# Fingerprint: binding, keys, tool names.
# ---------------------------------------------------------------------------

def test_positional_keyword_and_default_spellings_are_one_call(g):
    assert g(charge, 1) == {"charged": 10.0, "order": 1}
    assert g(charge, order_id=1) is BLOCKED
    assert g(charge, 1, 10.0) is BLOCKED
    assert g(charge, 1, amount=10.0, currency="usd") is BLOCKED
    assert len(CHARGES) == 1


def test_different_arguments_are_different_calls(g):
    g(charge, 1)
    g(charge, 2)
    g(charge, 1, currency="eur")
    assert len(CHARGES) == 3


def test_key_replaces_the_arguments_in_the_fingerprint(g):
    def send_email(to, sent_at):
        CHARGES.append(to)
    g(send_email, "a@x", dt.datetime.now(), key="welcome-42")
    g(send_email, "a@x", dt.datetime.now(), key="welcome-42")
    assert CHARGES == ["a@x"]


def test_key_allows_arguments_that_cannot_be_fingerprinted(g):
    def post(client, body):
        return body
    assert g(post, object(), "hi", key="post-1") == "hi"


def test_a_tool_with_its_own_key_parameter_gets_it(g):
    def put(key, value):
        CHARGES.append((key, value))
    g(put, key="k1", value=1)
    g(put, key="k2", value=1)
    g(put, key="k3", value=1, idempotency_key="same")
    g(put, key="k4", value=1, idempotency_key="same")
    assert CHARGES == [("k1", 1), ("k2", 1), ("k3", 1)]


def test_unfingerprintable_argument_fails_before_the_tool_runs(g):
    tool = Counter()
    with pytest.raises(TypeError, match="argument 'client'"):
        g(tool, client=threading.Lock())
    assert tool.calls == []


def test_wrong_arguments_fail_before_the_tool_runs(g):
    with pytest.raises(TypeError):
        g(charge, 1, 2, 3, 4)
    assert CHARGES == [] and g.history() == []


def test_workflows_isolate_calls(g):
    g.workflow("order-1")(charge, 1)
    g.workflow("order-2")(charge, 1)
    g.workflow("order-1")(charge, 1)
    assert len(CHARGES) == 2


def test_tool_name_is_the_same_run_as_a_script_or_imported(tmp_path):
    (tmp_path / "agent.py").write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import ledger
        def send(to): pass
        if __name__ == "__main__":
            print(ledger.tool_name(send))
    """ % str(HERE)))
    as_script = subprocess.run([sys.executable, "agent.py"], cwd=tmp_path, capture_output=True, text=True)
    imported = subprocess.run([sys.executable, "-c", "import agent, ledger; print(ledger.tool_name(agent.send))"],
                              cwd=tmp_path, capture_output=True, text=True)
    as_module = subprocess.run([sys.executable, "-m", "agent"], cwd=tmp_path, capture_output=True, text=True)
    assert as_script.stdout == imported.stdout == as_module.stdout == "agent.send\n"


def test_two_lambdas_never_share_records(g):
    runs = []
    first, second = (lambda x: runs.append(("first", x))), (lambda x: runs.append(("second", x)))
    g(first, 1)
    g(second, 1)
    assert runs == [("first", 1), ("second", 1)]


def test_closures_over_different_values_are_different_tools(g):
    def make(currency):
        def pay(amount):
            CHARGES.append((currency, amount))
        return pay
    g(make("usd"), 5)
    g(make("eur"), 5)
    g(make("usd"), 5)
    assert CHARGES == [("usd", 5), ("eur", 5)]


def test_partials_bind_their_arguments_into_the_call(g):
    g(functools.partial(charge, currency="eur"), 1)
    g(functools.partial(charge, currency="usd"), 1)
    g(charge, 1, currency="eur")
    assert CHARGES == [(1, 10.0, "eur"), (1, 10.0, "usd")]


# ---------------------------------------------------------------------------
# Records and states: RUNNING -> SUCCESS | FAILED, policies, results, integrity.
# ---------------------------------------------------------------------------

def test_a_duplicate_is_blocked_and_the_tool_runs_once(g):
    assert g(charge, 7, 99.0) == {"charged": 99.0, "order": 7}
    assert g(charge, 7, 99.0) is BLOCKED
    assert not BLOCKED and repr(BLOCKED) == "BLOCKED"
    assert CHARGES == [(7, 99.0, "usd")]


def test_replay_returns_the_recorded_result(g):
    g.policy(charge, replay=True)
    first = g(charge, 7)
    assert g(charge, 7) == first and len(CHARGES) == 1


def test_records_survive_a_restart(tmp_path):
    path = str(tmp_path / "l.db")
    Guard(path, quiet=True)(charge, 1)
    again = Guard(path, quiet=True)
    assert again(charge, 1) is BLOCKED and len(CHARGES) == 1


def test_a_failed_tool_raises_unchanged_and_the_next_call_runs_again(g):
    boom = ValueError("declined")
    tries = []

    def pay(order_id):
        tries.append(order_id)
        if len(tries) == 1:
            raise boom
        return "ok"
    with pytest.raises(ValueError) as err:
        g(pay, 1)
    assert err.value is boom
    assert g.history()[0]["status"] == "FAILED" and "declined" in g.history()[0]["error"]
    assert g(pay, 1) == "ok" and g(pay, 1) is BLOCKED
    assert tries == [1, 1]


def test_max_allows_that_many_runs(g):
    g.policy(charge, max=2)
    results = [g(charge, 1) for _ in range(4)]
    assert len(CHARGES) == 2 and results[2:] == [BLOCKED, BLOCKED]


def test_ttl_lets_the_call_run_again_after_it(g):
    g.policy(charge, ttl=0.2, replay=True)
    g(charge, 1)
    g(charge, 1)
    time.sleep(0.25)
    g(charge, 1)
    assert len(CHARGES) == 2


def test_unlimited_tools_always_run_and_keep_no_record(g):
    g.policy(charge, unlimited=True)
    g(charge, 1)
    g(charge, 1)
    assert len(CHARGES) == 2 and g.history() == []


def test_a_result_that_is_not_json_is_recorded_as_done_and_replays_blocked(g, caplog):
    g._core.quiet = False
    made = []

    def make_lock(name):
        made.append(name)
        return threading.Lock()
    g.policy(make_lock, replay=True)
    first = g(make_lock, "a")
    assert hasattr(first, "acquire")
    assert g(make_lock, "a") is BLOCKED
    assert made == ["a"]
    record = g.history()[0]
    assert record["status"] == "SUCCESS" and "lock" in record["unstored"]
    assert "lock" in caplog.text and "serializer" in caplog.text


def test_a_result_over_the_size_limit_is_not_stored(g, monkeypatch):
    monkeypatch.setattr(ledger, "MAX_RESULT_BYTES", 100)
    g.policy(charge, replay=True)
    big = Counter(result="x" * 200)
    g.policy(big, replay=True)
    assert g(big, 1) == "x" * 200
    assert g(big, 1) is BLOCKED and len(big.calls) == 1


def test_a_serializer_stores_what_json_cannot(g):
    class Codec:
        @staticmethod
        def dumps(value):
            return json.dumps(sorted(value))

        @staticmethod
        def loads(text):
            return set(json.loads(text))
    tool = Counter(result={3, 1, 2})
    g.policy(tool, replay=True, serializer=Codec)
    assert g(tool) == {1, 2, 3}
    assert g(tool) == {1, 2, 3} and len(tool.calls) == 1


def test_blocked_return_replaces_blocked_in_wrapped_tools(g):
    tools = g.wrap_tools({"charge": charge}, blocked_return={"status": "duplicate"})
    tools["charge"](1)
    assert tools["charge"](1) == {"status": "duplicate"}


def test_validate_rejects_a_key_reused_with_other_arguments(g):
    g.policy(charge, validate=True)
    g(charge, 1, 10.0, key="pay-1")
    assert g(charge, 1, 10.0, key="pay-1") is BLOCKED
    with pytest.raises(ledger.KeyReuseError, match="pay-1"):
        g(charge, 1, 20.0, key="pay-1")
    assert len(CHARGES) == 1


def test_validate_with_names_checks_only_those_arguments(g):
    g.policy(charge, validate=["amount"])
    g(charge, 1, 10.0, key="pay-1")
    assert g(charge, 2, 10.0, key="pay-1") is BLOCKED
    with pytest.raises(ledger.KeyReuseError):
        g(charge, 1, 11.0, key="pay-1")


@pytest.mark.parametrize("bad", [dict(max=0), dict(ttl=-1), dict(lease=0), dict(recover="maybe"),
                                 dict(wait=-1), dict(serializer=object())])
def test_invalid_policies_are_rejected(g, bad):
    with pytest.raises(ledger.ConfigError):
        g.policy(charge, **bad)


def tamper(store, id, **changes):
    record = store.get(id)
    assert store.swap(record.evolve(**changes), record.epoch, record.owner)


def test_a_tampered_result_is_never_replayed_nor_rerun(g):
    g.policy(charge, replay=True)
    g(charge, 1)
    record = g.store.records()[0]
    tamper(g.store, record.id, result='{"charged": 1000000}')
    with pytest.raises(ledger.IntegrityError, match="signature"):
        g(charge, 1)
    assert len(CHARGES) == 1


def test_a_result_moved_from_another_record_fails_verification(g):
    g.policy(charge, replay=True)
    g(charge, 1)
    g(charge, 2)
    one, two = g.store.records()
    tamper(g.store, two.id, result=one.result, sig=one.sig)
    with pytest.raises(ledger.IntegrityError):
        g(charge, 2)


def test_another_secret_cannot_verify_records(tmp_path):
    path = str(tmp_path / "l.db")
    first = Guard(path, secret="one", quiet=True)
    first.policy(charge, replay=True)
    first(charge, 1)
    second = Guard(path, secret="two", quiet=True)
    second.policy(charge, replay=True)
    with pytest.raises(ledger.IntegrityError):
        second(charge, 1)


def test_the_signing_key_file_sits_beside_the_database_with_mode_0600(tmp_path, monkeypatch):
    monkeypatch.delenv("LEDGER_SECRET", raising=False)
    path = tmp_path / "l.db"
    Guard(str(path), quiet=True)(charge, 1)
    key = tmp_path / "l.db.key"
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
    assert key.read_bytes() not in path.read_bytes()


def test_ledger_secret_environment_variable_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LEDGER_SECRET", "from-env")
    Guard(str(tmp_path / "l.db"), quiet=True)(charge, 1)
    assert not (tmp_path / "l.db.key").exists()


# ---------------------------------------------------------------------------
# Stores: the contract, for every backend.
# ---------------------------------------------------------------------------

def test_every_store_passes_check_store(store):
    check_store(store)


def test_check_store_leaves_other_records_alone(store):
    guard = Guard(store, quiet=True, secret="s")
    guard(charge, 1)
    guard.workflow("other")(charge, 2)
    before = [r.as_dict() for r in store.records()]
    check_store(store)
    assert [r.as_dict() for r in store.records()] == before


class LedgerModel(RuleBasedStateMachine):
    """The guard against a model of the state machine, on one store."""

    make_store = staticmethod(lambda: MemoryStore())

    def __init__(self):
        super().__init__()
        self.store = self.make_store()
        self.guard = Guard(self.store, quiet=True, secret="model")
        self.guard.policy(model_tool, replay=True)
        self.status: dict[int, str] = {}
        self.values: dict[int, int] = {}
        self.runs: list[int] = []
        MODEL_RUNS.clear()

    def call_id(self, k):
        return self.guard._prepare(model_tool, (k, False), {"key": f"call-{k}"}).id

    @rule(k=st.integers(0, 3), fails=st.booleans())
    def call(self, k, fails):
        expect_run = self.status.get(k) != "SUCCESS"
        before = len(MODEL_RUNS)
        try:
            value = self.guard(model_tool, k, fails, key=f"call-{k}")
        except RuntimeError:
            value = None
        ran = len(MODEL_RUNS) - before
        assert ran == (1 if expect_run else 0), (k, self.status.get(k), ran)
        if expect_run:
            self.status[k] = "FAILED" if fails else "SUCCESS"
            if not fails:
                self.values[k] = value
        else:
            assert value == self.values[k]

    @rule(k=st.integers(0, 3))
    def crash_mid_call(self, k):
        """A worker claimed the call and died: its RUNNING record's lease has run out."""
        id = self.call_id(k)
        current = self.store.get(id)
        dead = Record(id=id, tool=ledger.tool_name(model_tool), workflow="default", caller=None,
                      status="RUNNING", owner="dead", epoch=current.epoch + 1 if current else 1,
                      lease_until=time.time() - 1, run_key=id, created=time.time())
        if current is None:
            assert self.store.insert(dead)
        else:
            assert self.store.swap(dead, current.epoch, current.owner)
        self.status[k] = "CRASHED"

    @rule(k=st.integers(0, 3))
    def operator_retry(self, k):
        released = self.guard.retry(model_tool, k, False, key=f"call-{k}")
        assert released == (self.status.get(k) in ("SUCCESS", "CRASHED"))
        if released:
            self.status[k] = "FAILED"

    @invariant()
    def records_match_the_model(self):
        for k, status in self.status.items():
            record = self.store.get(self.call_id(k))
            expected = "RUNNING" if status == "CRASHED" else status
            assert record is not None and record.status == expected, (k, status, record)
        assert len(self.store.records()) == len(self.status)

    def teardown(self):
        self.store.close()


MODEL_RUNS: list = []


def model_tool(k: int, fails: bool) -> int:
    MODEL_RUNS.append(k)
    if fails:
        raise RuntimeError("model failure")
    return k * 10 + len(MODEL_RUNS)


@pytest.mark.parametrize("backend", list(STORES))
def test_state_machine_model(backend, tmp_path_factory):
    def make():
        return STORES[backend](tmp_path_factory.mktemp("model"))

    class Model(LedgerModel):
        make_store = staticmethod(make)
    Model.TestCase.settings = settings(max_examples=50, stateful_step_count=25, deadline=None)
    Model.TestCase().runTest()


# ---------------------------------------------------------------------------
# Engine: shared waits, leases, crashes, fencing, races, async.
# ---------------------------------------------------------------------------

PERSISTENT = [name for name in STORES if name != "memory"]
FORK = multiprocessing.get_context("fork")


@pytest.fixture(params=PERSISTENT)
def shared_store(request, tmp_path):
    """A store that several processes can share."""
    s = STORES[request.param](tmp_path)
    yield s
    s.close()


def log_run(path: str, value: str, sleep: float = 0.0) -> str:
    """A tool whose runs are counted across processes, one line each."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {current_key()}\n")
    if sleep:
        time.sleep(sleep)
    return f"{value}-{os.getpid()}"


def runs_of(path) -> list[str]:
    return pathlib.Path(path).read_text().splitlines() if os.path.exists(path) else []


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_threads_racing_on_one_call_run_it_once(store, tmp_path):
    guard = Guard(store, quiet=True, secret="s")
    path, barrier, results = str(tmp_path / "runs"), threading.Barrier(16), []

    def worker():
        barrier.wait()
        results.append(guard(log_run, path, "v", 0.05))
    threads = [threading.Thread(target=worker) for _ in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(runs_of(path)) == 1
    assert results.count(BLOCKED) == 15


def _race_in_process(store, path, barrier, queue):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(log_run, replay=True)
    barrier.wait()
    queue.put(guard(log_run, path, "v", 0.1))


def test_processes_racing_on_one_call_run_it_once(shared_store, tmp_path):
    path, barrier, queue = str(tmp_path / "runs"), FORK.Barrier(4), FORK.Queue()
    procs = [FORK.Process(target=_race_in_process, args=(shared_store, path, barrier, queue)) for _ in range(4)]
    [p.start() for p in procs]
    values = [queue.get(timeout=30) for _ in procs]
    [p.join(10) for p in procs]
    assert len(runs_of(path)) == 1
    assert len(set(values)) == 1 and values[0].startswith("v-")


def test_counters_are_exact_under_concurrency(store):
    guard = Guard(store, quiet=True, secret="s")
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        for _ in range(50):
            guard(charge, 1)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    stats = guard.stats()
    assert (stats["attempts"], stats["executed"], stats["blocked"]) == (400, 1, 399)


def test_replay_waiters_share_the_running_leaders_result(store):
    guard = Guard(store, quiet=True, secret="s")
    tool = Counter(result="answer", sleep=0.2)
    guard.policy(tool, replay=True)
    results, threads = [], []
    for _ in range(10):
        threads.append(threading.Thread(target=lambda: results.append(guard.execute(tool, "q"))))
        threads[-1].start()
    [t.join() for t in threads]
    assert [o.value for o in results] == ["answer"] * 10 and len(tool.calls) == 1
    assert sorted(o.source for o in results) == ["executed"] + ["shared"] * 9


class CountingStore(SQLiteStore):
    """A real SQLite store that counts reads, to tell notification from polling."""

    gets = 0

    def get(self, id):
        CountingStore.gets += 1
        return super().get(id)


def test_in_process_waiters_are_woken_by_notification_not_polling(tmp_path):
    guard = Guard(CountingStore(tmp_path / "l.db"), quiet=True, secret="s")
    tool = Counter(result="done", sleep=0.5)
    guard.policy(tool, replay=True)
    leader = threading.Thread(target=guard, args=(tool,))
    leader.start()
    wait_for(lambda: tool.calls, what="the leader to start")
    CountingStore.gets = 0
    finished = []
    waiter = threading.Thread(target=lambda: finished.append((guard(tool), time.perf_counter())))
    waiter.start()
    leader.join()
    leader_done = time.perf_counter()
    waiter.join()
    assert finished[0][0] == "done"
    assert CountingStore.gets <= 3, f"the waiter read the store {CountingStore.gets} times while waiting"
    assert finished[0][1] - leader_done < 0.05


def test_waiters_get_leader_failed_and_the_next_call_runs_again(store):
    guard = Guard(store, quiet=True, secret="s")
    tool = Counter(fail=True, sleep=0.2)
    guard.policy(tool, replay=True)
    errors = []

    def waiter():
        try:
            guard(tool, 1)
        except Exception as e:
            errors.append(type(e))
    leader = threading.Thread(target=waiter)
    leader.start()
    wait_for(lambda: tool.calls, what="the leader to start")
    waiters = [threading.Thread(target=waiter) for _ in range(3)]
    [t.start() for t in waiters]
    [t.join() for t in [leader] + waiters]
    assert sorted(errors, key=lambda e: e.__name__) == [ledger.LeaderFailed] * 3 + [RuntimeError]
    assert len(tool.calls) == 1
    tool.fail = False
    assert guard(tool, 1) is not BLOCKED and len(tool.calls) == 2


def test_a_bounded_wait_that_runs_out_raises(store):
    guard = Guard(store, quiet=True, secret="s")
    tool = Counter(sleep=0.5)
    guard.policy(tool, replay=True, wait=0.1)
    leader = threading.Thread(target=guard, args=(tool,))
    leader.start()
    wait_for(lambda: tool.calls, what="the leader to start")
    started = time.time()
    with pytest.raises(ledger.WaitTimeout, match="wait="):
        guard(tool)
    assert time.time() - started < 0.4
    leader.join()
    assert len(tool.calls) == 1


def _run_long_tool(store, path, lease, sleep, queue=None):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(log_run, lease=lease, replay=True)
    value = guard(log_run, path, "long", sleep, key="long-job")
    if queue is not None:
        queue.put((value, guard.stats()["fenced"]))


def test_a_tool_running_ten_times_its_lease_is_never_run_twice(shared_store, tmp_path):
    path = str(tmp_path / "runs")
    leader = FORK.Process(target=_run_long_tool, args=(shared_store, path, 0.2, 2.0))
    leader.start()
    wait_for(lambda: runs_of(path), what="the leader to start")
    guard = Guard(shared_store, quiet=True, secret="s")
    guard.policy(log_run, lease=0.2)
    seen = set()
    while leader.is_alive():
        seen.add(guard(log_run, path, "long", 0, key="long-job"))
        time.sleep(0.05)
    leader.join()
    assert len(runs_of(path)) == 1 and seen <= {BLOCKED}
    assert guard.store.records()[0].status == "SUCCESS"


def test_a_call_killed_mid_run_is_taken_over_after_its_lease(shared_store, tmp_path):
    path = str(tmp_path / "runs")
    victim = FORK.Process(target=_run_long_tool, args=(shared_store, path, 1.0, 60))
    victim.start()
    wait_for(lambda: runs_of(path), what="the victim to start")
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    guard = Guard(shared_store, quiet=True, secret="s")
    guard.policy(log_run, lease=1.0)
    assert guard(log_run, path, "long", 0, key="long-job") is BLOCKED   # its lease is still alive
    wait_for(lambda: shared_store.records()[0].stale(), what="the lease to expire")
    value = guard(log_run, path, "long", 0, key="long-job")
    assert value == f"long-{os.getpid()}"
    runs = runs_of(path)
    assert len(runs) == 2
    assert runs[0].split()[1] == runs[1].split()[1], "current_key() must survive the takeover"
    record = shared_store.records()[0]
    assert (record.status, record.epoch, record.executed) == ("SUCCESS", 2, 2)


def test_recover_block_keeps_a_crashed_call_blocked_until_retried(shared_store, tmp_path):
    path = str(tmp_path / "runs")
    victim = FORK.Process(target=_run_long_tool, args=(shared_store, path, 0.3, 60))
    victim.start()
    wait_for(lambda: runs_of(path), what="the victim to start")
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    guard = Guard(shared_store, quiet=True, secret="s")
    guard.policy(log_run, lease=0.3, recover="block")
    wait_for(lambda: shared_store.records()[0].stale(), what="the lease to expire")
    assert guard(log_run, path, "long", 0, key="long-job") is BLOCKED
    assert guard.stats()["stale"] == 1
    assert guard.retry(log_run, path, "long", 0, key="long-job") is True
    assert guard(log_run, path, "long", 0, key="long-job") == f"long-{os.getpid()}"
    assert len(runs_of(path)) == 2


def test_a_paused_leader_is_fenced_off_and_its_caller_still_gets_its_value(shared_store, tmp_path):
    path, queue = str(tmp_path / "runs"), FORK.Queue()
    paused = FORK.Process(target=_run_long_tool, args=(shared_store, path, 0.4, 1.0, queue))
    paused.start()
    wait_for(lambda: runs_of(path), what="the leader to start")
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: shared_store.records()[0].stale(), what="the paused leader's lease to expire")
        guard = Guard(shared_store, quiet=True, secret="s")
        guard.policy(log_run, lease=0.4, replay=True)
        mine = guard(log_run, path, "long", 0, key="long-job")
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    theirs, fenced = queue.get(timeout=30)
    paused.join(10)
    assert theirs == f"long-{paused.pid}" and fenced == 1
    record = shared_store.records()[0]
    assert (record.epoch, json.loads(record.result)) == (2, mine)
    assert guard(log_run, path, "long", 0, key="long-job") == mine and len(runs_of(path)) == 2


def test_a_leader_whose_record_was_taken_over_cannot_overwrite_it(g):
    def tool():
        record = g.store.records()[0]
        g.store.swap(record.evolve(owner="other", epoch=record.epoch + 1, status="SUCCESS",
                                   result='"theirs"'), record.epoch, record.owner)
        return "mine"
    assert g(tool) == "mine"
    assert g.store.records()[0].result == '"theirs"' and g.stats()["fenced"] == 1


class FlakyStore(SQLiteStore):
    """A real SQLite store whose writes fail on demand."""

    def __init__(self, path, fail_swaps=0, fail_gets=0):
        super().__init__(path)
        self.fail_swaps, self.fail_gets = fail_swaps, fail_gets

    def swap(self, record, epoch, owner):
        if self.fail_swaps:
            self.fail_swaps -= 1
            raise ledger.StoreError("disk I/O error")
        return super().swap(record, epoch, owner)

    def get(self, id):
        if self.fail_gets:
            self.fail_gets -= 1
            raise ledger.StoreError("database is locked")
        return super().get(id)


def test_a_store_that_cannot_complete_the_record_says_the_tool_ran(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "COMPLETION_RETRIES", (0.01, 0.01))
    store = FlakyStore(tmp_path / "l.db", fail_swaps=10)
    guard = Guard(store, quiet=True, secret="s")
    with pytest.raises(ledger.CompletionError, match="RAN") as err:
        guard(charge, 1)
    assert err.value.value == {"charged": 10.0, "order": 1} and len(CHARGES) == 1
    store.fail_swaps = 0
    assert guard(charge, 1) is BLOCKED and len(CHARGES) == 1


def test_completion_is_retried_through_brief_store_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "COMPLETION_RETRIES", (0.01, 0.01, 0.01))
    guard = Guard(FlakyStore(tmp_path / "l.db", fail_swaps=2), quiet=True, secret="s")
    assert guard(charge, 1)["charged"] == 10.0
    assert guard.store.records()[0].status == "SUCCESS"


def test_a_store_that_cannot_be_read_fails_before_the_tool_runs(tmp_path):
    guard = Guard(FlakyStore(tmp_path / "l.db", fail_gets=1), quiet=True, secret="s")
    with pytest.raises(ledger.StoreError, match="locked"):
        guard(charge, 1)
    assert CHARGES == []


def test_current_key_is_stable_across_a_failure_and_new_for_each_intended_run(g):
    keys = []

    def tool(fail):
        keys.append(current_key())
        if fail[0]:
            fail[0] = False
            raise RuntimeError
    flag = [True]
    with pytest.raises(RuntimeError):
        g(tool, flag, key="k")
    g(tool, flag, key="k")
    assert keys[0] == keys[1]
    g.policy(tool, ttl=0.05)
    g(tool, [False], key="t")
    time.sleep(0.06)
    g(tool, [False], key="t")
    assert keys[2] != keys[3]


def test_current_key_outside_a_guarded_call_raises_or_returns_the_default():
    with pytest.raises(LedgerError, match="inside a guarded"):
        current_key()
    assert current_key(default=None) is None


def test_async_tools_are_guarded_and_duplicates_blocked(g):
    runs = []

    async def fetch(url):
        runs.append(url)
        return url.upper()

    async def main():
        return [await g(fetch, "a"), await g(fetch, "a")]
    assert asyncio.run(main()) == ["A", BLOCKED] and runs == ["a"]


def test_waiting_never_blocks_the_event_loop(g):
    async def slow(x):
        await asyncio.sleep(0.3)
        return x
    g.policy(slow, replay=True)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        tick = asyncio.create_task(ticker())
        results = await asyncio.gather(*[g(slow, 1) for _ in range(20)])
        tick.cancel()
        return results, ticks
    results, ticks = asyncio.run(main())
    assert results == [1] * 20 and ticks >= 15


def test_a_sync_tool_guarded_inside_a_running_loop_works(g):
    async def main():
        return g(charge, 1), g(charge, 1)
    assert asyncio.run(main()) == ({"charged": 10.0, "order": 1}, BLOCKED)


def test_async_waiters_in_one_loop_are_woken_by_a_leader_in_another_thread(g):
    tool = Counter(result="r", sleep=0.3)
    g.policy(tool, replay=True)
    leader = threading.Thread(target=g, args=(tool,))
    leader.start()
    wait_for(lambda: tool.calls, what="the leader to start")

    async def main():
        return await asyncio.gather(*[g.execute(_async_view(tool)) for _ in range(5)])
    results = asyncio.run(main())
    leader.join()
    assert {o.value for o in results} == {"r"}


def _async_view(tool):
    """The same tool name, awaited: an async tool sharing a sync leader's record."""
    async def view():
        return tool()
    return ledger._Named(view, ledger.tool_name(tool))


def test_workflow_scopes_are_private_to_each_thread(g):
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with g.workflow(name):
            barrier.wait()
            g(charge, 1)
            seen[name] = g._workflow()
    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert seen == {"a": "a", "b": "b"} and len(CHARGES) == 2
    assert sorted(r["workflow"] for r in g.history()) == ["a", "b"]


def test_workflow_scopes_are_private_to_each_asyncio_task(g):
    async def request(name):
        with g.workflow(name), g.as_caller(f"agent-{name}"):
            await asyncio.sleep(0.01)
            return g._workflow(), g._caller()

    async def main():
        return await asyncio.gather(request("a"), request("b"))
    assert asyncio.run(main()) == [("a", "agent-a"), ("b", "agent-b")]
    assert g._workflow() == "default"


def test_as_caller_is_recorded_but_not_fingerprinted(g):
    g.as_caller("agent-A")(charge, 1)
    assert g.as_caller("agent-B")(charge, 1) is BLOCKED
    assert g.history()[0]["caller"] == "agent-A"


# ---------------------------------------------------------------------------
# Stores: SQLite specifics.
# ---------------------------------------------------------------------------

def test_sqlite_uses_wal_and_normal_sync_by_default_and_full_when_durable(tmp_path):
    plain, durable = SQLiteStore(tmp_path / "a.db"), SQLiteStore(tmp_path / "b.db", durable=True)
    assert plain._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert plain._conn().execute("PRAGMA synchronous").fetchone()[0] == 1
    assert durable._conn().execute("PRAGMA synchronous").fetchone()[0] == 2


def test_sqlite_gives_each_thread_its_own_connection(tmp_path):
    store = SQLiteStore(tmp_path / "a.db")
    other = []
    t = threading.Thread(target=lambda: other.append(store._conn()))
    t.start()
    t.join()
    assert other[0] is not store._conn()


def test_sqlite_records_the_schema_version(tmp_path):
    SQLiteStore(tmp_path / "a.db")
    assert sqlite3.connect(tmp_path / "a.db").execute("PRAGMA user_version").fetchone()[0] == ledger.SCHEMA_VERSION


def test_sqlite_refuses_a_database_from_a_newer_version(tmp_path):
    conn = sqlite3.connect(tmp_path / "a.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ledger.StoreError, match="newer"):
        SQLiteStore(tmp_path / "a.db")


def test_a_missing_directory_fails_before_the_tool_runs(tmp_path):
    guard = Guard(str(tmp_path / "nope" / "l.db"))
    with pytest.raises(ledger.StoreError, match="does not exist"):
        guard(charge, 1)
    assert CHARGES == []


def test_a_corrupt_database_fails_before_the_tool_runs(tmp_path):
    (tmp_path / "l.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ledger.StoreError, match="not a database"):
        Guard(str(tmp_path / "l.db"))(charge, 1)
    assert CHARGES == []


def test_a_path_that_is_a_directory_fails_clearly(tmp_path):
    with pytest.raises(ledger.StoreError, match="cannot open"):
        Guard(str(tmp_path))(charge, 1)


def _use_after_fork(store, queue):
    guard = Guard(store, quiet=True, secret="s")
    queue.put(guard(charge, 99))


def test_sqlite_is_safe_after_fork(tmp_path):
    store = SQLiteStore(tmp_path / "l.db")
    guard = Guard(store, quiet=True, secret="s")
    guard(charge, 1)
    queue = FORK.Queue()
    child = FORK.Process(target=_use_after_fork, args=(store, queue))
    child.start()
    assert queue.get(timeout=10) == {"charged": 10.0, "order": 99}
    child.join()
    assert guard(charge, 99) is BLOCKED and guard(charge, 2)["order"] == 2


def test_store_urls_open_the_right_backend(tmp_path):
    assert isinstance(ledger.open_store(":memory:"), MemoryStore)
    assert isinstance(ledger.open_store(str(tmp_path / "a.db")), SQLiteStore)
    assert ledger.open_store(f"sqlite:///{tmp_path}/b.db").path == f"{tmp_path}/b.db"
    with pytest.raises(ledger.ConfigError, match="unknown store URL"):
        ledger.open_store("ftp://x")


def test_ledger_db_environment_variable_chooses_the_default_store(tmp_path, monkeypatch):
    monkeypatch.setenv("LEDGER_DB", str(tmp_path / "env.db"))
    Guard(quiet=True)(charge, 1)
    assert (tmp_path / "env.db").exists()


# ---------------------------------------------------------------------------
# Public Guard: wrapping, policies, operating, output.
# ---------------------------------------------------------------------------

def test_importing_ledger_prints_nothing_and_creates_no_file(tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import ledger"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert (result.stdout, result.stderr, list(tmp_path.iterdir())) == ("", "", [])


def test_the_default_guard_opens_ledger_db_lazily(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import os; from ledger import guard; "
            "assert not os.path.exists('ledger.db'); guard(print, 'ran'); assert os.path.exists('ledger.db')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "LEDGER_DB"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ran\n"


def test_wrap_tools_returns_the_same_kind_of_collection(g):
    def search(q):
        return q
    as_dict = g.wrap_tools({"charge": charge, "search": search})
    as_list = g.wrap_tools([charge, search])
    assert list(as_dict) == ["charge", "search"] and isinstance(as_list, list)
    assert as_dict["search"]("x") == "x" and as_list[1]("y") == "y"


def test_wrapped_tools_keep_name_docstring_and_signature(g):
    wrapped = g.wrap_tools([charge])[0]
    assert wrapped.__name__ == "charge" and wrapped.__doc__ == charge.__doc__
    assert str(ledger.inspect.signature(wrapped)) == str(ledger.inspect.signature(charge))


def test_dict_keys_are_the_tool_names(g):
    g.wrap_tools({"payments.charge": charge})["payments.charge"](1)
    assert g.history()[0]["tool"] == "payments.charge"


def test_once_decorator_guards_the_function(g):
    @g.once
    def send(to):
        CHARGES.append(to)

    @g.once(replay=True, name="crm.lookup")
    def lookup(email):
        CHARGES.append(email)
        return {"email": email}
    send("a")
    send("a")
    assert lookup("b") == lookup("b") == {"email": "b"}
    assert CHARGES == ["a", "b"]
    assert {r["tool"] for r in g.history()} == {ledger.tool_name(send.__wrapped__), "crm.lookup"}


def test_async_wrapped_tools_stay_coroutine_functions(g):
    async def fetch(u):
        return u
    wrapped = g.wrap_tools([fetch])[0]
    assert ledger.inspect.iscoroutinefunction(wrapped)
    assert asyncio.run(wrapped("x")) == "x"


@pytest.mark.parametrize("form", ["function", "wrapped", "name"])
def test_retry_and_force_accept_the_function_its_wrapped_form_or_its_name(g, form):
    wrapped = g.wrap_tools({"pay": charge})["pay"]
    target = {"function": charge, "wrapped": wrapped, "name": "pay"}[form]
    g.policy("pay", max=1)
    wrapped(order_id=1)
    assert wrapped(order_id=1) is BLOCKED
    assert g.retry(target, order_id=1) is True
    wrapped(order_id=1)
    assert len(CHARGES) == 2
    assert g.force(target, order_id=1) == {"charged": 10.0, "order": 1} and len(CHARGES) == 3


def test_force_runs_even_while_the_call_is_recorded(g):
    g(charge, 1)
    g.force(charge, 1)
    assert len(CHARGES) == 2 and g.history()[0]["executed"] == 2


def test_history_filters_by_tool_and_workflow(g):
    def other(x):
        return x
    g(charge, 1)
    g(other, 1)
    g.workflow("w2")(charge, 2)
    assert len(g.history()) == 3
    assert len(g.history(tool=charge)) == 2
    assert [r["workflow"] for r in g.history(tool=charge, wf="w2")] == ["w2"]


def test_reset_clears_one_workflow_or_everything(g):
    g(charge, 1)
    g.workflow("w2")(charge, 1)
    assert g.reset(wf="w2") == 1 and len(g.history()) == 1
    assert g.reset() == 1 and g.history() == []


def test_stats_count_attempts_executions_blocks_and_savings(g):
    g.policy(charge, cost=0.5)
    for _ in range(3):
        g(charge, 1)
    failing = Counter(fail=True)
    with pytest.raises(RuntimeError):
        g(failing)
    stats = g.stats()
    assert {k: stats[k] for k in ("actions", "attempts", "executed", "blocked", "failed")} == \
        {"actions": 2, "attempts": 4, "executed": 2, "blocked": 2, "failed": 1}
    assert stats["saved_usd"] == 1.0


def test_log_writes_to_stderr_never_stdout(g, capsys):
    g(charge, 1)
    g(charge, 1)
    text = g.log()
    out, err = capsys.readouterr()
    assert out == "" and "attempts 2" in err and "blocked 1" in text


def test_warnings_go_through_the_ledger_logger_and_quiet_silences_them(tmp_path, caplog, capsys, monkeypatch):
    def make_lock(tag):
        return threading.Lock()
    Guard(str(tmp_path / "a.db"))(make_lock, "loud")
    Guard(str(tmp_path / "b.db"), quiet=True)(make_lock, "quiet")
    monkeypatch.setenv("LEDGER_QUIET", "1")
    Guard(str(tmp_path / "c.db"))(make_lock, "env")
    assert [r.name for r in caplog.records] == ["ledger"]
    assert "lock" in caplog.records[0].getMessage()
    assert capsys.readouterr().out == ""


def test_calls_differing_only_in_timestamps_draw_a_warning(g, caplog):
    g._core.quiet = False

    def send_email(to, sent_at):
        return to
    for _ in range(2):
        g(send_email, "a@x", dt.datetime.now())
    assert "differ only in sent_at" in caplog.text and "key=" in caplog.text


def test_distinct_calls_draw_no_retry_warning(g, caplog):
    g._core.quiet = False
    for n in range(5):
        g(charge, n)
    assert "differ only" not in caplog.text


def test_callbacks_fire_and_a_raising_callback_changes_nothing(g):
    events = []
    g.on_success(lambda r: events.append(("success", r.tool)))
    g.on_block(lambda r: events.append(("block", r.status)))
    g.on_fail(lambda r: events.append(("fail", r.error)))
    g.on_success(lambda r: 1 / 0)
    assert g(charge, 1)["order"] == 1
    g(charge, 1)
    with pytest.raises(RuntimeError):
        g(Counter(fail=True))
    assert [e[0] for e in events] == ["success", "block", "fail"]


def test_check_runs_the_self_test():
    assert Guard(":memory:").check() is True


def test_execute_reports_where_a_value_came_from(g):
    g.policy(charge, replay=True)
    first, second = g.execute(charge, 1), g.execute(charge, 1)
    assert (first.source, second.source) == ("executed", "replayed")
    assert first.value == second.value and first.key == second.key and first.ran and not second.ran


class RefusingStore(MemoryStore):
    """A broken store: reports no record, yet refuses every insert."""

    def get(self, id):
        return None

    def insert(self, record):
        return False


def test_a_store_that_refuses_every_claim_is_reported_not_spun_on():
    with pytest.raises(ledger.StoreError, match="check_store"):
        Guard(RefusingStore(), quiet=True)(charge, 1)
    assert CHARGES == []


def test_one_scope_object_can_be_entered_by_many_tasks_at_once(g):
    scope = g.workflow("shared")

    async def request(n):
        with scope:
            await asyncio.sleep(0.01 * (3 - n))
            return g._workflow()

    async def main():
        return await asyncio.gather(*[request(n) for n in range(3)])
    assert asyncio.run(main()) == ["shared"] * 3 and g._workflow() == "default"


def test_stats_see_counts_buffered_by_other_guards_in_the_process(tmp_path):
    path = str(tmp_path / "l.db")
    first, second = Guard(path, quiet=True), Guard(path, quiet=True)
    first(charge, 1)
    first(charge, 1)
    assert second.stats()["attempts"] == 2


def test_buffered_counters_are_written_at_a_clean_exit(tmp_path):
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(HERE)!r})
        from ledger import Guard
        g = Guard({str(tmp_path / 'l.db')!r}, quiet=True)
        for _ in range(5):
            g(print, "once")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    record = SQLiteStore(tmp_path / "l.db").records()[0]
    assert (record.attempts, record.executed, record.blocked) == (5, 1, 4)


def test_async_waiters_are_woken_by_notification_not_polling(tmp_path):
    guard = Guard(CountingStore(tmp_path / "l.db"), quiet=True, secret="s")

    async def slow():
        await asyncio.sleep(0.5)
        return "done"
    guard.policy(slow, replay=True)

    async def main():
        leader = asyncio.create_task(guard(slow))
        await asyncio.sleep(0.05)
        CountingStore.gets = 0
        results = await asyncio.gather(leader, *[guard(slow) for _ in range(5)])
        return results, CountingStore.gets
    results, gets = asyncio.run(main())
    assert results == ["done"] * 6
    assert gets <= 12, f"5 waiters read the store {gets} times while waiting"
