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
