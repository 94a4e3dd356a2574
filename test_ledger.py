"""The specification of ledger.py, grouped by the section of ledger.py each part covers.

Run with `python -m pytest`. Tests that need a PostgreSQL or Redis server use the
local ones (postgresql://postgres@127.0.0.1:5432/test, redis://127.0.0.1:6379/15)
when they answer, or the servers LEDGER_TEST_POSTGRES and LEDGER_TEST_REDIS name
(set empty: none); the browser tests use chromium (or LEDGER_TEST_CHROMIUM); the ledger-once tests
use the virtualenv python LEDGER_TEST_LEDGER_ONCE names. Tests whose server,
browser, framework package or ledger-once is missing skip, and the run ends with
a line saying which skipped and why (conftest.py); with LEDGER_TEST_REQUIRE_ALL=1,
as under CI, they fail instead of skipping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import datetime as dt
import decimal
import enum
import functools
import hashlib
import hmac
import importlib.util
import inspect
import json
import multiprocessing
import operator
import os
import pathlib
import random
import re
import runpy
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Annotated, NamedTuple, TypedDict

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import ledger
from ledger import BLOCKED, Guard, LedgerError, MemoryStore, Record, SQLiteStore, check_store, current_key

from conftest import (  # test support shared by every test file (fixtures come from there too)
    FORK, LEDGER_PY, POSTGRES_URL, REDIS_URL, STORES, Counter, counter,
    finished_record, forked, has_module, interruptible, Lines, need, need_postgres, need_redis,
    postgres_store, records_of, redis_store, scratch_record, TcpProxy, wait_for,
    with_address, writes_stalled,
)

HERE = pathlib.Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# Test tools: a payment tool the core tests charge through.
# ---------------------------------------------------------------------------

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
              ["\x00decimal", "1.5"], "\x00x", {1: 1}, {"\x00map": []}, {1}, {1, 2}, set(), [], {}]
    assert len({fp(x=v) for v in values}) == len(values)


@given(st.floats(min_value=-1e307, max_value=1e307))
def test_float_rule_is_ten_significant_digits(x):
    assert fp(x=x) == fp(x=float(format(x, ".10g")))
    assert fp(x=x) != fp(x=x + abs(x) * 1e-8 + 1e-300)   # and no coarser


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
    here = ledger.fingerprint("t", "w", ledger._canonical_arguments({"x": {"q", "zz", "c", "b", "a"}}))
    assert seen == {here + "\n"}   # and the same as in this process, whatever its seed
    assert here != ledger.fingerprint("t", "w", ledger._canonical_arguments({"x": {"a", "b", "c", "zz"}}))


class Text(str):
    """A str subclass: fingerprinted as its str value."""


def pinned_tool(query, limit=10, min_score=0.5, filters=None, tags=()):
    return None


# Calls and their fingerprints as computed when they were pinned: stored records are found by
# these ids, so any faster path to an id must give each of them byte for byte.
PINNED_FINGERPRINTS = [  # (fingerprint, workflow, positional, keyword arguments)
    ("c5324611243495e1a6d5079c5ce328d0", "default", (),
     dict(query="running shoes 1", limit=10, min_score=0.5, filters={"brand": "acme", "size": 42}, tags=["new", "sale"])),
    ("c5324611243495e1a6d5079c5ce328d0", "default", ("running shoes 1", 10, 0.5, {"size": 42, "brand": "acme"},
                                                     ("new", "sale")), {}),
    ("1f61a06be502e566e02c42259e7b5359", "nightly", (),
     dict(query="running shoes 1", limit=10, min_score=0.5, filters={"brand": "acme", "size": 42}, tags=["new", "sale"])),
    ("7376de280c18c0c526129160cb1556a3", "default", ("q",), {}),
    ("80783b1e0496e63def26f62453ecfb9e", "default", ("q",), dict(limit=True, min_score=False, filters=None, tags=[])),
    ("8a7d3e04d844f9d7e17f740481529b89", "default", ("q",),
     dict(limit=2 ** 70, min_score=-0.0, filters={}, tags=[None, 1.0, -5])),
    ("3db7865a664bcacc2b481476cd1fd6f7", "default", ("q",),
     dict(limit=99.0, min_score=0.1 + 0.2, tags=[1e300, 1.7976931348623157e308, 1e-7, 123456789.123456, 5e-324])),
    ("f3b0cc49ac84c4f1f72e9f5a21716217", "default", ("q",),
     dict(min_score=float("nan"), tags=[float("inf"), float("-inf")])),
    ("ea177dc3a15f5c033750592e570bb1c5", "default", ("\x00tag",),
     dict(filters={"\x00k": "\x00v", "a\"b\\c": "é🙂\u2028"}, tags=["\x00", ""])),
    ("c5b02bb2bba9a2ae18e236eb933faf75", "default", (Text("q"),), dict(filters={"k": Text("v")}, tags=[Text("\x00x")])),
    ("5bcffb5151f75d58754d672d4b4a907f", "default", ("q",), dict(filters={1: "a", 2: "b"}, tags={3, 1, 2})),
    ("aab1227a03307768c8d7c6dd7c63846e", "default", ("q",),
     dict(filters={"b": 1, "a": [{"z": 1.0, "y": (1, [2])}]}, tags=[[], {}, ()])),
    ("b8a9664fbc448243f8713d2c358aa520", "default", ("q",), dict(filters={True: 1, "1": 2}, tags=frozenset({"x"}))),
    ("20e37a6f564cf1a80850bdd1423431a4", "default", ("q",),
     dict(filters={"d": decimal.Decimal("1.50"), "u": uuid.UUID(int=7), "b": b"\x00\xff",
                   "t": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)})),
    ("287845187b677c00debc3e44863bc43f", "default", ("q",), dict(key="order-7")),
    ("287845187b677c00debc3e44863bc43f", "default", ("q",), dict(idempotency_key="order-7", limit=3)),
]


@pytest.mark.parametrize("expected, workflow, args, kwargs", PINNED_FINGERPRINTS)
def test_fingerprints_of_calls_stay_as_pinned(expected, workflow, args, kwargs):
    guard = Guard(":memory:", quiet=True, workflow=workflow)
    assert guard._prepare(pinned_tool, args, dict(kwargs)).id == expected


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


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


class FixedZone(dt.tzinfo):
    """A tzinfo of the user's own, which the ledger cannot rebuild."""

    def utcoffset(self, d):
        return dt.timedelta(hours=1)

    def dst(self, d):
        return dt.timedelta(0)

    def tzname(self, d):
        return "FIX"


# Each special type: two equal values built differently, and a value that differs from them.
SPECIAL_CASES = {
    "decimal": (decimal.Decimal("1.50"), decimal.Decimal("1.5"), decimal.Decimal("1.51")),
    "datetime": (dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
                 dt.datetime(2026, 1, 2, 4, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1))),
                 dt.datetime(2026, 1, 2, 3, 4, 6, tzinfo=dt.timezone.utc)),
    "date": (dt.date(2026, 1, 2), dt.date.fromisoformat("2026-01-02"), dt.date(2026, 1, 3)),
    "time": (dt.time(3, 4, 5), dt.time.fromisoformat("03:04:05"), dt.time(3, 4, 5, 1)),
    "timedelta": (dt.timedelta(hours=36), dt.timedelta(days=1, seconds=43200), dt.timedelta(hours=36, microseconds=1)),
    "uuid": (uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.UUID("{12345678123456781234567812345678}"),
             uuid.UUID("12345678-1234-5678-1234-567812345679")),
    "enum": (Color.RED, Color("red"), Color.BLUE),
    "path": (pathlib.PurePosixPath("/a/b"), pathlib.PurePosixPath("/a//b/"), pathlib.PurePosixPath("/a/c")),
    "bytes": (b"\x00\xff", bytearray(b"\x00\xff"), b"\x00\xfe"),
    "dataclass": (Point(1, 2), Point(x=1, y=2), Point(2, 1)),
    "namedtuple": (Pair(1, "x"), Pair(b="x", a=1), Pair(1, "y")),
    "model": (Model(a=1, b=[1, 2]), Model(b=[1, 2], a=1), Model(a=1, b=[2, 1])),
}


@pytest.mark.parametrize("kind", list(SPECIAL_CASES))
def test_special_values_are_one_call_when_equal_and_two_when_not(kind):
    value, equal, different = SPECIAL_CASES[kind]
    assert fp(x=value) == fp(x=equal)
    assert fp(x=value) != fp(x=different)


def test_each_special_type_is_distinct_from_the_others_and_from_its_plain_form():
    lookalikes = [decimal.Decimal("1.5"), 1.5, "1.5", dt.date(2026, 1, 2), "2026-01-02",
                  dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc), dt.datetime(2026, 1, 2), "2026-01-02T00:00:00",
                  dt.time(3, 4, 5), "03:04:05", dt.timedelta(seconds=5), 5,
                  uuid.UUID(int=1), str(uuid.UUID(int=1)), Color.RED, "red",
                  pathlib.PurePosixPath("/a/b"), "/a/b", b"ab", "ab", "YWI=",
                  Point(1, 2), {"x": 1, "y": 2}, Pair(1, "x"), (1, "x"), Model(a=1, b="x"), {"a": 1, "b": "x"}]
    assert len({fp(x=v) for v in lookalikes}) == len(lookalikes)


class Shade(enum.Enum):
    """Color's values under another type: a different enum, so different calls."""
    RED = "red"
    BLUE = "blue"


def same_value(x, y) -> bool:
    """What must be one call: values of one type that compare equal (aware datetimes as instants)."""
    if type(x) is not type(y):
        return False
    return x.fields == y.fields if isinstance(x, Model) else x == y


SMALL_INTS = st.integers(0, 2)
SPECIAL_VALUES = [
    st.decimals(min_value=-2, max_value=2, places=2),
    st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2026, 1, 1, 3),
                 timezones=st.none() | st.sampled_from([dt.timezone.utc, dt.timezone(dt.timedelta(hours=1)),
                                                        dt.timezone(dt.timedelta(hours=-1))])).map(
        lambda d: d.replace(minute=0, second=0, microsecond=d.microsecond % 2)),
    st.dates(min_value=dt.date(2026, 1, 1), max_value=dt.date(2026, 1, 3)),
    st.builds(dt.time, SMALL_INTS, SMALL_INTS, SMALL_INTS, SMALL_INTS),
    st.builds(dt.timedelta, days=SMALL_INTS, seconds=st.sampled_from([0, 1, 86400]), microseconds=SMALL_INTS),
    st.builds(uuid.UUID, int=SMALL_INTS),
    st.sampled_from(list(Color) + list(Shade)),
    st.lists(st.sampled_from(["a", "b", ".."]), max_size=3).map(lambda parts: pathlib.PurePosixPath("/", *parts)),
    st.binary(max_size=2),
    st.builds(Point, SMALL_INTS, SMALL_INTS),
    st.builds(Pair, SMALL_INTS, st.sampled_from("xy")),
    st.dictionaries(st.sampled_from("ab"), SMALL_INTS | st.lists(SMALL_INTS, max_size=2)).map(lambda d: Model(**d)),
]
SAME_TYPE_PAIRS = st.sampled_from(SPECIAL_VALUES).flatmap(lambda values: st.tuples(values, values))


@given(SAME_TYPE_PAIRS | st.tuples(st.one_of(SPECIAL_VALUES), st.one_of(SPECIAL_VALUES)))
def test_special_values_share_a_fingerprint_exactly_when_they_are_the_same_value(pair):
    x, y = pair
    assert (fp(x=x) == fp(x=y)) == same_value(x, y), (x, y)
    form = ledger.canonical(x)
    assert json.loads(ledger._dump(form)) == form   # plain JSON: the same bytes in every process


def test_decimal_trailing_zeros_do_not_matter():
    assert fp(x=decimal.Decimal("1.50")) == fp(x=decimal.Decimal("1.5"))


def test_timedeltas_are_exact_to_the_microsecond():
    assert fp(x=dt.timedelta(days=1000, microseconds=1)) != fp(x=dt.timedelta(days=1000))
    assert fp(x=dt.timedelta(hours=36)) == fp(x=dt.timedelta(days=1, seconds=43200))


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


def test_decimal_fingerprint_is_exact():
    assert fp(x=decimal.Decimal("1234567890123456789012345678901")) != \
        fp(x=decimal.Decimal("1234567890123456789012345678902"))


def test_decimal_fingerprint_ignores_the_threads_decimal_context():
    amount = decimal.Decimal("1234.5678901")
    expected = fp(x=amount)
    with decimal.localcontext(decimal.Context(prec=6, rounding=decimal.ROUND_DOWN, capitals=0)):
        assert fp(x=amount) == expected


def test_decimal_zero_is_one_value_whatever_its_sign_or_exponent():
    assert fp(x=decimal.Decimal("-0")) == fp(x=decimal.Decimal("0E+5")) == fp(x=decimal.Decimal("0.000"))


def test_decimal_with_a_huge_exponent_is_fingerprinted():
    assert fp(x=decimal.Decimal("1E+999999999")) != fp(x=decimal.Decimal("1E+999999998"))
    assert fp(x=decimal.Decimal("1E-999999999")) == fp(x=decimal.Decimal("10E-1000000000"))


@given(st.decimals(allow_nan=False, allow_infinity=False),
       st.integers(min_value=1, max_value=60), st.sampled_from([decimal.ROUND_DOWN, decimal.ROUND_HALF_EVEN,
                                                                decimal.ROUND_UP, decimal.ROUND_FLOOR]),
       st.integers(min_value=0, max_value=1), st.integers(min_value=-1, max_value=1))
def test_decimal_fingerprint_is_invariant_under_any_context_and_exact(d, prec, rounding, capitals, shift):
    other = d.scaleb(shift, decimal.Context(prec=decimal.MAX_PREC)) if shift else d * 1
    expected, other_expected = fp(x=d), fp(x=other)
    with decimal.localcontext(decimal.Context(prec=prec, rounding=rounding, capitals=capitals, Emax=99, Emin=-99)):
        assert fp(x=d) == expected and fp(x=other) == other_expected
    assert (expected == other_expected) == (d == other)


def test_a_self_referential_argument_is_a_fingerprint_error_naming_it():
    loop = [1, {"k": []}]
    loop[1]["k"].append(loop)
    with pytest.raises(ledger.FingerprintError, match=r"argument 'items\[1\]\['k'\]\[0\]' contains itself"):
        fp(items=loop)


def test_a_too_deep_argument_is_a_fingerprint_error_found_in_time_linear_in_its_depth():
    deep = []
    for _ in range(50_000):
        deep = [deep]
    started = time.process_time()
    with pytest.raises(ledger.FingerprintError, match="argument 'tree' is nested too deeply"):
        fp(tree=deep)
    assert time.process_time() - started < 2.0   # a search that descends level by level took minutes


def test_a_deep_argument_sharing_its_parts_is_a_fingerprint_error_found_in_time():
    shared = []
    for _ in range(2000):
        shared = [shared, shared]   # 2**2000 paths through 2000 lists
    started = time.process_time()
    with pytest.raises(ledger.FingerprintError, match="argument 'tree' is nested too deeply"):
        fp(tree=shared)
    assert time.process_time() - started < 2.0


def test_a_value_deep_inside_that_contains_itself_is_named_by_its_path():
    loop = {"k": []}
    node = loop
    for _ in range(1500):
        node["k"] = [{"k": []}]
        node = node["k"][0]
    node["k"] = [loop]
    started = time.process_time()
    with pytest.raises(ledger.FingerprintError, match=r"argument 'x(\['k'\]\[0\]){4}.*\]\[0\]' contains itself"):
        fp(x=loop)
    assert time.process_time() - started < 2.0


def test_an_int_too_long_for_str_is_a_fingerprint_error_naming_it(g):
    with pytest.raises(ledger.FingerprintError, match=r"argument 'order_id\[2\]' is a int.*ValueError"):
        g(charge, [1, 2, 10 ** 5000])


def test_a_mock_argument_is_a_fingerprint_error_naming_it():
    from unittest import mock
    with pytest.raises(ledger.FingerprintError, match=r"argument 'client\['api'\]' is a unittest.mock.Mock"):
        fp(client={"api": mock.Mock()})


def test_every_fingerprint_failure_stops_the_call_before_the_tool_runs(g):
    from unittest import mock
    loop = []
    loop.append(loop)
    for bad in (loop, 10 ** 5000, mock.Mock(), mock.MagicMock()):
        with pytest.raises(ledger.FingerprintError):
            g(charge, bad)
    assert CHARGES == [] and g.history() == []


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


def transfer(amount, idempotency_key="default"):
    CHARGES.append((amount, idempotency_key))
    return idempotency_key


def test_a_tool_with_its_own_idempotency_key_parameter_always_receives_it(g):
    assert g(transfer, 5, idempotency_key="caller-1") == "caller-1"
    assert g(transfer, 5, idempotency_key="caller-2") == "caller-2"   # another value: another call
    assert g(transfer, 5, idempotency_key="caller-1") is BLOCKED
    assert g(transfer, 5, key="k") == "default"                        # key= is still the guard's
    assert g(transfer, 5, key="k") is BLOCKED
    assert CHARGES == [(5, "caller-1"), (5, "caller-2"), (5, "default")]


def test_guard_keyed_names_the_call_and_leaves_every_keyword_to_the_tool(g):
    def put(key, value, idempotency_key=None):
        CHARGES.append((key, value, idempotency_key))
    g.keyed("same", put, key="a", value=1, idempotency_key="x")
    g.keyed("same", put, key="b", value=2)
    g.keyed("other", put, key="b", value=2)
    assert CHARGES == [("a", 1, "x"), ("b", 2, None)]
    assert g.keyed("k", transfer, 1, idempotency_key="i") == "i"


def test_a_tool_taking_any_keyword_refuses_a_key_it_might_have_wanted(g):
    def create(**fields):
        CHARGES.append(fields)
    with pytest.raises(ledger.ConfigError, match="guard.keyed"):
        g(create, name="x", idempotency_key="from-the-caller")
    g.keyed("create-x", create, name="x", idempotency_key="from-the-caller")
    assert CHARGES == [{"name": "x", "idempotency_key": "from-the-caller"}]


class PaymentAPI:
    """The README's payment provider, whose charge takes its own idempotency_key."""

    def __init__(self):
        self.charges = {}

    def charge(self, amount: float, idempotency_key: str) -> dict:
        return self.charges.setdefault(idempotency_key, {"id": f"ch_{len(self.charges) + 1}", "amount": amount})


def test_the_readme_payment_api_charge_is_guardable(g):
    payments = PaymentAPI()
    with pytest.raises(ledger.ConfigError, match="name="):
        g(payments.charge, 99.0, idempotency_key="order-9")
    charge_card = g.once(payments.charge, name="payments.charge")
    assert charge_card(99.0, idempotency_key="order-9") == {"id": "ch_1", "amount": 99.0}
    assert charge_card(99.0, idempotency_key="order-9") is BLOCKED
    assert charge_card(99.0, idempotency_key="order-10") == {"id": "ch_2", "amount": 99.0}
    assert g.keyed("refund-9", charge_card, 99.0, idempotency_key="order-11")["id"] == "ch_3"
    assert len(payments.charges) == 3


def test_unfingerprintable_argument_fails_before_the_tool_runs(g):
    tool = counter(g)
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


BILLING_SCRIPT = """
import json, multiprocessing, os, sys
sys.path.insert(0, %r)
import ledger


def send_invoice(order_id):
    with open(os.environ["SENT_LOG"], "a") as log:   # append-only: one line per real send
        log.write("%%s %%d\\n" %% (order_id, os.getpid()))
    return "sent"


def logged(fn):   # a decorator without functools.wraps
    def wrapper(*args):
        return fn(*args)
    return wrapper


class Channel:
    @classmethod
    def open(cls):
        pass


def every_name():
    return [ledger.tool_name(tool) for tool in
            (send_invoice, logged(send_invoice), lambda order_id: send_invoice(order_id), Channel.open)]


def worker(db, names):
    names.put(every_name())
    ledger.Guard(db, quiet=True, secret="s")(send_invoice, 42)


if __name__ == "__main__":
    db = sys.argv[1]
    names = [every_name()]
    ledger.Guard(db, quiet=True, secret="s")(send_invoice, 42)
    for method in ("fork", "spawn", "forkserver"):
        context = multiprocessing.get_context(method)
        queue = context.Queue()
        process = context.Process(target=worker, args=(db, queue))
        process.start()
        names.append(queue.get(timeout=60))
        process.join(60)
        assert process.exitcode == 0, (method, process.exitcode)
    print(json.dumps(names))
"""


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["script", "module"])
def test_a_tool_has_one_name_in_the_parent_and_in_fork_spawn_and_forkserver_workers(tmp_path, launch):
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "billing.py").write_text(BILLING_SCRIPT % str(HERE))
    sent = tmp_path / "sent.log"
    argv = ["shop/billing.py"] if launch == "script" else ["-m", "shop.billing"]
    done = subprocess.run([sys.executable, *argv, str(tmp_path / "l.db")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "SENT_LOG": str(sent)})
    assert done.returncode == 0, done.stderr
    imported = subprocess.run([sys.executable, "-c", "import shop.billing, ledger; "
                               "print(ledger.tool_name(shop.billing.send_invoice))"],
                              cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    names = json.loads(done.stdout)
    assert names[0][0] == names[0][1].split("(")[1].split(")")[0] == "shop.billing.send_invoice"
    assert names[0][3] == "shop.billing.Channel.open" and len(set(names[0])) == 4
    assert names == [names[0]] * 4   # the parent, then fork, spawn and forkserver workers
    assert imported.stdout == "shop.billing.send_invoice\n"
    assert len(sent.read_text().splitlines()) == 1   # the parent sent it; no worker sent it again


def test_lambdas_are_told_apart_by_their_code(g):
    first, second = (lambda x: CHARGES.append(("first", x))), (lambda x: CHARGES.append(("second", x)))
    g(first, 1)
    g(second, 1)
    g(first, 1)
    assert CHARGES == [("first", 1), ("second", 1)]


@pytest.mark.slow
def test_a_lambda_has_one_name_whatever_the_hash_seed():
    code = ("import sys; sys.path.insert(0, %r); import ledger; "
            "print(ledger.tool_name(lambda x: x in {'alpha', 'beta', 'gamma', 'delta'} or x in ('a', {'b', 'c'})));"
            "print(ledger.tool_name(lambda x: x in {'alpha', 'beta', 'gamma', 'omega'} or x in ('a', {'b', 'c'})))"
            % str(HERE))
    seen = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in range(6)}
    assert len(seen) == 1
    first, other = seen.pop().splitlines()
    assert first != other   # the set it holds is part of the name


def test_a_lambda_keeps_its_name_when_code_above_it_moves():
    first = ledger.tool_name(eval("lambda x: x + 1"))
    assert ledger.tool_name(eval("\n\nlambda x: x + 1")) == first != ledger.tool_name(eval("lambda x: x + 2"))


def make_payer(currency):
    def pay(amount):
        CHARGES.append((currency, amount))
    return pay


def test_a_closure_over_data_needs_a_name(g):
    with pytest.raises(ledger.ConfigError, match="closure over 'currency'.*name="):
        g(make_payer("usd"), 5)
    with pytest.raises(ledger.ConfigError, match="name="):
        g.once(make_payer("usd"))
    with pytest.raises(ledger.ConfigError, match="dict key"):
        g.wrap_tools([make_payer("usd")])
    with pytest.raises(ledger.ConfigError, match="closure over 'currency' .a _thread.lock"):
        g(make_payer(threading.Lock()), 5)   # no canonical form: two such closures must not collide
    assert CHARGES == []


def test_a_closure_over_data_runs_under_the_name_it_is_given(g):
    usd, eur = g.once(make_payer("usd"), name="pay.usd"), g.wrap_tools({"pay.eur": make_payer("eur")})["pay.eur"]
    usd(5), eur(5), usd(5)
    assert CHARGES == [("usd", 5), ("eur", 5)]
    assert {r["tool"] for r in g.history()} == {"pay.usd", "pay.eur"}


def test_a_closure_over_a_start_time_is_refused_not_split_across_workers(g):
    started = time.time()

    def send_report(day):
        CHARGES.append((day, started))
    with pytest.raises(ledger.ConfigError, match="closure over 'started'"):
        g(send_report, 1)


def without_wraps(fn):
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


def refund(order_id: int, amount: float = 10.0, currency: str = "usd") -> dict:
    CHARGES.append(("refund", order_id))
    return {"refunded": order_id}


def test_a_decorator_without_wraps_names_the_tool_after_what_it_wraps(g):
    charging, refunding = without_wraps(charge), without_wraps(refund)
    assert g(charging, 42) == {"charged": 10.0, "order": 42}
    assert g(refunding, 42) == {"refunded": 42}
    assert g(without_wraps(charge), 42) is BLOCKED
    assert "test_ledger.charge" in ledger.tool_name(charging) != ledger.tool_name(refunding)


def test_a_decorator_with_wraps_is_the_tool_it_wraps(g):
    assert ledger.tool_name(functools.wraps(charge)(lambda *a, **k: charge(*a, **k))) == "test_ledger.charge"
    assert ledger.tool_name(functools.lru_cache(charge)) == "test_ledger.charge"   # an object, not a function
    cached = functools.lru_cache(refund)
    assert g(cached, 1) == {"refunded": 1} and g(cached, 1) is BLOCKED


def test_two_tools_of_one_list_under_one_name_are_refused(g):
    as_refund = functools.wraps(charge)(lambda order_id: refund(order_id))
    with pytest.raises(ledger.ConfigError, match="both named 'test_ledger.charge'.*dict"):
        g.wrap_tools([charge, as_refund])
    assert len(g.wrap_tools([charge, charge])) == 2
    assert CHARGES == []


def test_a_nested_function_that_calls_itself_has_a_stable_name(g):
    def countdown(n):
        return countdown(n - 1) if n else "done"
    assert ledger.tool_name(countdown).startswith("test_ledger.test_a_nested_function")
    assert g(countdown, 3) == "done" and g(countdown, 3) is BLOCKED


class Mailer:
    def __init__(self, sender):
        self.sender = sender

    def send(self, to):
        CHARGES.append((self.sender, to))

    @classmethod
    def create(cls, sender):
        CHARGES.append((cls.__name__, sender))


class SupportMailer(Mailer):
    pass


def test_methods_of_instances_whose_state_can_change_need_a_name(g):
    with pytest.raises(ledger.ConfigError, match="Mailer.send is bound to a test_ledger.Mailer instance.*name="):
        g(Mailer("billing").send, "ada")
    with pytest.raises(ledger.ConfigError, match="name="):
        g.once(Mailer("billing").send)
    with pytest.raises(ledger.ConfigError, match="name="):
        g(Counter(), 1)
    assert CHARGES == []


def test_methods_of_two_configured_instances_never_share_records(g):
    billing, support = Mailer("billing"), Mailer("support")
    tools = g.wrap_tools({"mail.billing": billing.send, "mail.support": support.send})
    tools["mail.billing"]("ada"), tools["mail.support"]("ada"), tools["mail.billing"]("ada")
    assert CHARGES == [("billing", "ada"), ("support", "ada")]


def test_a_classmethod_is_told_apart_by_the_class_it_is_called_on(g):
    g(Mailer.create, "x")
    g(SupportMailer.create, "x")
    g(SupportMailer.create, "x")
    assert CHARGES == [("Mailer", "x"), ("SupportMailer", "x")]
    assert ledger.tool_name(Mailer.create) == "test_ledger.Mailer.create"


@dataclasses.dataclass(frozen=True)
class Region:
    name: str

    def deploy(self, version):
        CHARGES.append((self.name, version))

    def __call__(self, version):
        CHARGES.append(("called", self.name, version))


class Currency(enum.Enum):
    USD = "usd"
    EUR = "eur"

    def pay(self, amount):
        CHARGES.append((self.value, amount))


def test_methods_of_immutable_values_are_told_apart_by_their_value(g):
    g(Region("eu").deploy, 1), g(Region("us").deploy, 1), g(Region("eu").deploy, 1)
    g(Currency.USD.pay, 5), g(Currency.EUR.pay, 5), g(Currency.USD.pay, 5)
    g(Region("eu"), 2), g(Region("us"), 2), g(Region("eu"), 2)
    assert CHARGES == [("eu", 1), ("us", 1), ("usd", 5), ("eur", 5), ("called", "eu", 2), ("called", "us", 2)]


def test_a_frozen_dataclass_holding_something_mutable_needs_a_name(g):
    @dataclasses.dataclass(frozen=True)
    class Batch:
        items: list

        def submit(self):
            pass
    with pytest.raises(ledger.ConfigError, match="name="):
        g(Batch([1]).submit)


def test_an_explicit_name_always_wins(g):
    mutable = Counter()
    named = g.once(mutable, name="my.counter")
    named(1), named(1)
    assert len(mutable.calls) == 1 and [r["tool"] for r in g.history()] == ["my.counter"]


UNSTORABLE_LABELS = {"lone surrogate": "billing\ud800", "nul": "billing\x00"}


def _give_label(guard, where, label):
    """Each way a tool name, workflow or caller reaches a record."""
    if where == "name=":
        return lambda: guard.once(charge, name=label)(1)
    if where == "wrap_tools key":
        return lambda: guard.wrap_tools({label: charge})[label](1)
    if where == "workflow":
        return lambda: guard.workflow(label)(charge, 1)
    if where == "caller":
        return lambda: guard.as_caller(label)(charge, 1)
    if where == "Guard(workflow=)":
        return lambda: Guard(guard.store, workflow=label, quiet=True, secret="s")(charge, 1)
    return lambda: Guard(guard.store, caller=label, quiet=True, secret="s")(charge, 1)


@pytest.mark.parametrize("label", list(UNSTORABLE_LABELS.values()), ids=list(UNSTORABLE_LABELS))
@pytest.mark.parametrize("where", ["name=", "wrap_tools key", "workflow", "caller", "Guard(workflow=)",
                                   "Guard(caller=)"])
def test_a_label_no_store_can_keep_is_a_config_error_before_the_tool_runs(store, where, label):
    guard = Guard(store, quiet=True, secret="s")
    with pytest.raises(ledger.ConfigError, match="NUL or a lone surrogate"):
        _give_label(guard, where, label)()
    assert CHARGES == [] and store.records() == []


def test_a_workflow_from_the_environment_no_store_can_keep_is_a_config_error(g, monkeypatch):
    monkeypatch.setenv("LEDGER_WORKFLOW", "nightly\udce9")   # a non-UTF-8 byte, as os.environ decodes it
    with pytest.raises(ledger.ConfigError, match="workflow 'nightly"):
        g(charge, 1)
    assert CHARGES == []


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

    @g.once(name="pay")
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
    for _ in range(2):
        g(charge, 1)
    assert len(CHARGES) == 2 and g.history() == []


def test_a_result_that_is_not_json_is_recorded_as_done_and_replays_blocked(g, caplog):
    g._core.quiet = False
    made = []

    @g.once(name="make_lock", replay=True)
    def make_lock(name):
        made.append(name)
        return threading.Lock()
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
    big = counter(g, result="x" * 200)
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
    tool = counter(g, result={3, 1, 2})
    g.policy(tool, replay=True, serializer=Codec)
    assert g(tool) == {1, 2, 3}
    assert g(tool) == {1, 2, 3} and len(tool.calls) == 1


def same(a, b):
    """Equal and of the same type all the way down (== alone takes (1,) for [1]'s twin and 1 for True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            any(same(k, j) and same(v, b[j]) for j in b if j == k) for k, v in a.items())
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.tzinfo == b.tzinfo and a.fold == b.fold and a.tzname() == b.tzname()
    if isinstance(a, float) and a != a:
        return b != b
    if isinstance(a, (set, frozenset)):
        return a == b and sorted(map(repr, a)) == sorted(map(repr, b))
    return a == b and repr(a) == repr(b)


RESULTS_THAT_KEEP_THEIR_TYPE = {
    "tuple": ("text", {"artifact": (1, 2)}),
    "int keys": {1: "one", 2: {3: [4]}},
    "bool, None, float and tuple keys": {True: 1, None: 2, 1.5: 3, (1, "a"): 4, "s": 5},
    "sets": [{1, 2}, frozenset({"a", (1, 2)})],
    "bytes": [b"\x00\xff", bytearray(b"ab")],
    "decimal": decimal.Decimal("1234567890123456789012345678901.50"),
    "datetimes": [dt.datetime(2026, 3, 29, 2, 30, fold=1), dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
                  dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-3), "BRT")),
                  dt.datetime(2026, 7, 1, 9, tzinfo=__import__("zoneinfo").ZoneInfo("Europe/Paris")),
                  dt.date(2026, 1, 2), dt.time(1, 2, 3, 4), dt.timedelta(days=10**6, microseconds=1)],
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "exact floats": [0.1 + 0.2, 1e-310, -0.0, float("inf"), 2.0 ** 60],
    "strings that look like tags": ["\x00tuple", ["\x00tuple", [1]], {"\x00map": []}, "~", "\x00\x00"],
    "lone surrogates and NULs": {"name": "caf\udce9.txt", "nul": "a\x00b", "\ud800": ["\x00"]},
}


@pytest.mark.parametrize("result", RESULTS_THAT_KEEP_THEIR_TYPE.values(), ids=RESULTS_THAT_KEEP_THEIR_TYPE)
def test_replayed_results_come_back_equal_and_of_the_same_type(store, result):
    guard = Guard(store, quiet=True, secret="s")
    runs = []

    @guard.once(name="produce", replay=True)
    def produce(n):
        runs.append(n)
        return result
    assert guard(produce, 1) is result
    again = guard(produce, 1)
    assert same(again, result) and runs == [1]


@pytest.mark.slow
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=3), children, max_size=4)
    | st.dictionaries(st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
                      | st.tuples(st.integers(), st.text(max_size=2)), children, max_size=4),
    max_leaves=20))
def test_results_round_trip_exactly(value):
    text = ledger._dump_result(value)
    assert text.isascii() and "\x00" not in text
    assert same(ledger._load_result(text), value)


def test_plain_json_results_are_stored_as_plain_json(g):
    g.policy(charge, replay=True)
    g(charge, 1)
    assert json.loads(g.history()[0]["result"]) == {"charged": 10.0, "order": 1}


def test_records_written_as_plain_json_before_typed_results_still_replay(g):
    g.policy(charge, replay=True)
    g(charge, 1)
    [record] = g.store.records()
    old = record.evolve(result='{"charged":10.0,"order":1,"note":"d\u00e9j\u00e0 vu","raw":"ü"}')
    old.sig = ledger._sign(g._core.secret, old)
    assert g.store.swap(old, record.epoch, record.owner)
    assert g(charge, 1) == {"charged": 10.0, "order": 1, "note": "déjà vu", "raw": "ü"}
    assert len(CHARGES) == 1


class Level(enum.IntEnum):
    HIGH = 1


@pytest.mark.parametrize("result", [Level.HIGH, Pair(1, "x"), collections.OrderedDict(a=1), {"k": Color.RED},
                                    [1, object()], 10 ** 5000, dt.datetime(2026, 1, 1, tzinfo=FixedZone())],
                         ids=["intenum", "namedtuple", "ordereddict", "enum inside", "object inside", "huge int",
                              "unknown tzinfo"])
def test_a_result_that_would_come_back_altered_is_refused_and_its_caller_still_gets_it(g, caplog, result):
    g._core.quiet = False
    runs = []

    @g.once(name="produce", replay=True)
    def produce():
        runs.append(1)
        return result
    assert g(produce) is result
    assert g(produce) is BLOCKED and runs == [1]
    [record] = g.history()
    assert record["status"] == "SUCCESS" and record["result"] is None and record["unstored"]
    assert "serializer" in caplog.text


def test_a_refused_result_names_where_the_altered_value_sits(g):
    def produce():
        return {"rows": [1, (2, Level.HIGH)]}
    g(produce)
    assert "['rows'][1]" in g.history()[0]["unstored"] and "Level" in g.history()[0]["unstored"]


def test_a_shared_result_comes_back_as_the_same_type(store):
    guard = Guard(store, quiet=True, secret="s")
    runs = []
    started = threading.Event()

    @guard.once(name="lookup", replay=True, wait=30)
    def lookup(q):
        runs.append(q)
        started.set()
        time.sleep(0.3)
        return (q, {1: (2, 3)})
    leader = threading.Thread(target=guard, args=(lookup, "q"))
    leader.start()
    started.wait(10)
    shared = guard.execute(lookup, "q")
    leader.join()
    assert shared.source != "executed" and same(shared.value, ("q", {1: (2, 3)})) and runs == ["q"]


def test_signing_accepts_any_text():
    record = Record(id="x", tool="t\udc80", workflow="w", caller=None, status="SUCCESS", owner="o", epoch=1,
                    lease_until=0.0, run_key="k\ud800", result="\udce9\x00", unstored="\udfff")
    assert ledger._sign(b"s", record) != ledger._sign(b"s", record.evolve(result="\udce8\x00"))


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


# Every field a decision reads from a completed record, and a tampered value that
# would change the decision: run the call again, or replay/block without checking.
# (Its status is covered too; a record turned FAILED is the next test's case.)
SIGNED_TAMPERING = {
    "runs": dict(runs=0),                      # one more run
    "expires": dict(expires=time.time() - 1),  # under ttl=, the window has passed
    "argsum": dict(argsum=None),               # validation switched off
    "run_key": dict(run_key="someone-else"),   # another current_key()
    "result": dict(result='{"charged": 1}'),
    "unstored": dict(unstored="set"),
    "epoch": dict(epoch=7),
}


@pytest.mark.parametrize("field", list(SIGNED_TAMPERING))
def test_every_field_that_steers_a_completed_call_is_signed(store, field):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(charge, max=1, ttl=3600, validate=True)
    guard(charge, 1, key="k")
    assert guard(charge, 1, key="k") is BLOCKED     # as written, it verifies on this store
    record = store.records()[0]
    changes = SIGNED_TAMPERING[field]
    if field == "expires" and isinstance(store, ledger.RedisStore):
        changes = dict(expires=record.expires - 1800)   # Redis would delete a record whose window passed
    tamper(store, record.id, **changes)
    for replay in (False, True):   # a blocked duplicate checks it as well as a replay does
        guard.policy(charge, ttl=3600, validate=True, replay=replay)
        with pytest.raises(ledger.IntegrityError, match="signature"):
            guard(charge, 1, key="k")
    assert len(CHARGES) == 1


def test_a_completed_record_changed_to_failed_or_deleted_runs_again_as_documented(store):
    """Signing cannot stop what deleting the record does; FAILED is the same as no record."""
    guard = Guard(store, quiet=True, secret="s")
    guard(charge, 1)
    tamper(store, store.records()[0].id, status="FAILED")
    guard(charge, 1)
    store.clear()
    guard(charge, 1)
    assert len(CHARGES) == 3


def test_any_text_a_tool_returns_can_be_signed(store):
    """Signing never fails after a tool has run, whatever its result text holds."""
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(charge, serializer=(lambda v: "lone \ud800 nul \x00 " + json.dumps(v), lambda t: t))
    assert guard(charge, 1) == {"charged": 10.0, "order": 1}
    record = store.records()[0]
    assert record.status == "SUCCESS" and record.sig.startswith("v2:")
    assert guard(charge, 1) is BLOCKED and len(CHARGES) == 1


def test_records_signed_before_every_field_was_covered_still_verify(store):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(charge, replay=True)
    guard(charge, 1)
    record = store.records()[0]
    old = hmac.new(b"s", "\x00".join((record.id, str(record.epoch), record.run_key, record.result, "")).encode(),
                   hashlib.sha256).hexdigest()
    tamper(store, record.id, sig=old)
    assert guard(charge, 1) == {"charged": 10.0, "order": 1} and len(CHARGES) == 1


def test_a_force_runs_past_a_tampered_record(g):
    g(charge, 1)
    tamper(g.store, g.store.records()[0].id, runs=0)
    g.force(charge, 1)
    assert len(CHARGES) == 2 and g(charge, 1) is BLOCKED


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
    store = SQLiteStore(tmp_path / "l.db")
    [record] = store.records()
    store.close()
    assert ledger._verified(b"from-env", record) and not ledger._verified(b"other", record)   # signed with it


# ---------------------------------------------------------------------------
# Stores: the contract, for every backend.
# ---------------------------------------------------------------------------

def test_every_store_passes_check_store(store):
    check_store(store)


def test_check_store_leaves_other_records_alone(store):
    guard = Guard(store, quiet=True, secret="s")
    guard(charge, 1)
    guard.workflow("other")(charge, 2)
    guard.stats()  # writes the buffered counters now, not by the heartbeat in the middle of the check
    before = [r.as_dict() for r in store.records()]
    check_store(store)
    assert [r.as_dict() for r in store.records()] == before


def test_insert_or_get_claims_a_record_that_is_absent(store):
    record = scratch_record()
    assert store.insert_or_get(record.id, lambda: record) is record
    assert store.get(record.id).as_dict() == record.as_dict()


def test_insert_or_get_returns_the_stored_record_and_leaves_it_alone(store):
    stored = finished_record(1, time.time(), result='"v"', attempts=3, blocked=2, argsum="a1", cost=0.5)
    store.insert(stored)
    claim = scratch_record(stored.id).evolve(owner="b", epoch=7)
    assert store.insert_or_get(stored.id, lambda: claim).as_dict() == stored.as_dict()
    assert store.get(stored.id).as_dict() == stored.as_dict()


def test_insert_or_get_racing_on_one_id_claims_it_once_and_every_other_caller_reads_the_claim(store):
    barrier, answers = threading.Barrier(8), []

    def claim(n):
        record = scratch_record("raced").evolve(owner=f"owner-{n}")
        barrier.wait()
        answers.append((n, store.insert_or_get(record.id, lambda: record)))
    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    winners = [n for n, stored in answers if stored.owner == f"owner-{n}"]
    assert len(answers) == 8 and len(winners) == 1
    assert {stored.owner for _, stored in answers} == {f"owner-{winners[0]}"}


def test_a_pruned_call_runs_again_and_its_duplicates_stay_blocked_until_then(store):
    guard = Guard(store, quiet=True, secret="s")
    guard(charge, 1)
    assert guard(charge, 1) is BLOCKED
    assert guard.prune(0)["removed"] == 1
    guard(charge, 1)
    assert CHARGES == [(1, 10.0, "usd"), (1, 10.0, "usd")]


def test_prune_never_removes_a_running_call(store):
    guard = Guard(store, quiet=True, secret="s")
    started, release, runs = threading.Event(), threading.Event(), []

    @guard.once(name="long_job")
    def long_job(n):
        runs.append(n)
        started.set()
        release.wait(10)

    leader = threading.Thread(target=long_job, args=(1,))
    leader.start()
    try:
        assert started.wait(10)
        time.sleep(0.01)  # its record is older than the cut-off below
        assert guard.prune(0, dry_run=True)["removed"] == 0
        assert guard.prune(0)["removed"] == 0
        assert long_job(1) is BLOCKED
    finally:
        release.set()
        leader.join()
    assert runs == [1]


def test_prune_never_removes_an_unknown_call(store):
    guard = Guard(store, quiet=True, secret="s")

    def timed_out(n):
        raise TimeoutError
    with pytest.raises(TimeoutError):
        guard(timed_out, 1)
    time.sleep(0.01)  # its record is older than the cut-off below
    assert "UNKNOWN" not in ledger.PRUNABLE
    assert guard.prune(0)["removed"] == 0 and store.records()[0].status == "UNKNOWN"
    with pytest.raises(ledger.OutcomeUnknown):
        guard(timed_out, 1)


def test_prune_reports_what_it_removed_per_status_and_tool_and_a_dry_run_removes_nothing(store):
    guard = Guard(store, quiet=True, secret="s")

    def refund(order_id):
        raise RuntimeError("declined")

    for n in range(3):
        guard(charge, n)
        with pytest.raises(RuntimeError):
            guard(refund, n)
    guard.workflow("other")(charge, 9)
    charge_name, refund_name = ledger.tool_name(charge), ledger.tool_name(refund)
    expected = [{"status": "FAILED", "tool": refund_name, "count": 3},
                {"status": "SUCCESS", "tool": charge_name, "count": 3}]
    assert guard.prune(0, wf="default", dry_run=True) == {"removed": 6, "dry_run": True, "counts": expected}
    assert len(store.records()) == 7
    assert guard.prune(0, status="FAILED", wf="default")["counts"] == expected[:1]
    assert guard.prune(0, wf="default")["counts"] == expected[1:]
    assert [r.workflow for r in store.records()] == ["other"]


def test_prune_keeps_what_finished_within_the_age_given_but_not_an_ended_ttl_window(store):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy("lookup", replay=True, ttl=0.05)
    lookup = guard.wrap_tools({"lookup": lambda q: q})["lookup"]
    guard(charge, 1)
    lookup("acme")
    assert guard.prune(3600, dry_run=True)["removed"] == 0
    time.sleep(0.06)  # the lookup's ttl window ends; it is pruned whatever its age
    assert guard.prune(3600)["counts"] == [{"status": "SUCCESS", "tool": "lookup", "count": 1}]
    assert [r.tool for r in store.records()] == [ledger.tool_name(charge)]


def test_prune_racing_calls_never_lets_two_runs_of_one_call_overlap(store):
    """Calls that fail keep going FAILED -> RUNNING -> FAILED while prune deletes every finished
    record it sees: a RUNNING record deleted by mistake would let a second run start beside it."""
    guard = Guard(store, quiet=True, secret="s")
    running, overlaps, runs = set(), [], []
    lock = threading.Lock()

    @guard.once(name="job")
    def job(n):
        with lock:
            if n in running:
                overlaps.append(n)
            running.add(n)
            runs.append(n)
        time.sleep(0.002)
        with lock:
            running.discard(n)
        raise RuntimeError(n)

    stop = time.monotonic() + 1.5

    def caller():
        while time.monotonic() < stop:
            for n in range(3):
                with contextlib.suppress(RuntimeError):
                    job(n)

    def pruner():
        while time.monotonic() < stop:
            guard.prune(0)

    errors = []

    def reporting(target):
        def run():
            try:
                target()
            except BaseException as e:   # a deadlock, a store error: the test fails on it
                errors.append(e)
        return run

    threads = [threading.Thread(target=reporting(caller)) for _ in range(4)] + \
        [threading.Thread(target=reporting(pruner))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and overlaps == [] and len(runs) > 20


@st.composite
def prune_cases(draw):
    """Records in every state, of two tools and workflows, finished at times (seconds before
    now) around a cut-off 100 s ago, some with a ttl window that ended or not; and prune's
    arguments."""
    records = []
    for n in range(draw(st.integers(0, 12))):
        status = draw(st.sampled_from(["RUNNING", "SUCCESS", "FAILED"]))
        records.append(dict(
            id=f"p{n}", tool=draw(st.sampled_from(["a", "b"])), workflow=draw(st.sampled_from(["w1", "w2"])),
            status=status, age=draw(st.sampled_from([0, 5, 99, 100, 101, 5000])),
            ttl_left=draw(st.sampled_from([None, -1, 0, 1])) if status == "SUCCESS" else None))
    statuses = tuple(sorted(draw(st.sets(st.sampled_from(["SUCCESS", "FAILED"]), min_size=1))))
    return records, statuses, draw(st.sampled_from([None, "w1"])), draw(st.sampled_from([1, 2, 1000]))


def prune_rule(record, before, now, statuses, workflow) -> bool:
    """What the README says prune deletes."""
    finished = record.status in ("SUCCESS", "FAILED")
    window_ended = record.expires is not None and record.expires <= now
    return (finished and record.status in statuses and workflow in (None, record.workflow)
            and (window_ended or record.updated < before))


@pytest.mark.parametrize("backend", ["memory", "sqlite", "postgres", "redis"])
def test_prune_deletes_exactly_what_its_rule_says_on_every_store(backend, tmp_path):
    store = STORES[backend](tmp_path)

    @settings(max_examples=60 if backend in ("memory", "sqlite") else 20, deadline=None)
    @given(prune_cases())
    def check(case):
        drawn, statuses, workflow, batch = case
        now = time.time()
        before = now - 100
        records = [Record(id=d["id"], tool=d["tool"], workflow=d["workflow"], caller=None, status=d["status"],
                          owner="o", epoch=1, lease_until=now - d["age"], run_key=d["id"], created=now - d["age"],
                          updated=now - d["age"], expires=None if d["ttl_left"] is None else now + d["ttl_left"])
                   for d in drawn]
        store.clear()
        for r in records:
            store.insert(r)
        doomed = [r for r in records if prune_rule(r, before, now, statuses, workflow)]
        expected: dict = {}
        for r in doomed:
            expected[(r.status, r.tool)] = expected.get((r.status, r.tool), 0) + 1
        assert store.prune(before, now, statuses, workflow, dry_run=True, batch=batch) == expected
        assert store.prune(before, now, statuses, workflow, batch=batch) == expected
        assert sorted(r.id for r in store.records()) == sorted(r.id for r in records if r not in doomed)
    try:
        check()
    finally:
        store.close()


@pytest.mark.parametrize("bad", [-1, "1d", None, float("nan"), True])
def test_prune_rejects_an_age_that_is_not_seconds(g, bad):
    g(charge, 1)
    with pytest.raises(ledger.ConfigError, match="older_than"):
        g.prune(bad)
    assert len(g.history()) == 1


@pytest.mark.parametrize("bad", ["RUNNING", ["SUCCESS", "RUNNING"], [], "success"])
def test_prune_refuses_any_state_but_success_and_failed(g, bad):
    g(charge, 1)
    with pytest.raises(ledger.ConfigError, match="never pruned"):
        g.prune(0, status=bad)
    assert len(g.history()) == 1


def test_prune_takes_a_timedelta(g):
    g(charge, 1)
    assert g.prune(dt.timedelta(hours=1))["removed"] == 0
    assert g.prune(dt.timedelta(0))["removed"] == 1


class LedgerModel(RuleBasedStateMachine):
    """The guard against a model of the state machine, on one store. The model knows each call
    by its argument and what it expects to have run; it finds a call's record under the id the
    public fingerprint gives the call's hand-written canonical arguments, never through the code
    under test."""

    make_store = staticmethod(lambda: MemoryStore())

    def __init__(self):
        super().__init__()
        self.store = self.make_store()
        self.guard = Guard(self.store, quiet=True, secret="model")
        self.guard.policy(model_tool, replay=True)
        self.status: dict[int, str] = {}
        self.values: dict[int, int] = {}
        self.runs: list[int] = []
        self.written: set[int] = set()   # the calls whose record the guard wrote (a crash writes its own)
        MODEL_RUNS.clear()
        MODEL_FAILING.clear()

    def call_id(self, k):
        return ledger.fingerprint(MODEL_TOOL, "default", {"k": k})

    @rule(k=st.integers(0, 3), fails=st.booleans())
    def call(self, k, fails):
        expect_run = self.status.get(k) != "SUCCESS"
        (MODEL_FAILING.add if fails else MODEL_FAILING.discard)(k)
        try:
            value = self.guard(model_tool, k)
        except RuntimeError:
            value = None
        if expect_run:
            self.runs.append(k)
            self.written.add(k)
            self.status[k] = "FAILED" if fails else "SUCCESS"
            if not fails:
                self.values[k] = value
        else:
            assert value == self.values[k]
        assert MODEL_RUNS == self.runs, (k, self.status.get(k))

    @rule(k=st.integers(0, 3))
    def crash_mid_call(self, k):
        """A worker claimed the call and died: its RUNNING record's lease has run out."""
        id = self.call_id(k)
        current = self.store.get(id)
        dead = Record(id=id, tool=MODEL_TOOL, workflow="default", caller=None,
                      status="RUNNING", owner="dead", epoch=current.epoch + 1 if current else 1,
                      lease_until=time.time() - 1, run_key=id, created=time.time())
        if current is None:
            assert self.store.insert(dead)
        else:
            assert self.store.swap(dead, current.epoch, current.owner)
        self.status[k] = "CRASHED"
        self.written.discard(k)

    @rule(k=st.integers(0, 3))
    def operator_retry(self, k):
        released = self.guard.retry(model_tool, k)
        assert released == (self.status.get(k) in ("SUCCESS", "CRASHED"))
        if released:
            self.status[k] = "FAILED"

    @invariant()
    def records_match_the_model(self):
        for k, status in self.status.items():
            record = self.store.get(self.call_id(k))
            expected = "RUNNING" if status == "CRASHED" else status
            assert record is not None and record.status == expected, (k, status, record)
            assert record.tool == MODEL_TOOL
            if k in self.written:   # a record the guard wrote shows the call's arguments
                assert json.loads(record.args) == {"k": k}
        assert len(self.store.records()) == len(self.status)

    def teardown(self):
        self.store.close()


MODEL_RUNS: list = []      # every run of model_tool, appended by the tool itself
MODEL_FAILING: set = set()  # the arguments model_tool fails on now
MODEL_TOOL = __name__ + ".model_tool"   # module.qualname, the name its records are kept under


def model_tool(k: int) -> int:
    MODEL_RUNS.append(k)
    if k in MODEL_FAILING:
        raise RuntimeError("model failure")
    return k * 10 + len(MODEL_RUNS)


@pytest.mark.parametrize("backend", [b if b == "memory" else pytest.param(b, marks=pytest.mark.slow)
                                     for b in STORES])   # on a file or a server, its 1250 steps take seconds
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

# The decision (ledger._decide): every row of the transition table in ledger.py, as a
# pure function of the stored record, the policy, the clock and what the caller waited for.

NOW = 1_000.0


def decided(status, *, lease="live", policy=None, waited=None, deadline=None, force=False, here=False,
            runs=1, expires=None, owner="worker-1", argsum=None, key=None, validate=False):
    guard = Guard(":memory:", quiet=True, secret="s")
    guard.policy(charge, **{**(policy or {}), **({"validate": validate} if validate else {})})
    call = guard._prepare(charge, (7,), {"key": key} if key else {})
    record = Record(id=call.id, tool=call.name, workflow=call.workflow, caller=None, status=status, owner=owner,
                    epoch=3, lease_until=NOW + 10 if lease == "live" else NOW - 10, run_key="run-key", runs=runs,
                    expires=expires, argsum=argsum, error="RuntimeError: boom")
    return ledger._decide(call, record, NOW, waited, deadline, force, here)


DECISIONS = {
    # name: (arguments of decided(), expected action, expected fields of the decision)
    "key reused with other values": (dict(status="SUCCESS", key="k1", validate=True, argsum="other"),
                                     "raise", {"error": ledger.KeyReuseError}),
    "forced over a live run": (dict(status="RUNNING", force=True), "claim", {"new_run": True}),
    "forced over a success": (dict(status="SUCCESS", force=True), "claim", {"new_run": True}),
    "running, live, no replay": (dict(status="RUNNING"), "duplicate", {"source": "blocked", "stale": False}),
    "running, live, replay, from inside its run": (dict(status="RUNNING", policy={"replay": True}, here=True),
                                                   "raise", {"error": ledger.ReentrantCallError}),
    "running, live, replay, wait= over": (dict(status="RUNNING", policy={"replay": True, "wait": 5},
                                               deadline=NOW - 1), "raise", {"error": ledger.WaitTimeout}),
    "running, live, replay, wait=0": (dict(status="RUNNING", policy={"replay": True, "wait": 0}),
                                      "raise", {"error": ledger.WaitTimeout}),
    "running, live, replay": (dict(status="RUNNING", policy={"replay": True}),
                              "wait", {"timeout": 10.0, "deadline": float("inf")}),
    "running, live, replay, wait= sooner than the lease": (dict(status="RUNNING", policy={"replay": True, "wait": 4}),
                                                           "wait", {"timeout": 4.0, "deadline": NOW + 4}),
    "running, expired, recover=block": (dict(status="RUNNING", lease="expired", policy={"recover": "block"}),
                                        "duplicate", {"source": "blocked", "stale": True}),
    "running, expired, left by ledger-once": (dict(status="RUNNING", lease="expired", owner=ledger.LEGACY_OWNER),
                                              "duplicate", {"source": "blocked", "stale": True}),
    "running, expired, confirmed ledger-once": (dict(status="RUNNING", lease="expired",
                                                     owner=ledger.LEGACY_CONFIRMED),
                                                "duplicate", {"source": "blocked", "stale": True}),
    "running, expired": (dict(status="RUNNING", lease="expired"), "claim", {"new_run": False, "verify": False}),
    "running, expired, with a verifier": (dict(status="RUNNING", lease="expired",
                                               policy={"verify": lambda key, arguments: None}),
                                          "claim", {"new_run": False, "verify": True}),
    "unknown, no verifier": (dict(status="UNKNOWN"), "raise", {"error": ledger.OutcomeUnknown}),
    "unknown, waited for it": (dict(status="UNKNOWN", waited=3, policy={"verify": lambda key, arguments: None}),
                               "raise", {"error": ledger.OutcomeUnknown}),
    "unknown, with a verifier": (dict(status="UNKNOWN", policy={"verify": lambda key, arguments: None}),
                                 "claim", {"new_run": False, "verify": True}),
    "failed, the run it waited for": (dict(status="FAILED", waited=3), "raise", {"error": ledger.LeaderFailed}),
    "failed, an earlier run it waited for": (dict(status="FAILED", waited=2), "claim", {"new_run": False}),
    "failed": (dict(status="FAILED"), "claim", {"new_run": False, "new_window": False}),
    "success, waited for it": (dict(status="SUCCESS", waited=3, policy={"replay": True}),
                               "duplicate", {"source": "shared"}),
    "success, replay": (dict(status="SUCCESS", policy={"replay": True}), "duplicate", {"source": "replayed"}),
    "success": (dict(status="SUCCESS"), "duplicate", {"source": "blocked", "stale": False}),
    "success, in ttl": (dict(status="SUCCESS", policy={"ttl": 60}, expires=NOW + 1),
                        "duplicate", {"source": "blocked"}),
    "success, runs below max": (dict(status="SUCCESS", policy={"max": 2}), "claim",
                                {"new_run": True, "new_window": False}),
    "success, ttl window over": (dict(status="SUCCESS", policy={"ttl": 60, "max": 3}, runs=3, expires=NOW),
                                 "claim", {"new_run": True, "new_window": True}),
}


@pytest.mark.parametrize("case", list(DECISIONS))
def test_each_transition_of_the_state_machine_is_decided_as_its_table_says(case):
    arguments, action, fields = DECISIONS[case]
    decision = decided(**arguments)
    assert decision.action == action
    for name, expected in fields.items():
        value = getattr(decision, name)
        assert isinstance(value, expected) if isinstance(expected, type) else value == expected, (name, value)


def test_the_decision_table_in_ledger_py_has_a_case_for_each_row():
    source = inspect.getsource(ledger)
    table = source[source.index("# Engine: the decision"):source.index("class _Decision")]
    rows = [line for line in table.splitlines() if re.match(r"#   \S.*  (claim|duplicate|wait|raise)", line)]
    assert len(rows) == 18 and len(DECISIONS) >= len(rows)
    actions = collections.Counter(re.search(r"  (claim|duplicate|wait|raise)", line).group(1) for line in rows)
    cases = collections.Counter(action for _, action, _ in DECISIONS.values())
    assert all(cases[action] >= n for action, n in actions.items()), (actions, cases)


@settings(max_examples=300, deadline=None)
@given(status=st.sampled_from(["RUNNING", "SUCCESS", "FAILED", "UNKNOWN"]), live=st.booleans(),
       replay=st.booleans(), recover=st.sampled_from(["retry", "block"]), waited=st.sampled_from([None, 2, 3]),
       runs=st.integers(0, 3), maximum=st.integers(1, 3), in_window=st.sampled_from([None, True, False]),
       here=st.booleans(), verifier=st.booleans())
def test_no_decision_runs_a_call_that_is_live_done_or_of_unknown_outcome(status, live, replay, recover, waited,
                                                                          runs, maximum, in_window, here, verifier):
    policy = {"replay": replay, "recover": recover, "max": maximum}
    if in_window is not None:
        policy["ttl"] = 60
    if verifier:
        policy["verify"] = lambda key, arguments: None
    expires = None if in_window is None else NOW + 1 if in_window else NOW
    decision = decided(status, lease="live" if live else "expired", policy=policy, waited=waited, runs=runs,
                       expires=expires, here=here)
    assert decision.action in ("claim", "duplicate", "wait", "raise")
    if decision.action == "claim":
        assert not (status == "RUNNING" and live)                      # a live run is never taken over
        assert not (status == "RUNNING" and recover == "block")        # nor a stale one kept blocked
        assert not (status == "SUCCESS" and expires != NOW and runs >= maximum)   # nor a finished one
        assert status != "UNKNOWN" or decision.verify                  # nor an uncertain one unverified
        assert decision.verify or not (status == "RUNNING" and verifier)  # a takeover asks the verifier first
    if decision.action == "wait":
        assert status == "RUNNING" and live and replay and not here
    if decision.action == "duplicate" and decision.source != "blocked":
        assert status == "SUCCESS"                                     # only a success is replayed or shared


PERSISTENT = [name for name in STORES if name != "memory"]


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
    procs = [forked(_race_in_process, shared_store, path, barrier, queue) for _ in range(4)]
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
    assert CHARGES == [(1, 10.0, "usd")]


def test_a_new_call_writes_its_attempt_with_its_claim_and_buffers_no_counter(store):
    guard = Guard(store, quiet=True, secret="s")
    guard(charge, 1)
    assert guard._core.pending == {}   # nothing for the heartbeat to write
    [record] = store.records()
    assert (record.attempts, record.executed, record.blocked) == (1, 1, 0)


def test_a_claim_over_a_failed_record_counts_its_attempt(store):
    guard, failures = Guard(store, quiet=True, secret="s"), [ValueError("declined")]

    @guard.once(name="pay")
    def pay(order: str) -> str:
        if failures:
            raise failures.pop()
        return "paid"
    with pytest.raises(ValueError):
        guard(pay, "o-1")
    assert guard(pay, "o-1") == "paid"
    guard._core.flush()
    [record] = store.records()
    assert (record.status, record.attempts, record.executed) == ("SUCCESS", 2, 2)


def test_replay_waiters_share_the_running_leaders_result(store):
    guard = Guard(store, quiet=True, secret="s")
    tool = counter(guard, result="answer", sleep=0.2)
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
    tool = counter(guard, result="done", sleep=0.5)
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
    tool = counter(guard, fail=True, sleep=0.2)
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
    tool.__wrapped__.fail = False
    assert guard(tool, 1) is not BLOCKED and len(tool.calls) == 2


def test_a_fenced_run_ending_leaves_the_flight_of_the_run_that_took_over_from_it():
    guard = Guard(":memory:", quiet=True, secret="s")
    guard.policy(charge, replay=True)
    core, call = guard._core, guard._prepare(charge, (1,), {})
    fenced = core.start(core.prepare_run(call, None, core.store.now()))
    taker = core.start(core.prepare_run(call, fenced.record, core.store.now()))
    flights = ledger._FLIGHTS
    core.release(fenced)
    assert flights[(core.store.url, call.id)] is taker.flight and not taker.flight.landed
    assert fenced.flight.landed   # its own waiters wake and read the store
    core.release(taker, taker.record)
    assert (core.store.url, call.id) not in flights and taker.flight.record is taker.record


def counting_reads(monkeypatch, store):
    """Count the store's reads and claims on this instance (the store itself stays real)."""
    reads = []
    for method in ("get", "insert_or_get"):
        real = getattr(store, method)
        monkeypatch.setattr(store, method, lambda *a, _real=real, _m=method, **k: (reads.append(_m), _real(*a, **k))[1])
    return reads


@pytest.mark.parametrize("replay", [True, False])
def test_a_duplicate_of_a_call_running_in_this_process_does_not_read_the_store(store, monkeypatch, replay):
    guard = Guard(store, quiet=True, secret="s")
    tool = counter(guard, result="done", sleep=0.3)
    guard.policy(tool, replay=replay)
    leader = threading.Thread(target=guard, args=(tool,))
    leader.start()
    wait_for(lambda: tool.calls, what="the leader to start")
    reads = counting_reads(monkeypatch, store)
    results = []
    threads = [threading.Thread(target=lambda: results.append(guard(tool))) for _ in range(10)]
    [t.start() for t in threads]
    [t.join() for t in threads + [leader]]
    assert results == (["done"] if replay else [BLOCKED]) * 10 and len(tool.calls) == 1
    assert reads == [], f"duplicates of a call running here read the store: {reads}"


def test_a_duplicate_of_a_fenced_run_here_decides_on_the_store(store):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(charge, replay=True)
    core, call = guard._core, guard._prepare(charge, (1,), {})
    fenced = core.start(core.prepare_run(call, None, core.store.now()))
    assert store.insert(fenced.record)
    taker = core.prepare_run(call, fenced.record, core.store.now())
    assert store.swap(taker.record, fenced.record.epoch, fenced.record.owner)
    assert store.swap(core.success_record(taker, {"by": "taker"}), taker.record.epoch, taker.record.owner)
    fenced.renew()   # finds its lease taken
    try:
        started = time.monotonic()
        assert guard(charge, 1) == {"by": "taker"} and CHARGES == []
        assert time.monotonic() - started < 1, "the duplicate waited on the fenced run's flight"
    finally:
        core.release(fenced)


def test_a_duplicate_does_not_take_over_a_run_here_whose_lease_only_this_process_saw_run_out(store):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(charge, recover="retry")
    core, call = guard._core, guard._prepare(charge, (1,), {})
    run = core.prepare_run(call, None, core.store.now())
    assert store.insert(run.record.evolve(lease_until=core.store.now() + 60))  # a renewal that was stored
    run.record = run.record.evolve(lease_until=core.store.now() - 1)  # but that this process did not see
    core.start(run)
    try:
        assert guard(charge, 1) is BLOCKED and CHARGES == []
    finally:
        core.release(run)


def test_a_waiter_with_another_secret_is_not_handed_the_leaders_result():
    store = MemoryStore()
    leader, waiter = Guard(store, quiet=True, secret="a"), Guard(store, quiet=True, secret="b")
    tool = Counter(result="done", sleep=0.3)
    for guard in (leader, waiter):
        guard.policy("slow", replay=True)
    running = threading.Thread(target=leader.wrap_tools({"slow": tool})["slow"])
    running.start()
    wait_for(lambda: tool.calls, what="the leader to start")
    with pytest.raises(ledger.IntegrityError):
        waiter.wrap_tools({"slow": tool})["slow"]()
    running.join()
    assert len(tool.calls) == 1


def _guarded_call_then_exit(path):
    guard = Guard(path, quiet=True, secret="s")
    os._exit(0 if guard(charge, 99) is not BLOCKED else 3)


def test_a_child_forked_while_a_thread_starts_a_run_can_run_calls(tmp_path):
    ledger._FLIGHTS_LOCK.acquire()   # as a parent thread inside start() or release() holds it at fork()
    try:
        child = forked(_guarded_call_then_exit, str(tmp_path / "l.db"))
        child.start()
        child.join(20)
    finally:
        ledger._FLIGHTS_LOCK.release()
    assert child.exitcode == 0, "the child's first guarded call hung on a lock held at fork()"


def test_a_bounded_wait_that_runs_out_raises(store):
    guard = Guard(store, quiet=True, secret="s")
    tool = counter(guard, sleep=0.5)
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
    leader = forked(_run_long_tool, shared_store, path, 0.2, 2.0)
    leader.start()
    wait_for(lambda: runs_of(path), what="the leader to start")
    guard = Guard(shared_store, quiet=True, secret="s")
    guard.policy(log_run, lease=0.2)
    seen = {guard(log_run, path, "long", 0, key="long-job")}
    while leader.is_alive():
        seen.add(guard(log_run, path, "long", 0, key="long-job"))
        time.sleep(0.05)
    leader.join()
    assert len(runs_of(path)) == 1
    assert seen == {BLOCKED}, seen   # duplicates came while it ran, and were blocked
    assert guard.store.records()[0].status == "SUCCESS"


def kill_a_leader_mid_run(shared_store, path: str, lease: float) -> None:
    """A leader that started log_run under `lease`, SIGKILLed before the tool returns."""
    victim = forked(_run_long_tool, shared_store, path, lease, 60)
    victim.start()
    wait_for(lambda: runs_of(path), what="the victim to start")
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()


def test_a_call_killed_mid_run_is_taken_over_after_its_lease(shared_store, tmp_path):
    path = str(tmp_path / "runs")
    kill_a_leader_mid_run(shared_store, path, 1.0)
    guard = Guard(shared_store, quiet=True, secret="s")
    guard.policy(log_run, lease=1.0)
    assert guard(log_run, path, "long", 0, key="long-job") is BLOCKED   # its lease is still alive
    wait_for(lambda: shared_store.records()[0].stale(shared_store.now()), what="the lease to expire")
    value = guard(log_run, path, "long", 0, key="long-job")
    assert value == f"long-{os.getpid()}"
    runs = runs_of(path)
    assert len(runs) == 2
    assert runs[0].split()[1] == runs[1].split()[1], "current_key() must survive the takeover"
    record = shared_store.records()[0]
    assert (record.status, record.epoch, record.executed) == ("SUCCESS", 2, 2)


def stale_after_a_killed_leader(shared_store, path: str) -> Guard:
    """A leader SIGKILLed in the middle of log_run under recover="block", and a guard on
    the same store once that call's lease has run out."""
    kill_a_leader_mid_run(shared_store, path, 0.3)
    guard = Guard(shared_store, quiet=True, secret="s")
    guard.policy(log_run, lease=0.3, recover="block")
    wait_for(lambda: shared_store.records()[0].stale(shared_store.now()), what="the lease to expire")
    return guard


def test_recover_block_keeps_a_crashed_call_blocked_until_retried(shared_store, tmp_path):
    path = str(tmp_path / "runs")
    guard = stale_after_a_killed_leader(shared_store, path)
    assert guard(log_run, path, "long", 0, key="long-job") is BLOCKED
    assert guard.stats()["stale"] == 1
    assert guard.retry(log_run, path, "long", 0, key="long-job") is True
    assert guard(log_run, path, "long", 0, key="long-job") == f"long-{os.getpid()}"
    assert len(runs_of(path)) == 2


def test_a_paused_leader_is_fenced_off_and_its_caller_still_gets_its_value(shared_store, tmp_path):
    path, queue = str(tmp_path / "runs"), FORK.Queue()
    paused = forked(_run_long_tool, shared_store, path, 0.4, 1.0, queue)
    paused.start()
    wait_for(lambda: runs_of(path), what="the leader to start")
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: shared_store.records()[0].stale(shared_store.now()), what="the paused leader's lease to expire")
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


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_a_leader_whose_renewals_cannot_reach_the_store_is_fenced_off_and_its_caller_still_gets_its_value(
        kind, tmp_path, caplog):
    need_postgres() if kind == "postgres" else need_redis()
    url = POSTGRES_URL if kind == "postgres" else REDIS_URL
    parts = urllib.parse.urlsplit(url)
    proxy = TcpProxy((parts.hostname, parts.port or (5432 if kind == "postgres" else 6379)))
    user = parts.netloc.rpartition("@")[0] + "@" if "@" in parts.netloc else ""
    through_proxy = STORES[kind](url=with_address(url, proxy.port, user))
    direct = (ledger.PostgresStore(url, table=through_proxy.table) if kind == "postgres"
              else ledger.RedisStore(url, prefix=through_proxy.prefix))
    path, results = str(tmp_path / "runs"), []
    leader, contender = Guard(through_proxy, secret="s"), Guard(direct, quiet=True, secret="s")
    for guard in (leader, contender):
        guard.policy(log_run, lease=0.5, replay=True)
    try:
        running = threading.Thread(target=lambda: results.append(leader(log_run, path, "v", 2.0, key="job")))
        running.start()
        wait_for(lambda: runs_of(path), what="the leader to start")
        with proxy.frozen():   # the leader's store stops answering it: its renewals hang
            wait_for(lambda: direct.get(direct.records()[0].id).stale(direct.now()), what="its lease to run out")
            mine = contender(log_run, path, "v", 0, key="job")   # takes the call over and runs it
        running.join(30)
        fenced = leader.stats()["fenced"]
    finally:
        proxy.cut()
    runs = runs_of(path)
    assert len(runs) == 2 and runs[0].split()[1] == runs[1].split()[1], "both runs carry the same current_key()"
    assert results == [f"v-{os.getpid()}"] and mine == results[0], "the leader's caller still gets its own value"
    assert fenced == 1 and "took the call over" in caplog.text
    assert json.loads(direct.records()[0].result) == mine and direct.records()[0].epoch == 2


# Uncertain outcomes: an error the policy counts as uncertain records UNKNOWN, which
# no duplicate runs past; the policy's verifier, asked before any run that could
# repeat a side effect, ends the call as done, lets it run, or leaves it UNKNOWN.

def timing_out_charge(order_id: int, amount: float = 10.0) -> dict:
    """Charges (counted in CHARGES under its key), then times out on its first run."""
    CHARGES.append((order_id, current_key()))
    if len(CHARGES) == 1:
        raise TimeoutError("no answer from the payment provider")
    return {"charged": amount, "order": order_id}


def test_an_uncertain_error_records_unknown_and_no_duplicate_runs(store):
    guard = Guard(store, quiet=True, secret="s")
    with pytest.raises(TimeoutError):
        guard(timing_out_charge, 1)
    record = store.records()[0]
    assert (record.status, record.error) == ("UNKNOWN", "TimeoutError: no answer from the payment provider")
    for _ in range(3):
        with pytest.raises(ledger.OutcomeUnknown, match=f"ledger resolve {record.id} --done") as caught:
            guard(timing_out_charge, 1)
        assert (caught.value.id, caught.value.key) == (record.id, record.run_key)
    assert len(CHARGES) == 1
    assert guard.stats()["unknown"] == 1 and guard.history()[0]["status"] == "UNKNOWN"


def test_a_certain_error_records_failed_and_the_next_call_runs_again_with_the_same_key(store):
    guard = Guard(store, quiet=True, secret="s")

    def refused(order_id: int) -> str:
        CHARGES.append(current_key())
        if len(CHARGES) == 1:
            raise ValueError("card declined")
        return "ok"
    with pytest.raises(ValueError):
        guard(refused, 1)
    assert store.records()[0].status == "FAILED"
    assert guard(refused, 1) == "ok" and CHARGES[0] == CHARGES[1]


class _NamedLikeRequests(OSError):
    pass


_NamedLikeRequests.__module__, _NamedLikeRequests.__name__ = "requests.exceptions", "Timeout"


class _ReadTimeoutLikeRequests(_NamedLikeRequests):   # requests.ReadTimeout: a subclass of a named class
    pass


class _SameNameOtherPackage(Exception):
    pass


_SameNameOtherPackage.__module__, _SameNameOtherPackage.__name__ = "mylib.errors", "Timeout"


def _http_errors():
    import httpx
    import openai
    request = httpx.Request("POST", "https://api.example.com/charge")
    return {"httpx.ReadTimeout": httpx.ReadTimeout("read", request=request),
            "httpx.ConnectError": httpx.ConnectError("reset", request=request),
            "openai.APITimeoutError": openai.APITimeoutError(request=request),
            "httpx.HTTPStatusError": httpx.HTTPStatusError("502", request=request,
                                                           response=httpx.Response(502, request=request))}


UNCERTAIN_BY_DEFAULT = {
    "TimeoutError": TimeoutError(), "socket.timeout": socket.timeout(), "asyncio.TimeoutError": asyncio.TimeoutError(),
    "ConnectionResetError": ConnectionResetError(), "BrokenPipeError": BrokenPipeError(),
    "ConnectionRefusedError": ConnectionRefusedError(), "http.client.RemoteDisconnected":
    __import__("http.client").client.RemoteDisconnected("closed"),
    "requests.Timeout (by name)": _NamedLikeRequests(), "requests.ReadTimeout (subclass)": _ReadTimeoutLikeRequests(),
    "httpx.ReadTimeout": None, "httpx.ConnectError": None, "openai.APITimeoutError": None,
}
CERTAIN_BY_DEFAULT = {
    "ValueError": ValueError(), "RuntimeError": RuntimeError(), "OSError": OSError("disk full"),
    "PermissionError": PermissionError(), "KeyError": KeyError("x"), "mylib.Timeout": _SameNameOtherPackage(),
    "httpx.HTTPStatusError": None,
}


@pytest.mark.parametrize("name", [*UNCERTAIN_BY_DEFAULT, *CERTAIN_BY_DEFAULT])
def test_which_errors_leave_the_outcome_unknown_by_default(name, tmp_path):
    error = {**UNCERTAIN_BY_DEFAULT, **CERTAIN_BY_DEFAULT}[name] or _http_errors()[name]
    guard = Guard(MemoryStore(), quiet=True, secret="s")

    def tool(n: int) -> None:
        raise error
    with pytest.raises(type(error)):
        guard.once(tool, name="tool")(1)
    expected = "UNKNOWN" if name in UNCERTAIN_BY_DEFAULT else "FAILED"
    assert guard.store.records()[0].status == expected


@settings(max_examples=60, deadline=None)
@given(chain=st.lists(st.tuples(st.sampled_from(["requests.exceptions", "httpx._exceptions", "mylib", "app.errors"]),
                                st.sampled_from(["Timeout", "ReadTimeout", "NetworkError", "Declined"])),
                      min_size=1, max_size=4),
       named=st.sets(st.sampled_from(["requests.Timeout", "httpx.NetworkError", "mylib.Declined", "app.Timeout"])),
       listed=st.sets(st.integers(0, 3)))
def test_an_error_is_uncertain_exactly_when_one_of_its_classes_is_listed_or_named(chain, named, listed):
    """Whatever the hierarchy: a listed class (itself or a base) or a "package.Class" name of the
    top-level package of any class it inherits from makes the error UNKNOWN; nothing else does."""
    classes, base = [], Exception
    for module, name in chain:
        base = type(name, (base,), {"__module__": module})
        classes.append(base)
    uncertain = (*sorted(named), *(classes[i] for i in sorted(listed) if i < len(classes)))
    expected = any(i < len(classes) for i in listed) or any(
        f"{c.__module__.partition('.')[0]}.{c.__name__}" in named for c in classes)
    guard = Guard(MemoryStore(), quiet=True, secret="s")
    guard.policy("tool", uncertain=uncertain)

    def tool(n: int) -> None:
        raise classes[-1]()
    with pytest.raises(classes[-1]):
        guard.once(tool, name="tool")(1)
    assert guard.store.records()[0].status == ("UNKNOWN" if expected else "FAILED")


class _DeadlineMissed(Exception):
    pass


@pytest.mark.parametrize("uncertain, error, status", [
    ((_DeadlineMissed,), _DeadlineMissed(), "UNKNOWN"),            # a class of your own
    ([f"{__name__.partition('.')[0]}._DeadlineMissed"], _DeadlineMissed(), "UNKNOWN"),   # by name, as a list
    ((*ledger.UNCERTAIN_ERRORS, KeyboardInterrupt), KeyboardInterrupt(), "UNKNOWN"),
    ((), TimeoutError(), "FAILED"),                                # () runs again after any error
    ((ValueError,), TimeoutError(), "FAILED"),                     # the policy's list replaces the default
])
def test_the_policy_says_which_errors_are_uncertain(uncertain, error, status):
    guard = Guard(MemoryStore(), quiet=True, secret="s")

    def tool(n: int) -> None:
        raise error
    guard.policy("tool", uncertain=uncertain)
    with pytest.raises(type(error)):
        guard.once(tool, name="tool")(1)
    assert guard.store.records()[0].status == status


@pytest.mark.parametrize("bad", [dict(uncertain=("Timeout",)), dict(uncertain=(int,)), dict(uncertain="x.Y"),
                                 dict(verify="lookup"), dict(verify=42)])
def test_policy_refuses_a_bad_uncertain_or_verify(g, bad):
    with pytest.raises(ledger.ConfigError, match="uncertain|verify"):
        g.policy(charge, **bad)


def _verifier(answer, asked):
    """A verifier giving `answer` (an exception is raised), noting what it was asked."""
    def verify(key, arguments):
        asked.append((key, arguments))
        if isinstance(answer, BaseException):
            raise answer
        return answer
    return verify


VERIFIER_ANSWERS = {"done": ledger.Done({"charged": 10.0, "order": 1, "found": True}), "not done": ledger.NOT_DONE,
                    "unknown": None, "raises": ConnectionError("lookup failed too"), "answers nonsense": True}


@pytest.mark.parametrize("answer", list(VERIFIER_ANSWERS))
def test_a_retry_after_an_uncertain_error_asks_the_verifier_first(store, answer):
    guard, asked = Guard(store, quiet=True, secret="s"), []
    guard.policy(timing_out_charge, replay=True, verify=_verifier(VERIFIER_ANSWERS[answer], asked))
    with pytest.raises(TimeoutError):
        guard(timing_out_charge, 1)
    key = store.records()[0].run_key
    if answer == "done":
        outcome = guard.execute(timing_out_charge, 1)
        assert (outcome.value, outcome.source, outcome.ran) == (VERIFIER_ANSWERS["done"].value, "verified", False)
        assert guard(timing_out_charge, 1) == VERIFIER_ANSWERS["done"].value      # replayed, signed
        assert len(CHARGES) == 1 and store.records()[0].executed == 1
    elif answer == "not done":
        assert guard(timing_out_charge, 1) == {"charged": 10.0, "order": 1}
        assert len(CHARGES) == 2 and CHARGES[1][1] == key == CHARGES[0][1]     # run again, same key
    else:
        for _ in range(2):   # each later call asks again: the other side may know by then
            with pytest.raises(ledger.OutcomeUnknown, match="ledger resolve"):
                guard(timing_out_charge, 1)
        assert len(CHARGES) == 1 and store.records()[0].status == "UNKNOWN"
        assert ("could not tell" if answer == "unknown" else "verifier") in store.records()[0].error
    assert asked[0] == (key, {"order_id": 1, "amount": 10.0})
    assert store.records()[0].status in ("SUCCESS", "UNKNOWN")


def test_a_failed_call_is_run_again_without_asking_the_verifier(store):
    guard, asked, tool = Guard(store, quiet=True, secret="s"), [], Counter(fail=True)
    guard.policy("counter", verify=_verifier(ledger.Done(1), asked))
    for _ in range(2):
        with pytest.raises(RuntimeError):
            guard.once(tool, name="counter")(1)
    assert len(tool.calls) == 2 and asked == []


def _kill_mid_charge(store, path, lease):
    """A worker that charges (one line in `path`) and is killed before its record is written."""
    guard = Guard(store, quiet=True, secret="s")
    guard.policy("pay", lease=lease)

    def charge_and_die(order: int) -> None:
        log_run(path, "charged")
        os.kill(os.getpid(), signal.SIGKILL)
    guard.once(charge_and_die, name="pay")(7, key="order-7")


@pytest.mark.parametrize("answer", ["done", "not done", "unknown"])
def test_a_takeover_of_a_killed_leader_asks_the_verifier_first(shared_store, tmp_path, answer):
    path = str(tmp_path / "runs")
    victim = forked(_kill_mid_charge, shared_store, path, 0.3)
    victim.start()
    victim.join()
    assert victim.exitcode == -signal.SIGKILL and len(runs_of(path)) == 1
    guard, asked = Guard(shared_store, quiet=True, secret="s"), []

    def verify(key, arguments):
        asked.append(key)
        found = any(line.split()[1] == key for line in runs_of(path))
        return {"done": ledger.Done("ch_1") if found else ledger.NOT_DONE, "not done": ledger.NOT_DONE,
                "unknown": None}[answer]

    pay = guard.once(lambda order: log_run(path, "charged"), name="pay")
    guard.policy("pay", lease=0.3, verify=verify)
    wait_for(lambda: shared_store.records()[0].stale(shared_store.now()), what="the lease to expire")
    key = shared_store.records()[0].run_key
    if answer == "done":
        assert pay(7, key="order-7") == "ch_1" and len(runs_of(path)) == 1
    elif answer == "not done":
        assert pay(7, key="order-7") == f"charged-{os.getpid()}"
        assert [line.split()[1] for line in runs_of(path)] == [key, key]
    else:
        with pytest.raises(ledger.OutcomeUnknown):
            pay(7, key="order-7")
        assert len(runs_of(path)) == 1 and shared_store.records()[0].status == "UNKNOWN"
    assert asked == [key]


def test_a_takeover_without_a_verifier_runs_again_with_the_same_key_as_before(shared_store, tmp_path):
    path = str(tmp_path / "runs")
    victim = forked(_kill_mid_charge, shared_store, path, 0.3)
    victim.start()
    victim.join()
    guard = Guard(shared_store, quiet=True, secret="s")
    guard.policy("pay", lease=0.3)
    wait_for(lambda: shared_store.records()[0].stale(shared_store.now()), what="the lease to expire")
    guard.once(lambda order: log_run(path, "charged"), name="pay")(7, key="order-7")
    keys = [line.split()[1] for line in runs_of(path)]
    assert len(keys) == 2 and keys[0] == keys[1]


@pytest.mark.parametrize("answer", ["done", "not done", "unknown", "raises"])
def test_an_async_tool_awaits_its_async_verifier(store, answer):
    guard, asked = Guard(store, quiet=True, secret="s"), []

    async def charge_async(order_id: int) -> str:
        CHARGES.append(current_key())
        if len(CHARGES) == 1:
            raise asyncio.TimeoutError
        return "ch_2"

    async def verify(key, arguments):
        asked.append(key)
        await asyncio.sleep(0)
        if answer == "raises":
            raise ConnectionError("lookup failed")
        return {"done": ledger.Done("ch_1"), "not done": ledger.NOT_DONE, "unknown": None}[answer]
    guard.policy(charge_async, verify=verify)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await guard(charge_async, 1)
        if answer in ("unknown", "raises"):
            with pytest.raises(ledger.OutcomeUnknown):
                await guard(charge_async, 1)
            return None
        return await guard(charge_async, 1)
    assert asyncio.run(main()) == {"done": "ch_1", "not done": "ch_2"}.get(answer)
    assert len(CHARGES) == (2 if answer == "not done" else 1) and asked == [CHARGES[0]]


def test_a_sync_tool_whose_verifier_is_async_stays_unknown_with_a_clear_message(g, recwarn):
    async def verify(key, arguments):
        return ledger.NOT_DONE
    g.policy(timing_out_charge, verify=verify)
    with pytest.raises(TimeoutError):
        g(timing_out_charge, 1)
    with pytest.raises(ledger.OutcomeUnknown):
        g(timing_out_charge, 1)
    assert "awaitable for a sync tool" in g.store.records()[0].error and len(CHARGES) == 1
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_an_interrupt_inside_the_verifier_leaves_the_call_to_be_verified_again(g):
    answers = [KeyboardInterrupt(), ledger.Done("ch_1")]
    g.policy(timing_out_charge, lease=0.2, verify=_verifier_sequence(answers))
    with pytest.raises(TimeoutError):
        g(timing_out_charge, 1)
    with pytest.raises(KeyboardInterrupt):
        g(timing_out_charge, 1)
    assert g(timing_out_charge, 1) is BLOCKED              # its lease is live, and no longer renewed
    wait_for(lambda: g.store.records()[0].stale(g.store.now()), what="the lease to expire")
    assert g(timing_out_charge, 1) == "ch_1" and len(CHARGES) == 1


def _verifier_sequence(answers):
    def verify(key, arguments):
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer
    return verify


def test_a_waiting_duplicate_whose_leader_ends_unknown_gets_outcome_unknown(store):
    guard, started = Guard(store, quiet=True, secret="s"), threading.Event()

    def slow_timeout(order_id: int) -> None:
        CHARGES.append(order_id)
        started.set()
        time.sleep(0.3)
        raise TimeoutError
    guard.policy("slow", replay=True, verify=_verifier(ledger.NOT_DONE, []))
    slow = guard.once(slow_timeout, name="slow")
    leader = threading.Thread(target=lambda: pytest.raises(TimeoutError, slow, 1))
    leader.start()
    started.wait(10)
    with pytest.raises(ledger.OutcomeUnknown):
        slow(1)
    leader.join()
    assert CHARGES == [1]


def test_an_unknown_record_is_signed_and_a_tampered_one_steers_nothing(store):
    guard, asked = Guard(store, quiet=True, secret="s"), []
    guard.policy(timing_out_charge, verify=_verifier(ledger.NOT_DONE, asked))
    with pytest.raises(TimeoutError):
        guard(timing_out_charge, 1)
    record = store.records()[0]
    assert record.sig.startswith("v2:")
    tamper(store, record.id, run_key="someone-elses-key")   # the verifier would look up another charge
    with pytest.raises(ledger.IntegrityError, match="signature"):
        guard(timing_out_charge, 1)
    assert asked == [] and len(CHARGES) == 1
    tamper(store, record.id, run_key=record.run_key, status="SUCCESS")   # its signature says UNKNOWN
    with pytest.raises(ledger.IntegrityError, match="signature"):
        guard(timing_out_charge, 1)


# Resolving an UNKNOWN call: once, atomically, racing duplicates.

def _unknown_call(guard) -> str:
    """Leave timing_out_charge(1) UNKNOWN; its record's id."""
    with pytest.raises(TimeoutError):
        guard(timing_out_charge, 1)
    return guard.store.records()[0].id


def test_resolve_done_records_the_result_duplicates_get_and_settles_once(store):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(timing_out_charge, replay=True)
    id = _unknown_call(guard)
    assert guard.resolve(id, done=True, result={"charge": "ch_1"}) is True
    assert guard.resolve(id, done=False) is False and guard.resolve(id, done=True, result=2) is False
    assert guard(timing_out_charge, 1) == {"charge": "ch_1"} and len(CHARGES) == 1
    record = store.get(id)
    assert (record.status, record.runs, record.owner) == ("SUCCESS", 1, "resolve")


def test_resolve_not_done_lets_the_next_call_run_with_the_same_key(store):
    guard = Guard(store, quiet=True, secret="s")
    id = _unknown_call(guard)
    assert guard.resolve(id, done=False) is True and guard.resolve(id, done=False) is False
    assert guard(timing_out_charge, 1) == {"charged": 10.0, "order": 1}
    assert guard(timing_out_charge, 1) is BLOCKED
    assert len(CHARGES) == 2 and CHARGES[0][1] == CHARGES[1][1]


def test_resolve_refuses_what_it_cannot_mean(g):
    id = _unknown_call(g)
    with pytest.raises(ledger.ConfigError, match="done="):
        g.resolve(id, done=False, result=1)
    with pytest.raises(ledger.ConfigError, match="True or False"):
        g.resolve(id, done="yes")
    assert g.resolve("no-such-call", done=True) is False
    assert g.store.get(id).status == "UNKNOWN"


def _call_until_settled(store, path, outcomes):
    """Call the UNKNOWN call until it is settled; what each call gave, in `outcomes`. The first
    refusal is a line in path.refused."""
    guard = Guard(store, quiet=True, secret="s")
    pay = guard.once(lambda order: log_run(path, "ran"), name="pay")
    deadline, refused = time.time() + 60, False
    while time.time() < deadline:
        try:
            outcomes.append(guard.execute(pay, 1, key="order-1").source)
            return
        except ledger.OutcomeUnknown:
            if not refused:
                with open(path + ".refused", "a") as f:
                    f.write(f"{os.getpid()}\n")
                refused = True
            time.sleep(0.002)
    outcomes.append("stuck")


def _leave_unknown(store, path) -> str:
    guard = Guard(store, quiet=True, secret="s")

    def pay(order: int) -> str:
        log_run(path, "ran")
        raise TimeoutError
    with pytest.raises(TimeoutError):
        guard.once(pay, name="pay")(1, key="order-1")
    return store.records()[0].id


@pytest.mark.parametrize("done", [True, False])
def test_resolve_racing_duplicate_threads_lets_at_most_the_one_run_it_allows(store, tmp_path, done):
    path, outcomes = str(tmp_path / "runs"), []
    id = _leave_unknown(store, path)
    threads = [threading.Thread(target=_call_until_settled, args=(store, path, outcomes)) for _ in range(8)]
    [t.start() for t in threads]
    time.sleep(0.05)
    settled = [threading.Thread(target=lambda: outcomes.append(Guard(store, secret="s").resolve(id, done=done)))
               for _ in range(3)]
    [t.start() for t in settled]
    [t.join() for t in threads + settled]
    assert sorted(o for o in outcomes if isinstance(o, bool)) == [False, False, True]   # settled once
    sources = [o for o in outcomes if not isinstance(o, bool)]
    assert len(runs_of(path)) == (1 if done else 2)
    assert sorted(sources) == (["blocked"] * 8 if done else sorted(["executed"] + ["blocked"] * 7))


def _call_until_settled_in_process(spec, path, queue):
    outcomes = []
    _call_until_settled(spec, path, outcomes)
    queue.put(outcomes[0])


@pytest.mark.parametrize("done", [True, False])
@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow),
                                    pytest.param("forkserver", marks=pytest.mark.slow)])   # a fresh interpreter each
def test_resolve_racing_duplicate_processes_lets_at_most_the_one_run_it_allows(shared_store, tmp_path, done, method):
    context = multiprocessing.get_context(method)
    path, queue = str(tmp_path / "runs"), context.Queue()
    id = _leave_unknown(shared_store, path)
    workers = [context.Process(target=_call_until_settled_in_process, args=(spec_of(shared_store), path, queue),
                               daemon=True) for _ in range(4)]
    [w.start() for w in workers]
    wait_for(lambda: len(runs_of(path + ".refused")) == 4, timeout=60, what="every worker to be refused once")
    assert Guard(shared_store, secret="s").resolve(id, done=done) is True
    sources = sorted(queue.get(timeout=30) for _ in workers)
    [w.join() for w in workers]
    assert len(runs_of(path)) == (1 if done else 2)
    assert sources == (["blocked"] * 4 if done else ["blocked"] * 3 + ["executed"])
    keys = {line.split()[1] for line in runs_of(path)}
    assert len(keys) == 1   # the run after --not-done kept the key


# Clocks: leases and ttl windows are judged on the store's clock (Store.now()),
# which a step of one worker's wall clock does not move. A worker's wall clock is
# stepped as NTP would step it: time.time() jumps, the monotonic clocks do not.
# (faketime cannot do it here: with its monotonic clocks left alone, its sleeps fail.)

_GUARDED_CALL = """
import json, sys, time
step, real_time, real_time_ns = float(sys.argv[1]), time.time, time.time_ns
time.time = lambda: real_time() + step
time.time_ns = lambda: real_time_ns() + int(step * 1e9)
import ledger, test_ledger
spec, tool, policy, args = sys.argv[2], getattr(test_ledger, sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
guard = ledger.Guard(spec, quiet=True, secret="s")
guard.policy(tool, **policy)
print(repr(guard(tool, *args, key="job")), flush=True)
"""


def spec_of(store) -> str:
    return store.path if isinstance(store, SQLiteStore) else store.url


def call_with_wall_clock_stepped(step: float, store, tool, policy: dict, *args) -> subprocess.Popen:
    """A worker process whose wall clock is `step` seconds off, making one guarded call."""
    return subprocess.Popen([sys.executable, "-c", _GUARDED_CALL, str(step), spec_of(store), tool.__name__,
                             json.dumps(policy), json.dumps(args)],
                            env={**os.environ, "PYTHONPATH": str(HERE)}, cwd=HERE, stdout=subprocess.PIPE, text=True)


def log_run_until(path: str, release: str) -> str:
    """A tool whose runs are counted across processes, and that runs until `release` exists."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {current_key()}\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return f"released-{os.getpid()}"


@contextlib.contextmanager
def a_leader_running_until_released(shared_store, tmp_path):
    """A guard of this process running log_run_until under a 2 s lease in a thread; yields
    (that guard, the runs file, the release file) once the tool runs, and releases it when the block ends."""
    path, release = str(tmp_path / "runs"), str(tmp_path / "release")
    leader = Guard(shared_store, quiet=True, secret="s")
    leader.policy(log_run_until, lease=2.0)
    running = threading.Thread(target=leader, args=(log_run_until, path, release), kwargs={"key": "job"})
    running.start()
    try:
        wait_for(lambda: runs_of(path), what="the leader to start")
        yield leader, path, release
    finally:
        pathlib.Path(release).touch()
        running.join(30)


@pytest.mark.slow
def test_a_wall_clock_stepped_forward_cannot_take_over_a_live_call(shared_store, tmp_path):
    with a_leader_running_until_released(shared_store, tmp_path) as (_, path, release):
        ahead = call_with_wall_clock_stepped(+3600, shared_store, log_run_until, {"lease": 2.0}, path, release)
        wait_for(lambda: ahead.poll() is not None or len(runs_of(path)) > 1, timeout=60, what="the other worker")
    assert ahead.communicate(timeout=30)[0] == "BLOCKED\n" and len(runs_of(path)) == 1


@contextlib.contextmanager
def a_call_running_in_a_thread(guard: Guard):
    """Yields a guarded tool once a call of it is running in another thread; that call
    returns when the block ends."""
    inside, release = threading.Event(), threading.Event()

    @guard.once(name="long_tool")
    def tool():
        inside.set()
        release.wait(10)
    worker = threading.Thread(target=tool)
    worker.start()
    try:
        assert inside.wait(10)
        yield tool
    finally:
        release.set()
        worker.join()


def test_an_operator_whose_wall_clock_is_ahead_cannot_release_a_live_call(store, monkeypatch):
    guard = Guard(store, quiet=True, secret="s")
    with a_call_running_in_a_thread(guard) as tool:
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)   # stepped as NTP would step it
        with pytest.raises(ledger.LeaseLiveError, match="running now"):
            guard.retry(tool)
        monkeypatch.undo()
        assert store.records()[0].status == "RUNNING"


@pytest.mark.slow
def test_a_leader_whose_wall_clock_is_behind_keeps_its_lease(shared_store, tmp_path):
    path, release = str(tmp_path / "runs"), str(tmp_path / "release")
    behind = call_with_wall_clock_stepped(-3600, shared_store, log_run_until, {"lease": 1.0}, path, release)
    try:
        wait_for(lambda: runs_of(path), timeout=30, what="the leader to start")
        guard = Guard(shared_store, quiet=True, secret="s")
        guard.policy(log_run_until, lease=1.0)
        seen, until = set(), time.monotonic() + 2.5   # renewals every 1/3 s
        while time.monotonic() < until:
            seen.add(guard(log_run_until, path, release, key="job"))
            time.sleep(0.05)
    finally:
        pathlib.Path(release).touch()
    assert behind.communicate(timeout=30)[0].startswith("'released-")
    assert seen == {BLOCKED} and len(runs_of(path)) == 1


_RETRY_CALL = """
import sys, time
step, real_time = float(sys.argv[1]), time.time
time.time = lambda: real_time() + step
import ledger, test_ledger
guard = ledger.Guard(sys.argv[2], quiet=True, secret="s")
try:
    print(guard.retry(test_ledger.log_run_until, *sys.argv[3:], key="job"))
except ledger.LeaseLiveError:
    print("LeaseLiveError")
"""


@pytest.mark.slow
def test_a_wall_clock_stepped_forward_cannot_release_a_live_call_with_retry(shared_store, tmp_path):
    with a_leader_running_until_released(shared_store, tmp_path) as (leader, path, release):
        ahead = subprocess.run([sys.executable, "-c", _RETRY_CALL, "3600", spec_of(shared_store), path, release],
                               env={**os.environ, "PYTHONPATH": str(HERE)}, cwd=HERE, capture_output=True,
                               text=True, timeout=60)
        still = leader.history()[0]["status"]
    assert ahead.stdout == "LeaseLiveError\n", ahead.stderr
    assert still == "RUNNING"


@pytest.mark.slow
def test_a_wall_clock_stepped_forward_does_not_end_a_ttl_window(shared_store, tmp_path):
    path = str(tmp_path / "runs")
    guard = Guard(shared_store, quiet=True, secret="s")
    guard.policy(log_run, ttl=600)
    assert guard(log_run, path, "v", key="job") == f"v-{os.getpid()}"
    ahead = call_with_wall_clock_stepped(+3600, shared_store, log_run, {"ttl": 600}, path, "v")
    assert ahead.communicate(timeout=60)[0] == "BLOCKED\n" and len(runs_of(path)) == 1


# The combined stress test: every fault above at once. Several processes x
# threads (forked ones using the parent's guard while the parent goes on using
# it, spawned and forkserver ones their own, one with its wall clock an hour ahead)
# work through the same calls while random leaders are SIGKILLed, `ledger show`
# reads the store from another process, and an unrelated SQLite file stays
# write-locked under every worker's counters. Each run of a call is a line in an
# append-only file; a call may run again only after its leader was killed.
# Run it alone with `python -m pytest -m stress`.

SPAWN, FORKSERVER = multiprocessing.get_context("spawn"), multiprocessing.get_context("forkserver")
STRESS_CALLS, STRESS_LEASE, STRESS_DEADLINE, STRESS_KILLS = 150, 1.0, 40.0, 10


def stress_tool(path: str, label: str) -> str:
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {label} {current_key()}\n")
    time.sleep(0.2 + random.random() * 0.6)   # long enough to be killed in the middle
    return label


def _stress_threads(guard, path, side, threads=3):
    side_guard = Guard(side, quiet=True, secret="s")   # an unrelated store, write-locked all along
    side_guard.store
    side_guard._core.count("unrelated", 1, 0)
    guard.policy(stress_tool, lease=STRESS_LEASE)
    labels = [f"call-{n}" for n in range(STRESS_CALLS)]

    def work():
        left = list(labels)
        deadline = time.monotonic() + STRESS_DEADLINE
        while left and time.monotonic() < deadline:
            random.shuffle(left)
            for label in list(left):
                outcome = guard.execute(stress_tool, path, label, key=label)
                if outcome.record is not None and outcome.record.status == "SUCCESS":
                    left.remove(label)
            time.sleep(0.01)
    workers = [threading.Thread(target=work) for _ in range(threads)]
    [t.start() for t in workers]
    return workers


def _stress_forked(guard, path, side):
    [t.join() for t in _stress_threads(guard, path, side)]


def _stress_started(spec, path, side, step):
    if step:   # this worker's wall clock is `step` seconds off
        real = time.time
        time.time = lambda: real() + step
    [t.join() for t in _stress_threads(Guard(spec, quiet=True, secret="s"), path, side)]


@pytest.mark.stress
@pytest.mark.parametrize("kind", PERSISTENT)
def test_stress_every_call_runs_once_but_for_reruns_after_a_killed_leader(kind, tmp_path):
    store = STORES[kind](tmp_path)
    spec, path, side = spec_of(store), str(tmp_path / "runs"), str(tmp_path / "unrelated.db")
    SQLiteStore(side).close()
    parent = Guard(store, quiet=True, secret="s")
    parent(stress_tool, path, "warm-up", key="warm-up")   # the parent has used the store before it forks
    processes, killed, shows, started = [], set(), [], time.monotonic()

    def start(n):
        if n % 3:   # spawn and forkserver: a guard of their own; the first spawned one an hour ahead
            context = SPAWN if n % 3 == 1 else FORKSERVER
            process = context.Process(target=_stress_started, args=(spec, path, side, 3600.0 if n == 1 else 0.0),
                                      daemon=True)
        else:
            process = FORK.Process(target=_stress_forked, args=(parent, path, side), daemon=True)
        process.start()
        processes.append(process)

    def leaders_now():
        lines = runs_of(path)[-5:]
        alive = {p.pid for p in processes if p.is_alive()}
        return [int(line.split()[0]) for line in lines if int(line.split()[0]) in alive]

    def by_label():
        return {json.loads(r.args)["key"]: r for r in store.records()}

    def done():
        records = by_label()
        return len(records) == STRESS_CALLS + 1 and all(r.status == "SUCCESS" for r in records.values())

    with sqlite_write_locked(side):
        for n in range(5):
            start(n)
        own = _stress_threads(parent, path, side, threads=2)   # the parent keeps using its guard meanwhile
        while not done() and time.monotonic() - started < STRESS_DEADLINE:
            time.sleep(0.3)
            if len(shows) < 2 * len(killed) + 1:
                shows.append(run_cli("show", "--db", spec).returncode)
            leaders = leaders_now()
            if leaders and len(killed) < STRESS_KILLS:
                victim = random.choice(leaders)
                os.kill(victim, signal.SIGKILL)
                killed.add(victim)
                start(len(processes))
        [t.join(STRESS_DEADLINE) for t in own]
        for process in processes:
            process.join(STRESS_DEADLINE)
            if process.is_alive():
                process.kill()
    elapsed = time.monotonic() - started
    assert done(), f"not every call finished within {STRESS_DEADLINE}s"
    runs: dict[str, list[tuple[int, str]]] = {}
    for line in runs_of(path):
        pid, label, key = line.split()
        runs.setdefault(label, []).append((int(pid), key))
    assert sorted(runs) == sorted([f"call-{n}" for n in range(STRESS_CALLS)] + ["warm-up"])
    records = by_label()
    for label, its_runs in runs.items():
        assert all(pid in killed for pid, _ in its_runs[:-1]), f"{label} ran again without a killed leader"
        assert len({key for _, key in its_runs}) == 1, f"{label}: every run has the same current_key()"
        assert records[label].executed >= len(its_runs), f"{label}: a run the record does not count"
    # A record counts a run when it is claimed; a worker killed between its claim and its tool's
    # first line (one of its other threads was the victim) leaves a counted run with no line.
    unlogged = sum(records[label].executed - len(its_runs) for label, its_runs in runs.items())
    assert unlogged <= 3 * len(killed)
    assert set(shows) == {0}
    reruns = sum(len(r) - 1 for r in runs.values())
    ahead = sum(pid == processes[1].pid for its_runs in runs.values() for pid, _ in its_runs)
    print(f"\nstress {kind}: {len(processes)} processes x 3 threads + 2 in the parent, {len(killed)} leaders "
          f"killed, {reruns} re-runs after a kill, {ahead} runs by the worker an hour ahead, {len(shows)} "
          f"`ledger show`, {elapsed:.1f}s", file=sys.stderr)


def test_a_leader_whose_record_was_taken_over_cannot_overwrite_it(g):
    @g.once(name="tool")
    def tool():
        record = g.store.records()[0]
        g.store.swap(record.evolve(owner="other", epoch=record.epoch + 1, status="SUCCESS",
                                   result='"theirs"'), record.epoch, record.owner)
        return "mine"
    assert g(tool) == "mine"
    assert g.store.records()[0].result == '"theirs"' and g.stats()["fenced"] == 1


# A store that stops answering (a file write-locked by another process, a row
# locked by another session's open transaction, a server that no longer answers)
# must hold up nothing but its own calls.

@contextlib.contextmanager
def sqlite_write_locked(path):
    """Another process holds the write lock of the SQLite file at `path` until the block ends."""
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait(10)


@contextlib.contextmanager
def stuck(kind, tmp_path):
    """(a store that is about to stop answering, a healthy store, the id of a record that
    the stuck store cannot write, a context manager that makes it stop answering)."""
    if kind == "sqlite-file-write-locked":
        bad = SQLiteStore(tmp_path / "stuck.db")
        yield bad, SQLiteStore(tmp_path / "healthy.db"), None, lambda: sqlite_write_locked(bad.path)
    elif kind == "postgres-row-locked":   # an unrelated row of the very store the healthy calls use
        pg = postgres_store()
        bad_id = "locked-row"
        pg.insert(scratch_record(bad_id))
        yield pg, pg, bad_id, lambda: writes_stalled(pg, bad_id)
    else:
        need_redis()
        parts = urllib.parse.urlsplit(REDIS_URL)
        proxy = TcpProxy((parts.hostname, parts.port or 6379))
        try:
            yield (redis_store(url=with_address(REDIS_URL, proxy.port)), SQLiteStore(tmp_path / "healthy.db"),
                   None, proxy.frozen)
        finally:
            proxy.cut()


STUCK = ["sqlite-file-write-locked", "postgres-row-locked", "redis-not-answering"]

_EXITING = """
import sys, ledger
guard = ledger.Guard(sys.argv[1], quiet=True, secret="s")
guard.store
guard._core.count(sys.argv[2], 1, 0)   # a counter buffered for the stuck store
print("ready", flush=True)
sys.stdin.readline()
"""


class StubRun:
    """What a renewer needs of a running call: when to renew it, and renew()."""

    def __init__(self, renewed: threading.Event):
        self.renew_at, self.renewed = time.monotonic(), renewed

    def renew(self):
        self.renewed.set()
        self.renew_at = time.monotonic() + 60


def test_a_renewer_whose_last_run_ends_while_it_looks_renews_the_next_run():
    class EndingAsCopied(dict):   # every run discarded by its own thread the moment the renewer copies them
        def values(self):
            self.clear()
            return []

    renewer = ledger._Renewer("test-renewer")
    renewer.runs = EndingAsCopied()
    renewer.add(StubRun(threading.Event()))
    first = renewer.thread
    first.join(5)
    assert not first.is_alive() and renewer.thread is None, "the renewer ends cleanly when nothing is left"
    renewer.runs = {}
    renewed = threading.Event()
    renewer.add(StubRun(renewed))
    assert renewed.wait(5), "a later run is renewed by a renewer started again"


@pytest.mark.slow
@pytest.mark.parametrize("kind", STUCK)
def test_a_stuck_store_holds_up_no_lease_fork_stats_or_exit_elsewhere(kind, tmp_path):
    with stuck(kind, tmp_path) as (bad, healthy, bad_id, stop_answering):
        bad_guard = Guard(bad, quiet=True, secret="s")
        bad_guard.policy(log_run, lease=0.3)
        bad_runs, path = str(tmp_path / "bad-runs"), str(tmp_path / "runs")
        bad_guard(log_run, bad_runs, "counted")
        bad_guard(log_run, bad_runs, "counted")   # a counter now waits to be flushed to the stuck store
        bad_id = bad_id or bad.records()[0].id
        bad_guard._core.count(bad_id, 1, 0)
        exiting = subprocess.Popen([sys.executable, "-c", _EXITING, bad.url if kind != "sqlite-file-write-locked"
                                    else bad.path, bad_id], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
        assert exiting.stdout.readline() == "ready\n"
        # A call running on the store that is about to get stuck, whose renewals will hang.
        stuck_call = threading.Thread(target=bad_guard, args=(log_run, bad_runs, "stuck", 2.5), daemon=True)
        if kind != "postgres-row-locked":   # (there it would be a call on the locked row itself)
            stuck_call.start()
            wait_for(lambda: len(runs_of(bad_runs)) == 2, what="the call on the stuck store to start")
        with stop_answering():
            leader, contender = Guard(healthy, quiet=True, secret="s"), Guard(healthy, quiet=True, secret="s")
            for guard in (leader, contender):
                guard.policy(log_run, lease=0.3)
            long_call = threading.Thread(target=leader, args=(log_run, path, "long", 2.0), kwargs={"key": "job"})
            long_call.start()
            wait_for(lambda: runs_of(path), what="the long call to start")
            seen, timings = set(), {}
            while long_call.is_alive():   # 2 s: ~7 renewals of a 0.3 s lease
                seen.add(contender(log_run, path, "long", 0, key="job"))
                time.sleep(0.03)
            started = time.monotonic()
            assert leader.stats()["executed"] >= 1
            timings["stats"] = time.monotonic() - started
            started = time.monotonic()
            child = forked(os._exit, 0)
            child.start()
            child.join(30)
            timings["fork"] = time.monotonic() - started
            started = time.monotonic()
            exiting.stdin.close()
            exiting.wait(30)
            timings["exit"] = time.monotonic() - started
        if stuck_call.is_alive():
            stuck_call.join(30)
    assert len(runs_of(path)) == 1 and seen == {BLOCKED}, "the healthy call kept its lease and ran once"
    assert timings["stats"] < 1.0 and timings["fork"] < 2.0, timings
    assert timings["exit"] < ledger.EXIT_FLUSH_WAIT + 2.0, timings


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


class UnprintableError(Exception):
    def __str__(self):
        raise IndexError("no text")


@pytest.mark.parametrize("error", [ValueError("nul \x00 here"), ValueError("lone \ud800 surrogate"),
                                   UnprintableError()], ids=["nul", "surrogate", "str-raises"])
def test_a_tool_error_of_any_text_is_recorded_failed_and_reaches_the_caller_unchanged(store, error):
    guard = Guard(store, quiet=True, secret="s")
    runs = []

    @guard.once(name="failing_tool")
    def tool():
        runs.append(1)
        raise error
    with pytest.raises(type(error)) as raised:
        tool()
    assert raised.value is error
    record = store.records()[0]
    assert record.status == "FAILED" and record.error.startswith(type(error).__name__)
    assert "\x00" not in record.error and record.error.encode("utf-8")   # storable everywhere
    with pytest.raises(type(error)):
        tool()
    assert len(runs) == 2


UNSTORABLE_RESULTS = {
    # text the serializer makes, which UTF-8 stores cannot encode and PostgreSQL cannot hold
    "serializer": dict(serializer=(lambda v: v + "\ud800\x00", lambda t: t)),
    "json": dict(),   # the default encoding of a str with a lone surrogate
}


def _return_unstorable(store, path, kind, queue):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(log_run, replay=True, **UNSTORABLE_RESULTS[kind])
    queue.put(guard(log_run, path, "value \ud800"))


@pytest.mark.parametrize("kind", list(UNSTORABLE_RESULTS))
def test_a_result_the_store_refuses_is_recorded_done_and_never_runs_again(shared_store, tmp_path, kind):
    path, queue = str(tmp_path / "runs"), FORK.Queue()
    child = forked(_return_unstorable, shared_store, path, kind, queue)
    child.start()
    first = queue.get(timeout=30)
    assert first.startswith("value \ud800-")   # the caller gets the value
    child.join(30)
    assert child.exitcode == 0
    guard = Guard(shared_store, quiet=True, secret="s")
    guard.policy(log_run, replay=True, **UNSTORABLE_RESULTS[kind])
    again = guard(log_run, path, "value \ud800")                # after that process is gone
    record = shared_store.records()[0]
    assert record.status == "SUCCESS" and len(runs_of(path)) == 1
    refused = kind == "serializer"   # JSON escapes a lone surrogate, so that result is stored and replayed
    assert again == (BLOCKED if refused else first)
    assert (record.result is None, "refused" in (record.unstored or "")) == (refused, refused)


def test_a_completion_the_store_refuses_stops_renewing_the_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "COMPLETION_RETRIES", (0.01,))
    store = FlakyStore(tmp_path / "l.db")
    guard = Guard(store, quiet=True, secret="s")

    @guard.once(name="tool", lease=0.3)
    def tool(n):
        store.fail_swaps = 100   # from here on, every write fails
        return n
    with pytest.raises(ledger.CompletionError) as err:
        tool(1)
    assert err.value.value == 1
    store.fail_swaps = 0
    held = store.records()[0].lease_until
    time.sleep(0.5)   # the heartbeat renews a live run every lease/3
    record = store.records()[0]
    assert record.status == "RUNNING" and record.lease_until == held and record.stale(store.now())


def test_a_store_that_cannot_be_read_fails_before_the_tool_runs(tmp_path):
    guard = Guard(FlakyStore(tmp_path / "l.db", fail_gets=1), quiet=True, secret="s")
    with pytest.raises(ledger.StoreError, match="locked"):
        guard(charge, 1)
    assert CHARGES == []


def test_fail_open_runs_a_tool_unguarded_with_a_warning_when_the_store_cannot_be_opened(tmp_path, caplog):
    guard = Guard(str(tmp_path / "missing" / "l.db"))
    keys = []

    @guard.once(name="lookup", fail_open=True)
    def lookup(q):
        keys.append(current_key())
        return {"q": q}

    @guard.once(name="alookup", fail_open=True)
    async def alookup(q):
        keys.append(current_key())
        return {"q": q}

    with caplog.at_level("WARNING", logger="ledger"):
        outcomes = [guard.execute(lookup, "acme"), guard.execute(lookup, "acme"),
                    asyncio.run(guard.execute(alookup, "acme"))]
    assert [(o.value, o.source, o.ran) for o in outcomes] == [({"q": "acme"}, "unguarded", True)] * 3
    assert len(keys) == 3 and keys[0] == keys[1] != keys[2]   # each call's stable fingerprint
    assert sum("unreachable" in r.getMessage() and "unguarded" in r.getMessage() for r in caplog.records) == 3
    assert not (tmp_path / "missing").exists()


def test_fail_closed_is_the_default_when_the_store_cannot_be_opened(tmp_path):
    guard = Guard(str(tmp_path / "missing" / "l.db"), quiet=True)
    guard.policy("lookup", replay=True)
    with pytest.raises(ledger.StoreError, match="does not exist"):
        guard(charge, 1)
    with pytest.raises(ledger.StoreError):
        asyncio.run(guard.wrap_tools({"lookup": _async_lookup})["lookup"]("acme"))
    assert CHARGES == [] and LOOKUPS == []


LOOKUPS: list = []


async def _async_lookup(q):
    LOOKUPS.append(q)
    return q


def test_fail_open_applies_to_a_store_error_on_a_claim_too(tmp_path):
    guard = Guard(FlakyStore(tmp_path / "l.db", fail_gets=1), quiet=True, secret="s")
    guard.policy(charge, fail_open=True)
    assert guard.execute(charge, 1).source == "unguarded"
    assert guard.execute(charge, 1).source == "executed"   # the store answers again: guarded again
    assert guard(charge, 1) is BLOCKED and len(CHARGES) == 2


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_fail_open_must_be_a_bool(g, bad):
    with pytest.raises(ledger.ConfigError, match="fail_open"):
        g.policy(charge, fail_open=bad)


def test_current_key_is_stable_across_a_failure_and_new_for_each_intended_run(g):
    keys = []

    @g.once(name="tool")
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


def test_a_deliberate_retry_gets_a_fresh_key_and_a_crash_recovery_keeps_the_old_one(shared_store, tmp_path):
    path = str(tmp_path / "runs")
    guard = stale_after_a_killed_leader(shared_store, path)
    assert guard.retry(log_run, path, "long", 0, key="long-job") is True     # crash recovery
    guard(log_run, path, "long", 0, key="long-job")
    assert guard.retry(log_run, path, "long", 0, key="long-job") is True     # deliberate re-run
    guard(log_run, path, "long", 0, key="long-job")
    keys = [line.split()[1] for line in runs_of(path)]
    assert len(keys) == 3 and keys[0] == keys[1] != keys[2]


def test_retry_refuses_a_call_whose_lease_is_live_unless_forced(store):
    guard = Guard(store, quiet=True, secret="s")
    guard.policy(log_run, lease=30)
    with a_call_running_in_a_thread(guard) as tool:
        with pytest.raises(ledger.LeaseLiveError, match=r"holds its lease for another \d+\.\ds"):
            guard.retry(tool)
        assert store.records()[0].status == "RUNNING"
        assert guard.retry(tool, force=True) is True
        assert store.records()[0].status == "FAILED"


def plain_decorator(fn):
    """A decorator that hides that the function it wraps is async (no functools.wraps, no async def)."""
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


SENT: list = []


@plain_decorator
async def send_async(n):
    SENT.append(n)
    return n


ASYNC_BEHIND_SYNC = {
    "guard": lambda g: g(send_async, 1),
    "execute": lambda g: g.execute(send_async, 1),
    "once": lambda g: g.once(send_async)(1),
    "wrap_tools": lambda g: g.wrap_tools([send_async])[0](1),
}


@pytest.mark.parametrize("entry", list(ASYNC_BEHIND_SYNC))
def test_an_async_tool_behind_a_sync_decorator_is_refused_before_its_body_runs(g, entry, recwarn):
    SENT.clear()
    for _ in range(2):
        with pytest.raises(ledger.DeferredToolError, match="async def"):
            ASYNC_BEHIND_SYNC[entry](g)
    assert SENT == [] and [r["status"] for r in g.history()] == ["FAILED"]
    assert not [w for w in recwarn if "never awaited" in str(w.message)]   # the coroutine was closed


def test_a_sync_tool_returning_a_task_is_refused_and_the_task_cancelled(g):
    async def body():
        SENT.append("ran")

    async def main():
        with pytest.raises(ledger.DeferredToolError):
            g(lambda: asyncio.ensure_future(body()))
        await asyncio.sleep(0.01)
    SENT.clear()
    asyncio.run(main())
    assert SENT == []


@pytest.mark.parametrize("kind", ["generator", "async generator"])
def test_a_tool_returning_a_generator_is_refused_before_its_body_runs(g, kind):
    def items():
        SENT.append("ran")
        yield 1

    async def async_items():
        SENT.append("ran")
        yield 1
    SENT.clear()
    tool = {"generator": items, "async generator": async_items}[kind]
    for _ in range(2):
        with pytest.raises(ledger.DeferredToolError, match="return list"):
            g.once(tool)()
    assert SENT == [] and [r["status"] for r in g.history()] == ["FAILED"]


def test_a_replay_tool_that_calls_itself_raises_instead_of_waiting_forever(g):
    @g.once(name="lookup", replay=True)
    def lookup(q):
        return lookup(q)
    started = time.monotonic()
    with pytest.raises(ledger.ReentrantCallError, match="from inside its own run"):
        lookup("x")
    assert time.monotonic() - started < 5 and g.history()[0]["status"] == "FAILED"


def test_a_replay_tool_reached_again_through_another_tool_raises(g):
    @g.once(name="outer", replay=True)
    def outer(q):
        return inner(q)

    @g.once(name="inner")
    def inner(q):
        return outer(q)
    with pytest.raises(ledger.ReentrantCallError):
        outer("x")


def test_an_async_replay_tool_that_awaits_itself_raises(g):
    @g.once(name="lookup", replay=True)
    async def lookup(q):
        return await lookup(q)
    with pytest.raises(ledger.ReentrantCallError):
        asyncio.run(asyncio.wait_for(lookup("x"), 10))


def test_a_replay_tool_may_call_itself_with_other_arguments(g):
    @g.once(name="countdown", replay=True)
    def countdown(n):
        return 0 if n == 0 else 1 + countdown(n - 1)
    assert countdown(3) == 3 and countdown(3) == 3


def test_current_key_outside_a_guarded_call_raises_or_returns_the_default():
    with pytest.raises(LedgerError, match="inside a guarded"):
        current_key()
    assert current_key(default=None) is None


def test_async_tools_are_guarded_and_duplicates_blocked(g):
    runs = []

    @g.once(name="fetch")
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
    tool = counter(g, result="r", sleep=0.3)
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
    return ledger._Named(view, ledger._unwrap(tool)[1])


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


# Telemetry: spans and metrics through the OpenTelemetry SDK's in-memory exporters.

@pytest.fixture
def otel(monkeypatch):
    """Telemetry on, into in-memory exporters of providers of the test's own (the global
    providers can be set only once per process; a subprocess test below covers them)."""
    need("opentelemetry-sdk", has_module("opentelemetry.sdk"), "pip install '.[telemetry]'")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = ledger._Telemetry()
    telemetry._start(tracer_provider, MeterProvider(metric_readers=[reader]))
    monkeypatch.setattr(ledger, "_TELEMETRY", telemetry)

    class Seen:
        tracer = tracer_provider.get_tracer("test")

        @staticmethod
        def spans(prefix="ledger "):
            return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]

        @staticmethod
        def counts():
            """{(metric, source or None): value}, summed over tools."""
            found = {}
            for rm in reader.get_metrics_data().resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        for point in metric.data.data_points:
                            key = (metric.name, point.attributes.get("ledger.source"))
                            found[key] = found.get(key, 0) + point.value
            return found
    return Seen


def test_each_guarded_call_is_a_span_saying_where_its_value_came_from(g, otel):
    g.policy(charge, replay=True)
    g(charge, 1)
    g(charge, 1)
    g.workflow("other")(charge, 1)
    spans = otel.spans()
    assert [s.name for s in spans] == [f"ledger {ledger.tool_name(charge)}"] * 3
    first, again, other = (dict(s.attributes) for s in spans)
    records = {(r["workflow"], r["id"]) for r in g.history()}
    assert first == {"ledger.tool": ledger.tool_name(charge), "ledger.workflow": "default",
                     "ledger.record_id": first["ledger.record_id"], "ledger.source": "executed",
                     "ledger.epoch": 1, "ledger.fenced": False}
    assert again == {**first, "ledger.source": "replayed"}
    assert (other["ledger.workflow"], other["ledger.source"]) == ("other", "executed")
    assert {("default", first["ledger.record_id"]), ("other", other["ledger.record_id"])} == records


def test_a_tools_own_spans_are_children_of_its_call_span_sync_and_async(g, otel):
    def lookup(q):
        with otel.tracer.start_as_current_span("http GET"):
            return q

    async def alookup(q):
        with otel.tracer.start_as_current_span("http GET"):
            await asyncio.sleep(0)
            return q

    g(lookup, "a")
    asyncio.run(g(alookup, "a"))
    calls, inner = otel.spans(), otel.spans("http")
    assert len(calls) == len(inner) == 2
    assert [s.parent.span_id for s in inner] == [s.context.span_id for s in calls]


def test_the_counters_are_metrics_by_tool_and_source(g, otel):
    def flaky(n):
        raise RuntimeError(n)

    g(charge, 1)
    g(charge, 1)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            g(flaky, 1)
    assert otel.counts() == {
        ("ledger.attempts", "executed"): 1, ("ledger.attempts", "blocked"): 1, ("ledger.attempts", "failed"): 2,
        ("ledger.executed", None): 3, ("ledger.blocked", None): 1, ("ledger.failed", None): 2}
    failed = otel.spans()[-1]
    assert failed.status.status_code.name == "ERROR" and failed.events[0].name == "exception"


def test_a_fenced_run_is_marked_on_its_span_and_counted(g, otel):
    @g.once(name="tool")
    def tool():
        record = g.store.records()[0]
        g.store.swap(record.evolve(owner="other", epoch=record.epoch + 1), record.epoch, record.owner)
        return "mine"

    outcome = g.execute(tool)
    assert (outcome.value, outcome.source, outcome.fenced) == ("mine", "executed", True)
    assert otel.spans()[0].attributes["ledger.fenced"] is True
    assert otel.counts()[("ledger.fenced", None)] == 1


def test_a_refusal_by_the_ledger_is_an_error_span_of_a_call_that_did_not_run(g, otel):
    g.policy(charge, validate=True)
    g(charge, 1, key="order-1")
    with pytest.raises(ledger.KeyReuseError):
        g(charge, 2, key="order-1")
    refused = otel.spans()[-1]
    assert refused.attributes["ledger.source"] == "error" and refused.status.status_code.name == "ERROR"
    assert otel.counts()[("ledger.executed", None)] == 1 and len(CHARGES) == 1


def test_an_unguarded_run_under_fail_open_is_a_span_too(tmp_path, otel):
    guard = Guard(str(tmp_path / "missing" / "l.db"), quiet=True)
    guard.policy(charge, fail_open=True)
    guard(charge, 1)
    assert otel.spans()[0].attributes["ledger.source"] == "unguarded"
    assert otel.counts()[("ledger.executed", None)] == 1 and CHARGES == [(1, 10.0, "usd")]


TELEMETRY_SCRIPT = """
import json, sys, time
import ledger
{setup}
guard = ledger.Guard(":memory:", secret="s")
def tool(n):
    return n
for n in range(3):
    guard(tool, n)
{later}
print(json.dumps({{"on": ledger._TELEMETRY.on,
                   "otel_modules": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
                   "spans": [s.attributes["ledger.source"] for s in exporter.get_finished_spans()]
                            if "exporter" in globals() else None}}))
"""

SDK_SETUP = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
"""


def telemetry_run(tmp_path, setup="", later="") -> dict:
    code = TELEMETRY_SCRIPT.format(setup=textwrap.dedent(setup), later=textwrap.dedent(later))
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_telemetry_never_imports_opentelemetry(tmp_path):
    seen = telemetry_run(tmp_path)
    assert seen == {"on": False, "otel_modules": [], "spans": None}


def test_telemetry_stays_off_while_opentelemetry_is_imported_but_no_provider_is_set(tmp_path):
    need("opentelemetry-sdk", has_module("opentelemetry.sdk"), "pip install '.[telemetry]'")
    seen = telemetry_run(tmp_path, SDK_SETUP)   # as a library that imports opentelemetry (mcp does)
    assert seen["on"] is False and seen["spans"] == []


def test_telemetry_traces_through_the_global_provider_set_before_the_first_call(tmp_path):
    need("opentelemetry-sdk", has_module("opentelemetry.sdk"), "pip install '.[telemetry]'")
    seen = telemetry_run(tmp_path, SDK_SETUP + "trace.set_tracer_provider(provider)\n",
                         "for n in range(2):\n    guard(tool, n)\n")
    assert seen["on"] is True and seen["spans"] == ["executed"] * 3 + ["blocked"] * 2


@pytest.mark.slow
def test_telemetry_turns_on_within_a_second_of_a_provider_set_after_the_first_call(tmp_path):
    need("opentelemetry-sdk", has_module("opentelemetry.sdk"), "pip install '.[telemetry]'")
    later = """
    trace.set_tracer_provider(provider)
    deadline = time.time() + 10
    while not exporter.get_finished_spans() and time.time() < deadline:
        guard(tool, 0)
        time.sleep(0.05)
    """
    seen = telemetry_run(tmp_path, SDK_SETUP, later)
    assert seen["on"] is True and seen["spans"] == ["blocked"]


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
    failing = counter(g, fail=True)
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


def test_log_sends_no_control_characters_of_tool_names_or_errors(g, capsys):
    def evil(x):
        raise RuntimeError("\x1b]0;owned\x07\x1b[2J\x9b31m")
    with pytest.raises(RuntimeError):
        g.wrap_tools({"evil\x1b[31m": evil})["evil\x1b[31m"](1)
    text = g.log()
    _, err = capsys.readouterr()
    assert not re.search("[\x00-\x1f\x7f-\x9f]", text) and "owned" in text
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", err)


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
        g(counter(g, fail=True))
    assert [e[0] for e in events] == ["success", "block", "fail"]


def test_check_runs_the_self_test_on_the_guards_own_store_and_leaves_its_records_alone(store):
    guard = Guard(store, quiet=True, secret="s")
    guard(charge, 1)
    guard._core.flush()
    before = [r.as_dict() for r in store.records()]
    assert guard.check() is True
    guard.close()
    assert [r.as_dict() for r in store.records()] == before and CHARGES == [(1, 10.0, "usd")]


def test_check_fails_on_a_store_whose_claims_are_not_kept(tmp_path):
    class Forgetful(SQLiteStore):   # passes check_store, but loses the engine's finished calls
        def swap(self, record, epoch, owner):
            won = super().swap(record, epoch, owner)
            if record.status != "RUNNING" and record.tool == "ledger.check" and "-" not in record.id:
                self.delete(record.id)
            return won
    guard = Guard(Forgetful(tmp_path / "l.db"), quiet=True, secret="s")
    with pytest.raises(LedgerError, match="self-check failed"):
        guard.check()


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

    insert_or_get = ledger.Store.insert_or_get   # the contract's default: made of the two above


def test_a_store_that_refuses_every_claim_is_reported_not_spun_on():
    with pytest.raises(ledger.StoreError, match="check_store"):
        Guard(RefusingStore(), quiet=True)(charge, 1)
    assert CHARGES == []


def test_one_scope_object_can_be_entered_by_many_tasks_at_once(g):
    scope = g.workflow("shared")
    g.workflow("main")  # the statement after it: what this thread uses outside the blocks

    async def request(n):
        with scope:
            await asyncio.sleep(0.01 * (3 - n))
            return g._workflow()

    async def main():
        return await asyncio.gather(*[request(n) for n in range(3)])
    assert asyncio.run(main()) == ["shared"] * 3 and g._workflow() == "main"


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
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    record = SQLiteStore(tmp_path / "l.db").records()[0]
    assert (record.attempts, record.executed, record.blocked) == (5, 1, 4)
    assert done.stdout == "once\n"   # the tool itself ran once


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


# ledger-once's README, as its users write it: each documented call works the same
# here, or fails with a message that names what replaced it.

def test_ledger_once_users_protect_a_toolset_and_set_what_a_blocked_call_returns(g):
    tool_map = g.wrap_tools({"charge_card": charge}, blocked_return={"status": "blocked"})
    assert tool_map["charge_card"](**{"order_id": 1, "amount": 9.0}) == {"charged": 9.0, "order": 1}
    assert json.dumps(tool_map["charge_card"](order_id=1, amount=9.0)) == '{"status": "blocked"}'
    assert [fn.__name__ for fn in g.wrap_tools([charge])] == ["charge"] and len(CHARGES) == 1


@pytest.mark.parametrize("not_tools", ["not a dict", 42, None])
def test_wrap_tools_given_no_toolset_raises_a_type_error_as_ledger_once_did(g, not_tools):
    with pytest.raises(TypeError, match="dict or a list"):
        g.wrap_tools(not_tools)
    with pytest.raises(ledger.ConfigError):
        g.wrap_tools(not_tools)


def test_wrap_tools_given_something_not_callable_in_a_toolset_raises_a_type_error(g):
    with pytest.raises(TypeError, match="not a function"):
        g.wrap_tools({"charge_card": "charge"})


def test_policy_and_callbacks_return_the_guard_so_ledger_once_chains_work(g):
    events = []
    same = (g.policy("counter", unlimited=True).policy(charge, replay=True)
            .on_success(lambda r: events.append(("ran", r.tool))).on_block(lambda r: events.append(("dup", r.tool)))
            .on_fail(lambda r: None).quiet())
    assert same is g
    assert g(charge, 1) == g(charge, 1) == {"charged": 10.0, "order": 1}
    assert events == [("ran", ledger.tool_name(charge)), ("dup", ledger.tool_name(charge))]


def test_an_unknown_policy_option_is_refused_before_any_call_naming_the_known_ones(g):
    for set_it in (lambda: g.policy(charge, replay=True, tll=60), lambda: g.once(charge, retries=3)):
        with pytest.raises(ledger.ConfigError, match=r"unknown policy option (tll|retries): a policy takes "
                                                     r"unlimited, replay, max, ttl, lease"):
            set_it()
    assert g.policy(charge) is g and CHARGES == []


def test_policy_options_are_declared_once_and_llms_txt_lists_them_with_their_defaults():
    listed = re.search(r"`guard\.policy\(tool_or_name, \*, (.*?)\) -> Guard`",
                       (HERE / "llms.txt").read_text(), re.S).group(1)
    options = dict(part.split("=", 1) for part in re.split(r",\s+", listed))
    assert list(options) == list(ledger.POLICY_OPTIONS)
    for field in dataclasses.fields(ledger.Policy):
        shown = options[field.name]
        assert shown == ("UNCERTAIN_ERRORS" if field.default is ledger.UNCERTAIN_ERRORS
                         else json.dumps(field.default) if isinstance(field.default, str) else repr(field.default))
    assert inspect.signature(Guard.policy).parameters.keys() == {"self", "fn_or_name", "options"}

def test_policy_ttl_zero_means_no_expiry_as_in_ledger_once(g):
    g.policy(charge, ttl=0)
    g(charge, 1)
    assert g(charge, 1) is BLOCKED and g.history()[0]["expires"] is None


def test_policy_max_none_means_the_default_of_one_run_as_in_ledger_once(g):
    g.policy(charge, max=None)
    g(charge, 1)
    assert g(charge, 1) is BLOCKED and len(CHARGES) == 1


def test_the_documented_policies_of_ledger_once_behave_as_documented(g):
    runs = []

    def search_web(q):
        runs.append("search")
        return "hits"

    def send_sms(to):
        runs.append("sms")
        return "ok"
    search_web, send_sms = g.once(search_web, name="search_web"), g.once(send_sms, name="send_sms")  # closures
    g.policy("search_web", unlimited=True).policy(charge, replay=True).policy("send_sms", max=2)
    assert [search_web(q="x") for _ in range(3)] == ["hits"] * 3
    assert g(charge, 1) == g(charge, 1) and len(CHARGES) == 1
    assert [send_sms(to="+1") for _ in range(3)] == ["ok", "ok", BLOCKED]
    assert runs == ["search"] * 3 + ["sms"] * 2


def test_ledger_once_decorators_protect_every_call_site(g):
    @g.once
    def stripe_charge(card_id, amount):
        CHARGES.append(card_id)
        return card_id

    @g.once(replay=True)
    def create_invoice(id, amount):
        return {"invoice": id}
    assert stripe_charge("tok", 49.0) == "tok" and stripe_charge("tok", amount=49.0) is BLOCKED
    assert create_invoice(1, 5) == create_invoice(1, 5) == {"invoice": 1} and CHARGES == ["tok"]


def test_ledger_once_escape_hatches_retry_and_force_run_the_call_again(g):
    g(charge, order_id=1)
    g.retry(charge, order_id=1)
    g(charge, order_id=1)
    g.force(charge, order_id=1)
    assert len(CHARGES) == 3


def test_ledger_once_observability_stats_history_and_log(g, capsys):
    g(charge, 1)
    g(charge, 1)
    g.workflow("order-42")
    g(charge, 2)
    stats = g.stats()
    assert {k: stats[k] for k in ("actions", "attempts", "executed", "blocked", "failed")} == {
        "actions": 2, "attempts": 3, "executed": 2, "blocked": 1, "failed": 0}
    assert len(g.history(tool=charge)) == 2 and [r["workflow"] for r in g.history(wf="order-42")] == ["order-42"]
    g.log()
    assert "attempts 3" in capsys.readouterr().err.replace("  ", " ")


def test_history_rows_answer_to_ledger_once_names_for_workflow_and_last_touch(g):
    g.workflow("order-42")
    g(charge, 1)
    row = g.history(wf="order-42")[0]
    assert (row["wf"], row["touched"]) == ("order-42", row["updated"]) and "wf" not in row
    with pytest.raises(KeyError):
        row["nonsense"]


async def post_webhook(url: str, payload: dict) -> str:
    CHARGES.append(url)
    return "posted"


def test_ledger_once_async_calls_need_no_extra_syntax(g):
    async def main():
        return [await g(post_webhook, url="https://h", payload={"a": 1}) for _ in range(2)]
    assert asyncio.run(main()) == ["posted", BLOCKED] and CHARGES == ["https://h"]


def test_ledger_once_self_check_passes():
    assert ledger.guard.check()


def test_ledger_once_testing_example_with_an_isolated_memory_store():
    from ledger import _Mem
    guard = Guard(store=_Mem())
    guard(charge, order_id=1, amount=49.00)
    guard(charge, order_id=1, amount=49.00)
    assert guard.stats()["executed"] == 1 and guard.stats()["blocked"] == 1
    assert CHARGES == [(1, 49.0, "usd")]


def test_a_store_written_to_ledger_once_protocol_is_refused_naming_the_methods_to_write():
    class SixMethods(ledger.Store):
        def get(self, id): ...
        def claim(self, r): ...
        def put(self, r): ...
        def delete(self, id): ...
        def all(self, wf=None): ...
        def clear(self, wf=None): ...

    class NotSubclassed:
        get = claim = put = delete = all = clear = lambda self, *a: None
    for store in (SixMethods(), NotSubclassed()):
        with pytest.raises(ledger.ConfigError, match="insert, swap"):
            Guard(store=store)(charge, 1)
    assert CHARGES == []


def test_persist_moves_the_records_to_another_file_before_calls_run(tmp_path):
    guard = Guard(str(tmp_path / "first.db"), quiet=True)
    guard(charge, 1)
    assert guard.persist(tmp_path / "second.db") is guard
    guard(charge, 1)
    assert len(CHARGES) == 2 and len(Guard(str(tmp_path / "second.db")).history()) == 1


def test_persist_is_refused_while_a_call_of_the_guard_is_running(g, tmp_path):
    def tool():
        with pytest.raises(ledger.ConfigError, match="running"):
            g.persist(tmp_path / "other.db")
        return "done"
    assert g.once(tool, name="tool")() == "done" and not (tmp_path / "other.db").exists()


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_silences_warnings_as_ledger_once_quiet_did(tmp_path, caplog, quiet):
    guard = Guard(str(tmp_path / "l.db"), quiet=False)
    if quiet:
        assert guard.quiet() is guard
    for n in range(3):  # retries the ledger cannot recognise: a warning, unless quiet
        guard(send_note, to="a", sent_at=f"2026-01-0{n + 1}T00:00:00.000001")
    warned = [r for r in caplog.records if "send_note ran" in r.getMessage()]   # not a store another test left
    assert len(warned) == (0 if quiet else 1) and len(guard.history()) == 3   # quiet changes no call


def test_ledger_once_environment_variables_choose_the_workflow_and_silence(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LEDGER_WORKFLOW", "run-42")
    monkeypatch.setenv("LEDGER_QUIET", "1")
    guard = Guard(str(tmp_path / "l.db"))
    for n in range(3):
        guard(send_note, to="a", sent_at=f"2026-01-0{n + 1}T00:00:00.000001")
    assert guard.history()[0]["workflow"] == "run-42"
    assert [r for r in caplog.records if "send_note" in r.getMessage()] == []   # not a store another test left


def send_note(to: str, sent_at: str) -> str:
    return "sent"


# Workflow and caller as statements (ledger-once's style): they set a contextvar, so
# they last in this thread or task (and the tasks it starts) until the next one.

SCOPE_OPS = st.recursive(
    st.tuples(st.sampled_from(["workflow", "as_caller"]), st.sampled_from(["a", "b", "c"])),
    lambda inner: st.tuples(st.just("with"), st.sampled_from(["workflow", "as_caller", "both"]),
                            st.sampled_from(["x", "y"]), st.lists(inner, max_size=3)),
    max_leaves=8)


def test_workflow_as_a_statement_scopes_the_calls_that_follow(g):
    g.workflow("order-42")
    g(charge, 1)
    g.workflow("order-43")
    g(charge, 1)
    assert len(CHARGES) == 2 and [r["workflow"] for r in g.history()] == ["order-42", "order-43"]


def test_as_caller_as_a_statement_tags_the_calls_that_follow(g):
    g.as_caller("agent-A")
    g(charge, 1)
    assert g.history()[0]["caller"] == "agent-A"


def test_a_statement_workflow_is_private_to_its_thread(g):
    seen = {}
    set_here, other_looked = threading.Event(), threading.Event()

    def setter():
        g.workflow("mine")
        set_here.set()
        other_looked.wait(5)
        seen["setter"] = g._workflow()

    def other():
        set_here.wait(5)
        seen["other"] = g._workflow()
        other_looked.set()
    threads = [threading.Thread(target=setter), threading.Thread(target=other)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert seen == {"setter": "mine", "other": "default"} and g._workflow() == "default"


def test_a_statement_workflow_is_private_to_its_asyncio_task_and_inherited_by_tasks_it_starts(g):
    async def child():
        return g._workflow(), g._caller()

    async def request(name):
        g.workflow(name)
        g.as_caller(f"agent-{name}")
        await asyncio.sleep(0.01)
        return g._workflow(), g._caller(), await asyncio.create_task(child())

    async def main():
        return await asyncio.gather(request("a"), request("b"))
    assert asyncio.run(main()) == [("a", "agent-a", ("a", "agent-a")), ("b", "agent-b", ("b", "agent-b"))]
    assert (g._workflow(), g._caller()) == ("default", None)


def test_a_returned_scoped_guard_keeps_its_own_workflow_whatever_the_statements_after_it(g):
    order = g.workflow("order-1")
    g.workflow("order-2")
    order(charge, 1)
    g(charge, 1)
    assert [r["workflow"] for r in g.history()] == ["order-1", "order-2"]


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(ops=st.lists(SCOPE_OPS, max_size=6))
def test_a_with_block_restores_the_scope_it_found_whatever_statements_ran_inside_it(ops):
    g = Guard(MemoryStore(), quiet=True)

    def run(ops):
        for op in ops:
            if op[0] == "with":
                _, kind, name, body = op
                before = (g._workflow(), g._caller())
                scope = g.workflow(name).as_caller(name) if kind == "both" else getattr(g, kind)(name)
                with scope:
                    assert kind == "as_caller" or g._workflow() == name
                    assert kind == "workflow" or g._caller() == name
                    run(body)
                assert (g._workflow(), g._caller()) == before
            else:
                kind, name = op
                getattr(g, kind)(name)
                assert (g._caller() if kind == "as_caller" else g._workflow()) == name
    contextvars.copy_context().run(run, ops)


# ---------------------------------------------------------------------------
# Framework adapters: wrap_tools with each framework's own tool objects, against
# the real packages, through each framework's own agent loop.
# ---------------------------------------------------------------------------

def framework(module: str):
    """Import a framework package for a test, or skip (fail under CI) where it is absent."""
    import importlib
    import importlib.util
    try:
        present = importlib.util.find_spec(module.partition(".")[0]) is not None
    except ValueError:
        present = False
    need(module, present, "pip install -e '.[integrations]'")
    return importlib.import_module(module)


def run_python(code: str, cwd: pathlib.Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    env.pop("LEDGER_DB", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_wrap_tools_imports_no_framework(tmp_path):
    code = ("import sys, ledger\n"
            "g = ledger.Guard(':memory:')\n"
            "tools = g.wrap_tools({'add': lambda a, b: a + b})\n"
            "assert tools['add'](a=1, b=2) == 3\n"
            "print(sorted(m for m in ('langchain_core', 'langchain', 'langgraph', 'agents', 'mcp', 'fastmcp',\n"
            "                         'pydantic_ai', 'llama_index', 'smolagents', 'autogen_core', 'google.adk',\n"
            "                         'crewai') if m in sys.modules))")
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_wrap_tools_rejects_what_is_not_a_tool_naming_its_type(g):
    with pytest.raises(ledger.ConfigError,
                       match=r"wrap_tools: x: a builtins\.int is not a function or a framework object"):
        g.wrap_tools({"x": 42})
    with pytest.raises(ledger.ConfigError, match="wrap_tools takes"):
        g.wrap_tools(42)


def test_a_callable_object_of_an_installed_package_is_refused_at_wrap_time(g):
    # an itemgetter stands for any library's callable object ledger has no adapter for (an
    # unknown framework's tool): calling it directly would bypass that framework's machinery
    with pytest.raises(ledger.ConfigError, match=r"guard\.once: a operator\.itemgetter is not a function"):
        g.once(operator.itemgetter(0))
    with pytest.raises(ledger.ConfigError, match=r"search: a operator\.itemgetter is not"):
        g.wrap_tools({"search": operator.itemgetter("q")})


def test_a_callable_object_of_the_users_own_class_is_a_tool_under_a_name(g):
    counter = Counter(result="ok")
    guarded = g.wrap_tools({"counter": counter})["counter"]
    assert [guarded(1), guarded(1)] == ["ok", BLOCKED] and len(counter.calls) == 1
    assert [r["tool"] for r in g.history()] == ["counter"]


def test_a_callable_object_of_a_mutable_class_without_a_name_is_refused_at_wrap_time(g):
    # its state can change, so no name could tell two configured instances apart
    counter = Counter(result="ok")
    for wrap in (lambda: g.wrap_tools([counter]), lambda: g.once(counter)):
        with pytest.raises(ledger.ConfigError, match=r"Counter.__call__ is bound to a conftest.Counter .*name="):
            wrap()
    assert counter.calls == [] and g.history() == []


def test_framework_injected_arguments_are_passed_on_but_not_fingerprinted(g):
    runnables = framework("langchain_core.runnables")
    seen = []

    def node(state: dict, config: runnables.RunnableConfig) -> dict:
        seen.append(config["run_id"])
        return {"done": True}

    guarded = g.wrap_tools({"node": node}, blocked_return={})["node"]
    assert guarded({"order": 1}, config={"run_id": object()}) == {"done": True}
    assert guarded({"order": 1}, config={"run_id": object()}) == {}
    assert guarded({"order": 2}, config={"run_id": 3}) == {"done": True}
    assert len(seen) == 2


def test_a_parameter_marked_ignore_reaches_the_tool_but_not_the_identity(g):
    seen = []

    @g.once(name="notify")
    def notify(order_id: int, trace: Annotated[str, ledger.Ignore]) -> str:
        seen.append(trace)
        return "sent"

    assert [notify(1, trace=t) for t in ("a", "b")] == ["sent", BLOCKED]
    assert seen == ["a"]


def test_a_parameter_marked_identity_counts_even_where_a_framework_injects_it(g):
    global lc_runnables
    lc_runnables = framework("langchain_core.runnables")
    seen = []

    @g.once(name="node")
    def node(state: dict, config: Annotated[lc_runnables.RunnableConfig, ledger.Identity(lambda c: c["tags"])]):
        seen.append(config["tags"])
        return {"done": True}

    results = [node({"n": 1}, config={"tags": tags, "run_id": object()}) for tags in (["a"], ["b"], ["a"])]
    assert results == [{"done": True}, {"done": True}, BLOCKED]
    assert seen == [["a"], ["b"]]


def test_an_identity_function_that_fails_is_a_fingerprint_error_before_the_tool_runs(g):
    ran = []

    @g.once(name="refund")
    def refund(customer: Annotated[dict, ledger.Identity(lambda c: c["user_id"])], order_id: int) -> str:
        ran.append(order_id)
        return "refunded"

    with pytest.raises(ledger.FingerprintError, match=r"parameter 'customer' could not be taken.*KeyError"):
        refund({"name": "alice"}, 1)
    assert ran == []


def test_an_identity_marker_in_an_annotation_that_cannot_be_evaluated_is_a_config_error(g):
    class Local:
        pass

    def tool(order_id: int, who: Annotated[Local, ledger.Identity(lambda v: v.name)]) -> str:
        return "ran"

    with pytest.raises(ledger.ConfigError, match="define the names it uses at module level"):
        g(tool, 1, Local())


@pytest.mark.slow
def test_an_injected_caller_value_without_a_canonical_form_fails_before_the_tool_runs(g):
    global oa_agents
    agents = oa_agents = framework("agents")
    ran = []

    @g.once(name="refund")
    def refund(ctx: oa_agents.RunContextWrapper, order_id: int) -> str:
        ran.append(order_id)
        return "refunded"

    with pytest.raises(ledger.FingerprintError, match=r"parameter 'ctx' is injected.*ledger\.Identity"):
        refund(agents.RunContextWrapper(context=threading.Lock()), 1)
    assert ran == []


@settings(max_examples=60, deadline=None)
@given(users=st.lists(st.text(max_size=8), min_size=2, max_size=2, unique=True),
       call_ids=st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=2, unique=True))
def test_the_caller_a_run_context_names_counts_and_its_call_id_does_not(users, call_ids):
    global oa_agents
    oa_agents = framework("agents")
    from agents.tool_context import ToolContext

    def refund(ctx: oa_agents.RunContextWrapper, order_id: int) -> str:
        return "refunded"

    probe = Guard(MemoryStore(), quiet=True)

    def identity(user, call_id):
        context = ToolContext(Customer(user), tool_name="refund", tool_call_id=call_id, tool_arguments="{}")
        return probe._prepare(refund, (context, 7), {}).id

    alice, bob = users
    assert identity(alice, call_ids[0]) == identity(alice, call_ids[1])  # a retry of alice's call
    assert identity(alice, call_ids[0]) != identity(bob, call_ids[0])    # bob's own call


def test_injected_rules_match_the_most_specific_class_first():
    tools = framework("langchain_core.tools")
    prebuilt = framework("langgraph.prebuilt")

    def tool(a: Annotated[str, tools.InjectedToolArg], b: Annotated[str, tools.InjectedToolCallId],
             c: Annotated[dict, prebuilt.InjectedState], d: prebuilt.ToolRuntime, e: int, run_manager=None):
        pass

    rules = ledger._injected_parameters(tool)
    assert rules.keys() == {"a", "b", "c", "d", "run_manager"}
    assert (rules["a"]("alice"), rules["b"], rules["c"], rules["run_manager"]) == ("alice", None, None, None)
    assert rules["d"](types.SimpleNamespace(context={"user": "bob"})) == {"user": "bob"}


# LangChain ---------------------------------------------------------------

# This file postpones annotations, so the types a framework resolves in a tool's
# signature must be module globals: framework modules are bound to these names.
lc_tools = lc_runtime_tools = lc_runnables = lg_prebuilt = lg_runtime = oa_agents = McpContext = None


@dataclasses.dataclass
class Customer:
    """A run's user context, as frameworks inject it."""
    user_id: str


def langchain_tools():
    global lc_tools
    tools = lc_tools = framework("langchain_core.tools")
    runs = []

    @tools.tool
    def send_invoice(customer: str, amount: float, note: str = "") -> str:
        """Email an invoice to a customer."""
        runs.append(("invoice", customer, amount))
        return f"sent {amount}"

    @tools.tool
    async def refund(order_id: int, call_id: Annotated[str, lc_tools.InjectedToolCallId]) -> str:
        """Refund an order."""
        runs.append(("refund", order_id))
        return f"refunded {order_id}"

    class Search(tools.BaseTool):
        name: str = "search"
        description: str = "Search the orders."

        def _run(self, query: str, run_manager=None) -> str:
            runs.append(("search", query))
            return "found " + query

    return tools, runs, send_invoice, refund, Search()


def tool_call(name, n, **args):
    return {"name": name, "args": args, "id": f"call_{n}", "type": "tool_call"}


def test_langchain_tools_keep_name_description_and_schema(g):
    tools, _, send_invoice, refund, search = langchain_tools()
    guarded = g.wrap_tools([send_invoice, refund, search])
    for before, after in zip([send_invoice, refund, search], guarded):
        assert type(after) is type(before) and isinstance(after, tools.BaseTool)
        assert (after.name, after.description) == (before.name, before.description)
        assert after.tool_call_schema.model_json_schema() == before.tool_call_schema.model_json_schema()
        assert after.args == before.args


class Mailbox:
    """A client a tool factory closes over: its state changes, so it has no canonical form."""

    def __init__(self):
        self.sent = []


def mail_tools(tools, mailbox):
    """Tools as a LangChain user writes them: closures over a client, made by a factory."""
    @tools.tool
    def send_invoice(customer: str) -> str:
        """Email an invoice to a customer."""
        mailbox.sent.append(customer)
        return "sent"

    return send_invoice


def test_a_langchain_tool_that_is_a_closure_is_named_by_its_framework_name(g):
    tools = framework("langchain_core.tools")
    mailbox = Mailbox()
    [wrapped] = g.wrap_tools([mail_tools(tools, mailbox)])
    decorated = g.once(mail_tools(tools, mailbox))  # @guard.once above @tool
    replies = [t.invoke(tool_call("send_invoice", n, customer="acme")).content
               for n, t in enumerate([wrapped, decorated, wrapped])]
    assert replies == ["sent", ledger.BLOCKED_MESSAGE, ledger.BLOCKED_MESSAGE] and mailbox.sent == ["acme"]
    assert [r["tool"] for r in g.history()] == ["send_invoice"]


def test_a_closure_below_a_framework_decorator_needs_a_name_at_decoration_time(g):
    tools = framework("langchain_core.tools")
    mailbox = Mailbox()

    def below(name=None):
        @tools.tool
        @g.once(name=name)
        def send_invoice(customer: str) -> str:
            """Email an invoice to a customer."""
            mailbox.sent.append(customer)
            return "sent"
        return send_invoice

    with pytest.raises(ledger.ConfigError, match=r"closure over 'mailbox'.*name="):
        below()
    named = below("send_invoice")
    replies = [named.invoke(tool_call("send_invoice", n, customer="acme")).content for n in (1, 2)]
    assert replies == ["sent", ledger.BLOCKED_MESSAGE] and mailbox.sent == ["acme"]


def test_langchain_duplicate_tool_calls_run_once(g):
    _, runs, send_invoice, _, _ = langchain_tools()
    [tool] = g.wrap_tools([send_invoice], blocked_return="already done")
    first = tool.invoke(tool_call("send_invoice", 1, customer="acme", amount=120.0))
    again = tool.invoke(tool_call("send_invoice", 2, amount=120.0, customer="acme", note=""))
    other = tool.invoke({"customer": "acme", "amount": 5})
    assert (first.content, first.tool_call_id, again.content, other) == ("sent 120.0", "call_1", "already done", "sent 5.0")
    assert runs == [("invoice", "acme", 120.0), ("invoice", "acme", 5.0)]
    assert {h["tool"] for h in g.history()} == {"send_invoice"}


def test_langchain_async_tool_runs_once_and_its_injected_call_id_is_not_fingerprinted(g):
    _, runs, _, refund, _ = langchain_tools()
    [tool] = g.wrap_tools([refund], blocked_return="already done")

    async def twice():
        return [(await tool.ainvoke(tool_call("refund", n, order_id=9))).content for n in (1, 2)]

    assert asyncio.run(twice()) == ["refunded 9", "already done"]
    assert runs == [("refund", 9)]


def test_langchain_content_and_artifact_tool_replays_its_tuple(g):
    tools = framework("langchain_core.tools")
    runs = []

    @tools.tool(response_format="content_and_artifact")
    def search(query: str) -> tuple:
        """Search the orders."""
        runs.append(query)
        return f"found {query}", {"ids": (1, 2)}

    g.policy(search, replay=True)
    [tool] = g.wrap_tools([search])
    first = tool.invoke(tool_call("search", 1, query="x"))
    again = tool.invoke(tool_call("search", 2, query="x"))
    assert (again.content, again.artifact) == (first.content, first.artifact) == ("found x", {"ids": (1, 2)})
    assert runs == ["x"]


def test_langchain_basetool_subclass_is_guarded_sync_and_async(g):
    _, runs, _, _, search = langchain_tools()
    [tool] = g.wrap_tools([search])
    assert tool.invoke({"query": "x"}) == "found x"
    assert tool.invoke({"query": "x"}) == ledger.BLOCKED_MESSAGE
    assert asyncio.run(tool.ainvoke({"query": "x"})) == ledger.BLOCKED_MESSAGE
    assert runs == [("search", "x")]


def test_langchain_tool_with_sync_and_async_bodies_is_one_tool(g):
    tools = framework("langchain_core.tools")
    runs = []

    def notify(to: str) -> str:
        runs.append(("sync", to))
        return "sent"

    async def anotify(to: str) -> str:
        runs.append(("async", to))
        return "sent"

    both = tools.StructuredTool.from_function(func=notify, coroutine=anotify, name="notify", description="Notify.")
    guarded = g.wrap_tools(both)
    assert isinstance(guarded, tools.StructuredTool) and guarded.name == "notify"
    assert asyncio.run(guarded.ainvoke({"to": "a"})) == "sent"
    assert guarded.invoke({"to": "a"}) == ledger.BLOCKED_MESSAGE
    assert guarded.invoke({"to": "b"}) == "sent"
    assert runs == [("async", "a"), ("sync", "b")]


def test_langchain_injected_tool_arg_identifies_the_caller(g):
    global lc_tools
    tools = lc_tools = framework("langchain_core.tools")
    runs = []

    @tools.tool
    def refund(order_id: int, user_id: Annotated[str, lc_tools.InjectedToolArg]) -> str:
        """Refund an order."""
        runs.append((user_id, order_id))
        return f"refunded {order_id} for {user_id}"

    [tool] = g.wrap_tools([refund], blocked_return="already done")
    assert "user_id" not in tool.tool_call_schema.model_json_schema()["properties"]
    replies = [tool.invoke(tool_call("refund", n, order_id=7, user_id=user)).content
               for n, user in enumerate(["alice", "bob", "alice"])]
    assert replies == ["refunded 7 for alice", "refunded 7 for bob", "already done"]
    assert runs == [("alice", 7), ("bob", 7)]


def assert_sends_one_invoice_with_the_schema_of_the_bare_function(tools, send_invoice, runs: list) -> None:
    """A guarded langchain send_invoice tool: the model sees the schema the undecorated
    function would give, and a repeated tool call is blocked."""
    assert send_invoice.tool_call_schema.model_json_schema() == \
        tools.tool(send_invoice.func.__wrapped__).tool_call_schema.model_json_schema()
    replies = [send_invoice.invoke(tool_call("send_invoice", n, customer="acme", amount=1.0)).content
               for n in (1, 2)]
    assert replies == ["sent", ledger.BLOCKED_MESSAGE] and runs == ["acme"]


def test_once_above_a_langchain_tool_returns_that_tool_guarded(g):
    tools = framework("langchain_core.tools")
    runs = []

    @g.once
    @tools.tool
    def send_invoice(customer: str, amount: float) -> str:
        """Email an invoice to a customer."""
        runs.append(customer)
        return "sent"

    assert isinstance(send_invoice, tools.StructuredTool)
    assert send_invoice.name == "send_invoice" and send_invoice.description == "Email an invoice to a customer."
    assert_sends_one_invoice_with_the_schema_of_the_bare_function(tools, send_invoice, runs)


def test_once_below_a_langchain_tool_guards_it_with_an_unchanged_schema(g):
    tools = framework("langchain_core.tools")
    runs = []

    @tools.tool
    @g.once(name="send_invoice")  # a closure (over runs): below the framework it needs a name
    def send_invoice(customer: str, amount: float) -> str:
        """Email an invoice to a customer."""
        runs.append(customer)
        return "sent"

    assert_sends_one_invoice_with_the_schema_of_the_bare_function(tools, send_invoice, runs)


def test_once_below_a_content_and_artifact_tool_blocks_with_a_content_artifact_pair(g):
    tools = framework("langchain_core.tools")

    @tools.tool(response_format="content_and_artifact")
    @g.once
    def search(query: str) -> tuple[str, list]:
        """Search the orders."""
        return f"found {query}", [1, 2]

    messages = [search.invoke(tool_call("search", n, query="x")) for n in (1, 2)]
    assert [(m.content, m.artifact) for m in messages] == [("found x", [1, 2]), (ledger.BLOCKED_MESSAGE, None)]


def test_once_blocked_return_is_what_a_langchain_duplicate_returns(g):
    tools = framework("langchain_core.tools")

    @g.once(blocked_return="invoice already sent")
    @tools.tool
    def send_invoice(customer: str) -> str:
        """Email an invoice to a customer."""
        return "sent"

    assert [send_invoice.invoke({"customer": "acme"}) for _ in range(2)] == ["sent", "invoice already sent"]


def test_a_content_and_artifact_tools_blocked_duplicate_is_a_content_artifact_pair(g):
    tools = framework("langchain_core.tools")

    @g.once
    @tools.tool(response_format="content_and_artifact")
    def search(query: str) -> tuple[str, list]:
        """Search the orders."""
        return f"found {query}", [1, 2]

    messages = [search.invoke(tool_call("search", n, query="x")) for n in (1, 2)]
    assert [(m.content, m.artifact) for m in messages] == [("found x", [1, 2]), (ledger.BLOCKED_MESSAGE, None)]


def test_policy_can_name_a_framework_tool_by_its_object(g):
    _, runs, send_invoice, _, _ = langchain_tools()
    g.policy(send_invoice, replay=True)
    [tool] = g.wrap_tools([send_invoice])
    assert [tool.invoke({"customer": "a", "amount": 1}) for _ in range(2)] == ["sent 1.0", "sent 1.0"]
    assert len(runs) == 1 and g.history(tool=send_invoice)[0]["blocked"] == 1


def run_langchain_agent(tools, turns, **invoke_options):
    """One run of LangChain's agent loop (create_agent) with a scripted model; the tools' replies."""
    agents = framework("langchain.agents")
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel

    class ScriptedModel(FakeMessagesListChatModel):
        def bind_tools(self, tools, **kwargs):
            return self

    schema = {"context_schema": Customer} if "context" in invoke_options else {}
    agent = agents.create_agent(ScriptedModel(responses=turns), tools, **schema)
    state = agent.invoke({"messages": [("user", "go")]}, **invoke_options)
    return [m.content for m in state["messages"] if m.type == "tool"]


def refund_turns(*calls):
    from langchain_core.messages import AIMessage
    return [AIMessage("", tool_calls=[tool_call("refund", n, **args) for n, args in enumerate(calls)]),
            AIMessage("Done.")]


def langchain_refund_tool(runs):
    from langchain_core.tools import tool

    @tool
    def refund(order_id: int) -> str:
        """Refund an order."""
        runs.append(order_id)
        return f"refunded {order_id}"

    return refund


def test_langchain_agent_loop_blocks_a_duplicate_tool_call(g):
    runs = []
    tools = g.wrap_tools([langchain_refund_tool(runs)])
    replies = run_langchain_agent(tools, refund_turns({"order_id": 7}, {"order_id": 7}))
    assert sorted(replies) == sorted(["refunded 7", ledger.BLOCKED_MESSAGE]) and runs == [7]


def test_langchain_agent_loop_replays_a_duplicate_tool_call(g):
    runs = []
    refund = langchain_refund_tool(runs)
    g.policy(refund, replay=True)
    tools = g.wrap_tools([refund])
    replies = [run_langchain_agent(tools, refund_turns({"order_id": 7})) for _ in range(2)]
    assert replies == [["refunded 7"], ["refunded 7"]] and runs == [7]


def test_langchain_agent_loop_serves_two_users_through_the_runtime_context(g):
    global lc_runtime_tools
    lc_runtime_tools = framework("langchain.tools")
    runs = []

    @g.once
    @lc_runtime_tools.tool
    def refund(order_id: int, runtime: lc_runtime_tools.ToolRuntime) -> str:
        """Refund an order."""
        runs.append((runtime.context.user_id, order_id))
        return f"refunded {order_id}"

    replies = [run_langchain_agent([refund], refund_turns({"order_id": 7}), context=Customer(user))
               for user in ("alice", "bob", "alice")]
    assert replies == [["refunded 7"], ["refunded 7"], [ledger.BLOCKED_MESSAGE]]
    assert runs == [("alice", 7), ("bob", 7)]


# LangGraph ---------------------------------------------------------------

def test_langgraph_toolnode_runs_guarded_tools_once_with_injected_state(g):
    global lg_prebuilt
    prebuilt = lg_prebuilt = framework("langgraph.prebuilt")
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    sent = []

    @tool
    def notify(order_id: int, state: Annotated[dict, lg_prebuilt.InjectedState]) -> str:
        """Tell the customer."""
        sent.append((order_id, len(state["messages"])))
        return "sent"

    from langgraph.graph import END, START, MessagesState, StateGraph
    graph = StateGraph(MessagesState)
    graph.add_node("tools", prebuilt.ToolNode(g.wrap_tools([notify], blocked_return="already sent")))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    app = graph.compile()
    for n in (1, 2):
        message = AIMessage("", tool_calls=[tool_call("notify", 2 * n, order_id=7),
                                            tool_call("notify", 2 * n + 1, order_id=7)])
        replies = [m.content for m in app.invoke({"messages": [message] * n})["messages"] if m.type == "tool"]
        assert sorted(replies) == (["already sent", "sent"] if n == 1 else ["already sent"] * 2)
    assert sent == [(7, 1)]


def test_langgraph_tool_runtime_context_identifies_the_caller(g):
    global lg_prebuilt
    prebuilt = lg_prebuilt = framework("langgraph.prebuilt")
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, MessagesState, StateGraph
    runs = []

    @tool
    def refund(order_id: int, runtime: lg_prebuilt.ToolRuntime) -> str:
        """Refund an order."""
        runs.append((runtime.context.user_id, order_id))
        return f"refunded {order_id}"

    graph = StateGraph(MessagesState, context_schema=Customer)
    graph.add_node("tools", prebuilt.ToolNode(g.wrap_tools([refund], blocked_return="already done")))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    app = graph.compile()
    replies = []
    for n, user in enumerate(["alice", "bob", "alice"]):
        message = AIMessage("", tool_calls=[tool_call("refund", n, order_id=7)])
        state = app.invoke({"messages": [message]}, context=Customer(user))
        replies += [m.content for m in state["messages"] if m.type == "tool"]
    assert replies == ["refunded 7", "refunded 7", "already done"]
    assert runs == [("alice", 7), ("bob", 7)]


def test_langgraph_node_runtime_context_identifies_the_caller(g):
    global lg_runtime
    graph_module = framework("langgraph.graph")
    lg_runtime = framework("langgraph.runtime")
    charged = []

    def charge(order: Order, runtime: lg_runtime.Runtime[Customer]) -> dict:
        charged.append((runtime.context.user_id, order["order_id"]))
        return {"receipt": f"ch_{order['order_id']}"}

    graph = graph_module.StateGraph(Order, context_schema=Customer)
    graph.add_node("charge", g.wrap_tools({"charge": charge}, blocked_return={})["charge"])
    graph.add_edge(graph_module.START, "charge")
    app = graph.compile()
    for user in ("alice", "bob", "alice"):
        app.invoke({"order_id": 7}, context=Customer(user))
    assert charged == [("alice", 7), ("bob", 7)]


class Order(TypedDict):
    order_id: int
    receipt: str


def test_a_langgraph_node_that_is_a_closure_is_named_by_its_key(g):
    graph_module = framework("langgraph.graph")
    mailbox = Mailbox()

    def node(order: Order) -> dict:
        mailbox.sent.append(order["order_id"])
        return {"receipt": "sent"}

    with pytest.raises(ledger.ConfigError, match=r"closure over 'mailbox'.*dict key in guard\.wrap_tools"):
        g.wrap_tools([node])
    graph = graph_module.StateGraph(Order)
    graph.add_node("notify", g.wrap_tools({"notify": node}, blocked_return={})["notify"])
    graph.add_edge(graph_module.START, "notify")
    app = graph.compile()
    assert [app.invoke({"order_id": n}).get("receipt") for n in (1, 1, 2)] == ["sent", None, "sent"]
    assert mailbox.sent == [1, 2] and {r["tool"] for r in g.history()} == {"notify"}


def test_langgraph_plain_node_function_runs_once_per_state(g):
    graph_module = framework("langgraph.graph")
    charged = []

    def charge(order: Order) -> dict:
        charged.append(order["order_id"])
        return {"receipt": f"ch_{order['order_id']}"}

    g.policy("charge", replay=True)
    graph = graph_module.StateGraph(Order)
    graph.add_node("charge", g.wrap_tools({"charge": charge})["charge"])
    graph.add_edge(graph_module.START, "charge")
    app = graph.compile()
    assert [app.invoke({"order_id": n})["receipt"] for n in (1, 1, 2)] == ["ch_1", "ch_1", "ch_2"]
    assert charged == [1, 2]


# OpenAI Agents SDK -------------------------------------------------------

def agents_tools():
    agents = framework("agents")
    runs = []

    @agents.function_tool
    def refund(order_id: int, amount: float) -> str:
        """Refund an order to the customer's card."""
        runs.append(order_id)
        if amount < 0:
            raise ValueError("negative amount")
        return f"refunded {order_id}"

    @agents.function_tool
    async def ping(host: str) -> str:
        """Ping a host."""
        runs.append(host)
        return "pong"

    return agents, runs, refund, ping


def invoke_function_tool(agents, tool, n, arguments):
    text = json.dumps(arguments)
    from agents.tool_context import ToolContext
    context = ToolContext(None, tool_name=tool.name, tool_call_id=f"call_{n}", tool_arguments=text)
    return asyncio.run(tool.on_invoke_tool(context, text))


def test_function_tool_keeps_name_description_and_json_schema(g):
    agents, _, refund, ping = agents_tools()
    for before, after in zip([refund, ping], g.wrap_tools([refund, ping])):
        assert isinstance(after, agents.FunctionTool) and after is not before
        assert (after.name, after.description, after.params_json_schema, after.strict_json_schema) == \
               (before.name, before.description, before.params_json_schema, before.strict_json_schema)


def test_function_tool_duplicate_invocations_run_once(g):
    agents, runs, refund, ping = agents_tools()
    refund, ping = g.wrap_tools([refund, ping], blocked_return="already done")
    results = [invoke_function_tool(agents, refund, 1, {"order_id": 4, "amount": 2.5}),
               invoke_function_tool(agents, refund, 2, {"amount": 2.5, "order_id": 4}),
               invoke_function_tool(agents, ping, 3, {"host": "a"}),
               invoke_function_tool(agents, ping, 4, {"host": "a"})]
    assert results == ["refunded 4", "already done", "pong", "already done"]
    assert runs == [4, "a"] and {h["tool"] for h in g.history()} == {"refund", "ping"}


def test_function_tool_that_raised_stays_retryable(g):
    agents, runs, refund, _ = agents_tools()
    [refund] = g.wrap_tools([refund])
    for n in (1, 2):
        message = invoke_function_tool(agents, refund, n, {"order_id": 5, "amount": -1})
        assert "error occurred" in message  # the SDK's own error message for the model
    assert runs == [5, 5]


def test_function_tool_runs_once_under_an_agent_run(g, tmp_path):
    framework("agents")
    sys.path.insert(0, str(HERE / "examples"))
    try:
        import openai_agents_sdk as example
    finally:
        sys.path.remove(str(HERE / "examples"))
    from agents import Agent, RunConfig, Runner
    example.REFUNDS.clear()
    script = [[("refund", {"order_id": 1, "amount": 3.0})] * 2, "done"]
    agent = Agent(name="a", tools=g.wrap_tools([example.refund], blocked_return="already done"))
    result = asyncio.run(Runner.run(agent, "go", run_config=RunConfig(model=example.ScriptedModel(script),
                                                                      tracing_disabled=True)))
    outputs = [item.output for item in result.new_items if item.type == "tool_call_output_item"]
    assert sorted(outputs) == ["already done", "refunded 3.0 on order 1"] and example.REFUNDS == [1]


def run_agent(g, tools, script, context=None):
    """One Runner.run of an agent with these tools, driven by the example's scripted model:
    the tool outputs as the model reads them."""
    framework("agents")
    sys.path.insert(0, str(HERE / "examples"))
    try:
        import openai_agents_sdk as example
    finally:
        sys.path.remove(str(HERE / "examples"))
    from agents import Agent, RunConfig, Runner
    agent = Agent(name="a", tools=tools)
    result = asyncio.run(Runner.run(agent, "go", context=context, run_config=RunConfig(
        model=example.ScriptedModel(script), tracing_disabled=True)))
    return [item.raw_item["output"] for item in result.new_items if item.type == "tool_call_output_item"]


def test_function_tool_run_context_identifies_the_caller(g):
    global oa_agents
    agents = oa_agents = framework("agents")
    runs = []

    @agents.function_tool
    def refund(ctx: oa_agents.RunContextWrapper[Customer], order_id: int) -> str:
        """Refund an order."""
        runs.append((ctx.context.user_id, order_id))
        return f"refunded {order_id} for {ctx.context.user_id}"

    tools = g.wrap_tools([refund], blocked_return="already done")
    script = [[("refund", {"order_id": 7})], "done"]
    outputs = [run_agent(g, tools, list(script), Customer(user)) for user in ("alice", "bob", "alice")]
    assert outputs == [["refunded 7 for alice"], ["refunded 7 for bob"], ["already done"]]
    assert runs == [("alice", 7), ("bob", 7)]


def test_a_hand_built_function_tools_run_context_counts_unless_its_invoker_says_otherwise(g):
    agents = framework("agents")
    runs = []

    async def refund(ctx, arguments: str) -> str:
        runs.append(ctx.context.user_id)
        return "refunded"

    async def notify(ctx: Annotated[object, ledger.Ignore], arguments: str) -> str:
        runs.append("notify")
        return "notified"

    schema = {"type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"],
              "additionalProperties": False}
    tools = g.wrap_tools([agents.FunctionTool(name=name, description=name, params_json_schema=schema,
                                              on_invoke_tool=invoke) for name, invoke in
                          [("refund", refund), ("notify", notify)]])
    script = [[("refund", {"order_id": 7}), ("notify", {"order_id": 7})], "done"]
    outputs = [run_agent(g, tools, list(script), Customer(user)) for user in ("alice", "bob")]
    assert outputs == [["refunded", "notified"], ["refunded", ledger.BLOCKED_MESSAGE]]
    assert sorted(runs) == ["alice", "bob", "notify"]  # the SDK runs one turn's calls concurrently


def test_function_tool_without_a_context_parameter_is_the_same_call_for_every_run_context(g):
    agents, runs, refund, _ = agents_tools()
    tools = g.wrap_tools([refund], blocked_return="already done")
    script = [[("refund", {"order_id": 7, "amount": 1.0})], "done"]
    outputs = [run_agent(g, tools, list(script), Customer(user)) for user in ("alice", "bob")]
    assert outputs == [["refunded 7"], ["already done"]] and runs == [7]


def test_once_above_a_function_tool_returns_that_tool_guarded(g):
    agents = framework("agents")
    runs: list[int] = []

    @g.once
    @agents.function_tool
    def refund(order_id: int) -> str:
        """Refund an order."""
        runs.append(order_id)
        return f"refunded {order_id}"

    assert isinstance(refund, agents.FunctionTool) and refund.name == "refund"
    outputs = run_agent(g, [refund], [[("refund", {"order_id": 7})] * 2, "done"])
    assert sorted(outputs) == sorted(["refunded 7", ledger.BLOCKED_MESSAGE]) and runs == [7]


def test_once_below_a_function_tool_guards_it_and_keeps_its_schema(g):
    global oa_agents
    agents = oa_agents = framework("agents")
    runs = []

    @agents.function_tool
    @g.once(name="refund")
    def refund(ctx: oa_agents.RunContextWrapper[Customer], order_id: int) -> str:
        """Refund an order."""
        runs.append((ctx.context.user_id, order_id))
        return f"refunded {order_id}"

    unguarded = agents.function_tool(refund.on_invoke_tool._invoke_tool_impl
                                     .__agents_function_tool_wrapped_callable__.__wrapped__)
    assert (refund.name, refund.description, refund.params_json_schema) == \
           (unguarded.name, unguarded.description, unguarded.params_json_schema)
    script = [[("refund", {"order_id": 7})] * 2, "done"]
    outputs = [run_agent(g, [refund], list(script), Customer(user)) for user in ("alice", "bob")]
    assert [sorted(o) for o in outputs] == [sorted(["refunded 7", ledger.BLOCKED_MESSAGE])] * 2
    assert runs == [("alice", 7), ("bob", 7)]


def test_function_tool_duplicate_is_replayed_under_an_agent_run(g):
    agents, runs, refund, _ = agents_tools()
    g.policy(refund, replay=True)
    tools = g.wrap_tools([refund])
    outputs = [run_agent(g, tools, [[("refund", {"order_id": 7, "amount": 1.0})], "done"]) for _ in range(2)]
    assert outputs == [["refunded 7"], ["refunded 7"]] and runs == [7]


# MCP ---------------------------------------------------------------------

def mcp_package():
    """The `mcp` package's server class, request context class and in-memory client."""
    global McpContext
    try:
        framework("mcp.server.mcpserver")
        from mcp import Client
        from mcp.server.mcpserver import Context, MCPServer as Server

        def connect(server):
            return Client(server)
    except ModuleNotFoundError:  # mcp 1.x
        from mcp.server.fastmcp import Context, FastMCP as Server
        from mcp.shared.memory import create_connected_server_and_client_session

        def connect(server):
            return create_connected_server_and_client_session(server._mcp_server)
    McpContext = Context
    return Server, Context, connect


def mcp_server():
    Server, _, connect = mcp_package()
    server = Server("test")
    runs = []

    @server.tool()
    def file_ticket(title: str, ctx: McpContext, priority: int = 2) -> str:
        """Open a ticket."""
        runs.append((title, ctx.request_id is not None))
        return f"opened {title}"

    @server.tool()
    async def close_ticket(number: int) -> str:
        """Close a ticket."""
        runs.append(number)
        return f"closed {number}"

    return server, connect, runs


def call_mcp(server, connect, calls):
    async def go():
        async with connect(server) as client:
            return [(await client.call_tool(name, arguments)).content[0].text for name, arguments in calls]
    return asyncio.run(go())


def test_mcp_server_is_guarded_in_place_and_lists_the_same_tools(g):
    server, _, _ = mcp_server()
    before = asyncio.run(server.list_tools())
    assert g.wrap_tools(server) is server
    assert asyncio.run(server.list_tools()) == before


def test_mcp_duplicate_calls_run_once_with_the_request_context_passed_on(g):
    server, connect, runs = mcp_server()
    g.wrap_tools(server, blocked_return="already done")
    texts = call_mcp(server, connect, [("file_ticket", {"title": "fire"}),
                                       ("file_ticket", {"title": "fire", "priority": 2}),
                                       ("close_ticket", {"number": 1}),
                                       ("close_ticket", {"number": 1}),
                                       ("file_ticket", {"title": "flood"})])
    assert texts == ["opened fire", "already done", "closed 1", "already done", "opened flood"]
    assert runs == [("fire", True), 1, ("flood", True)]
    assert {h["tool"] for h in g.history()} == {"file_ticket", "close_ticket"}


class McpFlavor(NamedTuple):
    """An MCP server package as its users write servers: how a tool is registered (mcp's
    @server.tool(), fastmcp's @mcp.tool) and how an in-memory client calls it."""
    server: object
    register: object   # the decorator that registers a function as a tool
    context: type      # the request context class a tool may take
    call: object       # call(calls) -> [(is_error, text)]


def mcp_flavor(name: str) -> McpFlavor:
    if name == "fastmcp":
        fastmcp = framework("fastmcp")
        server = fastmcp.FastMCP("test")
        return McpFlavor(server, server.tool, fastmcp.Context,
                         lambda calls: asyncio.run(with_client(fastmcp.Client(server), fastmcp_calls, calls)))
    Server, context, connect = mcp_package()
    server = Server("test")
    return McpFlavor(server, server.tool(), context,
                     lambda calls: asyncio.run(with_client(connect(server), mcp_calls, calls)))


async def fastmcp_calls(client, calls):
    return [(r.is_error, r.content[0].text) for r in
            [await client.call_tool(tool, arguments, raise_on_error=False) for tool, arguments in calls]]


async def mcp_calls(client, calls):
    return [(r.is_error if "is_error" in type(r).model_fields else r.isError, r.content[0].text)  # 2.x, 1.x
            for r in [await client.call_tool(tool, arguments) for tool, arguments in calls]]


async def with_client(client, use, calls):
    async with client as session:
        return await use(session, calls)


MCP_FLAVORS = ["mcp", "fastmcp"]


def authenticated_as(client_id: str):
    """Make the MCP requests of this thread's next client come from `client_id`, the way the
    SDK's auth middleware does after it checked a bearer token."""
    from mcp.server.auth.middleware.auth_context import auth_context_var
    from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
    from mcp.server.auth.provider import AccessToken
    auth_context_var.set(AuthenticatedUser(AccessToken(token="t", client_id=client_id, scopes=[])))


@pytest.mark.slow
@pytest.mark.parametrize("flavor", MCP_FLAVORS)
def test_once_above_an_mcp_tool_decorator_guards_the_registered_tool(g, flavor):
    mcp, runs = mcp_flavor(flavor), []

    @g.once
    @mcp.register
    def file_ticket(title: str) -> str:
        """Open a ticket."""
        runs.append(title)
        return f"opened {title}"

    assert mcp.call([("file_ticket", {"title": "fire"})] * 2) == [(False, "opened fire"),
                                                                 (False, ledger.BLOCKED_MESSAGE)]
    assert file_ticket(title="fire") is BLOCKED and runs == ["fire"]  # a direct call shares the records


@pytest.mark.parametrize("flavor", MCP_FLAVORS)
def test_once_below_an_mcp_tool_decorator_guards_the_tool(g, flavor):
    mcp, runs = mcp_flavor(flavor), []

    @mcp.register
    @g.once(name="file_ticket", blocked_return="already filed")
    def file_ticket(title: str) -> str:
        """Open a ticket."""
        runs.append(title)
        return f"opened {title}"

    assert mcp.call([("file_ticket", {"title": "fire"})] * 2) == [(False, "opened fire"), (False, "already filed")]
    assert runs == ["fire"]


@pytest.mark.parametrize("flavor", MCP_FLAVORS)
def test_once_below_an_mcp_tool_with_a_typed_output_blocks_with_an_error_result_the_client_reads(g, flavor):
    mcp, runs = mcp_flavor(flavor), []

    @mcp.register
    @g.once(name="ticket")
    def ticket(number: int) -> dict[str, int]:
        """Look a ticket up."""
        runs.append(number)
        return {"number": number}

    first, again = mcp.call([("ticket", {"number": 1})] * 2)
    assert first[0] is False and again == (True, ledger.BLOCKED_MESSAGE) and runs == [1]


@pytest.mark.parametrize("flavor", MCP_FLAVORS)
def test_wrap_tools_of_a_function_an_mcp_server_registered_guards_the_servers_tool(g, flavor):
    mcp, runs = mcp_flavor(flavor), []

    @mcp.register
    def file_ticket(title: str) -> str:
        """Open a ticket."""
        runs.append(title)
        return f"opened {title}"

    [guarded] = g.wrap_tools([file_ticket])
    assert mcp.call([("file_ticket", {"title": "fire"})]) == [(False, "opened fire")]
    assert guarded(title="fire") is BLOCKED and runs == ["fire"]


@pytest.mark.parametrize("flavor", MCP_FLAVORS)
def test_a_function_two_mcp_servers_registered_is_guarded_in_both(g, flavor):
    first, second, runs = mcp_flavor(flavor), mcp_flavor(flavor), []

    def file_ticket(title: str) -> str:
        """Open a ticket."""
        runs.append(title)
        return f"opened {title}"

    first.register(file_ticket)
    second.register(file_ticket)
    g.once(file_ticket)
    assert first.call([("file_ticket", {"title": "fire"})]) == [(False, "opened fire")]
    assert second.call([("file_ticket", {"title": "fire"})]) == [(False, ledger.BLOCKED_MESSAGE)]
    assert runs == ["fire"]


@pytest.mark.parametrize("flavor", MCP_FLAVORS)
def test_wrap_tools_guards_an_mcp_server_in_place_with_the_same_tools(g, flavor):
    mcp, runs = mcp_flavor(flavor), []

    @mcp.register
    def file_ticket(title: str, priority: int = 2) -> str:
        """Open a ticket."""
        runs.append(title)
        return f"opened {title}"

    def listed():
        tools = asyncio.run(mcp.server.list_tools())
        return [t.to_mcp_tool() if hasattr(t, "to_mcp_tool") else t for t in tools]  # fastmcp lists its own

    before = listed()
    assert g.wrap_tools(mcp.server) is mcp.server
    assert listed() == before
    assert mcp.call([("file_ticket", {"title": "fire"}), ("file_ticket", {"title": "fire", "priority": 2})]) == \
           [(False, "opened fire"), (False, ledger.BLOCKED_MESSAGE)]
    assert runs == ["fire"]


@pytest.mark.parametrize("flavor", MCP_FLAVORS)
def test_an_mcp_blocked_duplicate_is_text_or_an_error_result_as_the_output_schema_allows(g, flavor):
    mcp = mcp_flavor(flavor)

    @mcp.register
    def count_tickets(queue: str) -> int:
        """Count the open tickets."""
        return 3

    @mcp.register
    def ticket(number: int) -> dict[str, int]:
        """Look a ticket up."""
        return {"number": number}

    @mcp.register
    def close_ticket(number: int) -> str:
        """Close a ticket."""
        return "closed"

    g.wrap_tools(mcp.server)
    results = mcp.call([("count_tickets", {"queue": "q"})] * 2 + [("ticket", {"number": 1})] * 2 +
                       [("close_ticket", {"number": 1})] * 2)
    assert results[1::2] == [(True, ledger.BLOCKED_MESSAGE), (True, ledger.BLOCKED_MESSAGE),
                             (False, ledger.BLOCKED_MESSAGE)]
    assert not any(is_error for is_error, _ in results[0::2])


@pytest.mark.parametrize("flavor", MCP_FLAVORS)
def test_an_mcp_duplicate_is_replayed_through_the_client(g, flavor):
    mcp, runs = mcp_flavor(flavor), []

    @g.once(replay=True)
    @mcp.register
    def lookup(customer: str) -> str:
        """Look a customer up."""
        runs.append(customer)
        return f"customer {customer}"

    assert mcp.call([("lookup", {"customer": "acme"})] * 2) == [(False, "customer acme")] * 2
    assert runs == ["acme"]


@pytest.mark.parametrize("flavor", MCP_FLAVORS)
def test_mcp_authenticated_callers_are_told_apart(g, flavor):
    mcp, runs = mcp_flavor(flavor), []
    global McpContext
    McpContext = mcp.context

    @g.once
    @mcp.register
    def refund(order_id: int, ctx: McpContext) -> str:
        """Refund an order."""
        runs.append(order_id)
        return f"refunded {order_id}"

    results = []
    for user in ("alice", "bob", "alice"):
        authenticated_as(user)
        results += mcp.call([("refund", {"order_id": 7})])
    assert results == [(False, "refunded 7"), (False, "refunded 7"), (False, ledger.BLOCKED_MESSAGE)]
    assert runs == [7, 7]


@pytest.mark.slow
def test_guarded_mcp_server_writes_nothing_to_stdout(tmp_path):
    framework("mcp")
    code = textwrap.dedent("""
        import asyncio, logging, sys
        sys.path.insert(0, %r)
        import test_ledger as t
        from ledger import Guard
        guard = Guard("ledger.db")  # on disk, not quiet: warnings go to the log, not stdout
        server, connect, runs = t.mcp_server()
        guard.wrap_tools(server)
        t.call_mcp(server, connect, [("file_ticket", {"title": "x"})] * 3)
        guard.log()
        guard.close()
    """ % str(HERE))
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "file_ticket" in done.stderr  # guard.log() went to stderr


# More agent frameworks: each framework's own tool objects, both orders of
# @guard.once and the framework's decorator, duplicates blocked and replayed
# through the framework's own agent loop (a scripted model from examples/), and
# two users told apart by what the framework injects.

def example_module(name: str, package: str):
    """An example's module (its tools and scripted model), imported afresh, or skip/fail without `package`."""
    framework(package)
    sys.path.insert(0, str(HERE / "examples"))
    try:
        sys.modules.pop(name, None)
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(HERE / "examples"))


# Pydantic AI --------------------------------------------------------------

def test_pydantic_ai_tool_and_toolset_keep_name_description_and_schema(g):
    pydantic_ai = framework("pydantic_ai")

    def refund(order_id: int, amount: float = 0.0) -> str:
        """Refund an order."""
        return "refunded"

    tool = pydantic_ai.Tool(refund, name="refund_order")
    toolset = pydantic_ai.FunctionToolset([refund])
    guarded_tool, guarded_toolset = g.wrap_tools([tool, toolset])
    assert type(guarded_tool) is type(tool) and guarded_tool.tool_def == tool.tool_def
    assert type(guarded_toolset) is type(toolset) and guarded_toolset.tools.keys() == toolset.tools.keys()
    assert guarded_toolset.tools["refund"].tool_def == toolset.tools["refund"].tool_def
    assert toolset.tools["refund"].function is refund  # the original is left as it was


def pydantic_ai_run(example, toolsets, deps, calls):
    """The tool results of one agent run whose model asks for `calls` in one turn, sorted."""
    agent = example.Agent(example.scripted_model([calls, "done"]), deps_type=example.Deps, toolsets=toolsets)
    return sorted(example.tool_results(agent.run_sync("go", deps=deps)))


def test_pydantic_ai_duplicates_are_blocked_per_user_through_the_agent(g):
    example = example_module("pydantic_ai_agent", "pydantic_ai")
    gateway = example.SmsGateway()
    ada, bob = example.Deps("ada", gateway), example.Deps("bob", example.SmsGateway())
    guarded = g.wrap_tools(example.toolset, blocked_return="already done")
    call = ("text_customer", {"message": "hi"})
    assert pydantic_ai_run(example, [guarded], ada, [call, call]) == ["already done", "texted"]
    assert pydantic_ai_run(example, [guarded], ada, [call]) == ["already done"]
    assert pydantic_ai_run(example, [guarded], bob, [call]) == ["texted"]
    assert gateway.sent == ["ada: hi"] and bob.gateway.sent == ["bob: hi"]


def test_pydantic_ai_duplicates_are_replayed_through_the_agent(g):
    example = example_module("pydantic_ai_agent", "pydantic_ai")
    deps = example.Deps("ada", example.SmsGateway())
    g.policy("text_customer", replay=True)
    call = ("text_customer", {"message": "hi"})
    assert pydantic_ai_run(example, [g.wrap_tools(example.toolset)], deps, [call, call]) == ["texted", "texted"]
    assert deps.gateway.sent == ["ada: hi"]


PaRunContext = None  # bound to pydantic_ai.RunContext: this file postpones annotations


def test_pydantic_ai_deps_without_plain_fields_fail_before_the_tool_runs(g):
    global PaRunContext
    pydantic_ai = framework("pydantic_ai")
    PaRunContext = pydantic_ai.RunContext
    from pydantic_ai.models.test import TestModel
    runs = []

    def ping(ctx: PaRunContext, host: str) -> str:
        runs.append(host)
        return "pong"

    agent = pydantic_ai.Agent(TestModel(), tools=g.wrap_tools([pydantic_ai.Tool(ping, takes_ctx=True)]))
    with pytest.raises(ledger.FingerprintError, match="parameter 'ctx' .* ledger.Identity"):
        agent.run_sync("go", deps=object())
    assert runs == []


@dataclasses.dataclass
class Account:
    region: str
    client: object  # a connection: no canonical form


@dataclasses.dataclass
class AppDeps:
    user_id: int
    account: Account
    http: object


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(users=st.tuples(st.integers(0, 2), st.integers(0, 2)), regions=st.tuples(st.sampled_from("ab"),
                                                                                 st.sampled_from("ab")))
def test_pydantic_ai_deps_count_by_their_plain_fields_at_any_depth(users, regions):
    global PaRunContext
    pydantic_ai = framework("pydantic_ai")
    from pydantic_ai.models.test import TestModel
    from pydantic_ai.usage import RunUsage
    PaRunContext = pydantic_ai.RunContext
    guard, runs = Guard(MemoryStore(), quiet=True), []

    @guard.once(name="charge")
    def charge(ctx: PaRunContext, cents: int) -> str:
        runs.append(ctx.deps.user_id)
        return "charged"

    for user, region in zip(users, regions):  # every call with clients of its own
        deps = AppDeps(user, Account(region, object()), object())
        charge(pydantic_ai.RunContext(deps=deps, model=TestModel(), usage=RunUsage()), cents=5)
    assert len(runs) == (1 if (users[0], regions[0]) == (users[1], regions[1]) else 2)


def test_pydantic_ai_once_below_the_agent_decorator_guards_the_tool(g):
    example = example_module("pydantic_ai_agent", "pydantic_ai")
    agent = example.Agent(example.scripted_model([[("notify", {"to": "ada"})] * 2, "done"]))
    sent = []

    @agent.tool_plain
    @g.once(name="notify", replay=True)  # a closure (over sent): below the decorator it needs a name
    def notify(to: str) -> str:
        """Notify someone."""
        sent.append(to)
        return "notified"

    assert example.tool_results(agent.run_sync("go")) == ["notified", "notified"] and sent == ["ada"]


def test_pydantic_ai_once_above_the_agent_decorator_guards_the_registered_tool(g):
    example = example_module("pydantic_ai_agent", "pydantic_ai")
    agent = example.Agent(example.scripted_model([[("notify", {"to": "ada"})] * 2, "done"]))
    sent = []

    @g.once
    @agent.tool_plain
    def notify(to: str) -> str:
        """Notify someone."""
        sent.append(to)
        return "notified"

    assert sorted(example.tool_results(agent.run_sync("go"))) == [ledger.BLOCKED_MESSAGE, "notified"]
    assert notify(to="ada") is BLOCKED and sent == ["ada"]  # the function and the agent's tool: one record


def test_pydantic_ai_once_above_a_context_tool_counts_the_deps(g):
    example = example_module("pydantic_ai_agent", "pydantic_ai")
    guarded = g.once(example.text_customer)  # registered by @toolset.tool in the example
    assert guarded is not example.text_customer
    calls = [("text_customer", {"message": "hi"})] * 2
    ada, bob = example.Deps("ada", example.SmsGateway()), example.Deps("bob", example.SmsGateway())
    assert pydantic_ai_run(example, [example.toolset], ada, calls) == [ledger.BLOCKED_MESSAGE, "texted"]
    assert pydantic_ai_run(example, [example.toolset], bob, calls) == [ledger.BLOCKED_MESSAGE, "texted"]
    assert (ada.gateway.sent, bob.gateway.sent) == (["ada: hi"], ["bob: hi"])


# LlamaIndex ---------------------------------------------------------------

def assert_a_repeated_call_is_blocked_through_the_agent(run, example, tools, call, reply: str) -> None:
    """`run` (a framework's agent loop) sees the tool's `reply` once for `call` asked twice in one
    turn, and "already done" for the duplicate and for the same call in the next turn."""
    assert run(example, tools, [call, call]) == ["already done", reply]
    assert run(example, tools, [call]) == ["already done"]


def llama_index_run(example, tools, calls):
    """The sorted tool results of a FunctionAgent run whose model asks for `calls` in one turn."""
    agent = example.FunctionAgent(tools=tools, llm=example.scripted_llm([calls, "done"]))
    return sorted(asyncio.run(example.run(agent, "go")))


@pytest.mark.slow
def test_llama_index_function_tools_keep_name_description_schema_and_context(g):
    example = example_module("llama_index_agent", "llama_index.core")

    def quote(item: str, quantity: int = 1) -> str:
        """Quote a price."""
        return "42"

    tools = [example.FunctionTool.from_defaults(example.cancel_order),
             example.FunctionTool.from_defaults(quote, name="get_quote")]
    for before, after in zip(tools, g.wrap_tools(tools)):
        assert type(after) is type(before) and after is not before
        assert after.metadata.name == before.metadata.name
        assert after.metadata.description == before.metadata.description
        assert after.metadata.get_parameters_dict() == before.metadata.get_parameters_dict()
        assert (after.requires_context, after.ctx_param_name) == (before.requires_context, before.ctx_param_name)


@pytest.mark.slow
def test_llama_index_duplicates_are_blocked_through_the_agent(g):
    example = example_module("llama_index_agent", "llama_index.core")
    tools = g.wrap_tools([example.FunctionTool.from_defaults(example.cancel_order)], blocked_return="already done")
    call = ("cancel_order", {"order_id": 1, "reason": "late"})
    assert_a_repeated_call_is_blocked_through_the_agent(llama_index_run, example, tools, call, "cancelled order 1")
    assert example.CANCELLED == ["order 1 (late)"]


def test_llama_index_duplicates_are_replayed_and_users_scoped_by_workflow(g):
    example = example_module("llama_index_agent", "llama_index.core")
    g.policy("cancel_order", replay=True)
    tools = g.wrap_tools([example.FunctionTool.from_defaults(example.cancel_order)])
    call = ("cancel_order", {"order_id": 1, "reason": "late"})
    for user in ("ada", "bob"):
        with g.workflow(f"user-{user}"):
            assert llama_index_run(example, tools, [call, call]) == ["cancelled order 1"] * 2
    assert example.CANCELLED == ["order 1 (late)"] * 2


def a_notify_function():
    """A plain function for a framework to make a tool of, and the list of whom it notified."""
    runs = []

    def notify(to: str) -> str:
        """Notify someone."""
        runs.append(to)
        return "sent"
    return notify, runs


def test_llama_index_sync_tool_is_one_tool_for_call_and_acall(g):
    tools = framework("llama_index.core.tools")
    notify, runs = a_notify_function()
    [tool] = g.wrap_tools([tools.FunctionTool.from_defaults(notify)], blocked_return="already done")
    assert tool.call(to="a").content == "sent"
    assert asyncio.run(tool.acall(to="a")).content == "already done"
    assert runs == ["a"]


def test_llama_index_tool_with_sync_and_async_functions_and_partial_params_is_one_tool(g):
    tools = framework("llama_index.core.tools")
    runs = []

    def notify(to: str, channel: str) -> str:
        """Notify someone."""
        runs.append(("sync", to, channel))
        return "sent"

    async def anotify(to: str, channel: str) -> str:
        runs.append(("async", to, channel))
        return "sent"

    tool = tools.FunctionTool.from_defaults(fn=notify, async_fn=anotify, partial_params={"channel": "sms"})
    [guarded] = g.wrap_tools([tool], blocked_return="already done")
    assert guarded.metadata.get_parameters_dict() == tool.metadata.get_parameters_dict()
    assert asyncio.run(guarded.acall(to="a")).content == "sent"
    assert guarded.call(to="a").content == "already done"
    assert guarded.call(to="b").content == "sent"
    assert runs == [("async", "a", "sms"), ("sync", "b", "sms")]


def test_llama_index_tool_spec_is_guarded_under_its_function_names(g):
    tool_spec = framework("llama_index.core.tools.tool_spec.base")
    runs = []

    class Billing(tool_spec.BaseToolSpec):
        spec_functions = ["charge"]

        def charge(self, customer: str, cents: int) -> str:
            """Charge a customer."""
            runs.append((customer, cents))
            return "charged"

    spec = Billing()
    guarded = g.wrap_tools(spec, blocked_return="already done")
    assert type(guarded) is Billing
    [before], [after] = spec.to_tool_list(), guarded.to_tool_list()
    assert after.metadata.get_parameters_dict() == before.metadata.get_parameters_dict()
    assert (after.metadata.name, after.metadata.description) == (before.metadata.name, before.metadata.description)
    assert [after.call(customer="a", cents=5).content for _ in range(2)] == ["charged", "already done"]
    assert runs == [("a", 5)] and {h["tool"] for h in g.history()} == {"charge"}


def test_llama_index_once_in_either_order_guards_the_tool(g):
    tools = framework("llama_index.core.tools")
    notify, runs = a_notify_function()
    below = tools.FunctionTool.from_defaults(g.once(notify, name="notify"))
    above = g.once(tools.FunctionTool.from_defaults(notify, name="notify"))
    assert isinstance(above, tools.FunctionTool) and above.metadata.name == below.metadata.name == "notify"
    assert below.metadata.get_parameters_dict() == above.metadata.get_parameters_dict()
    assert below.call(to="a").content == "sent"
    assert above.call(to="a").content == ledger.BLOCKED_MESSAGE  # a framework tool's default
    assert runs == ["a"]


# smolagents ---------------------------------------------------------------

def smolagents_run(example, tools, calls):
    """The sorted tool results of a ToolCallingAgent run whose model asks for `calls` in one step."""
    agent = example.ToolCallingAgent(tools=tools, model=example.ScriptedModel([calls, "done"]), verbosity_level=0)
    agent.run("go")
    return sorted(example.tool_results(agent))


def smolagents_search_tool(runs: list):
    smolagents = framework("smolagents")

    class Search(smolagents.Tool):
        name = "search"
        description = "Search the orders."
        inputs = {"query": {"type": "string", "description": "What to look for."}}
        output_type = "string"

        def forward(self, query: str) -> str:
            runs.append(query)
            return "found " + query

    return Search()


def test_smolagents_tools_keep_name_description_and_inputs(g):
    example = example_module("smolagents_agent", "smolagents")
    tools = [example.refund, smolagents_search_tool([])]
    for before, after in zip(tools, g.wrap_tools(tools)):
        assert type(after) is type(before) and after is not before
        assert (after.name, after.description, after.inputs, after.output_type) == \
               (before.name, before.description, before.inputs, before.output_type)
    assert example.refund(order_id=1, amount=1.0) == "refunded 1.0 on order 1"  # the original stays unguarded


def test_smolagents_tool_subclass_with_a_decorated_forward_keeps_its_decorator(g):
    smolagents = framework("smolagents")
    runs, seen = [], []

    def logged(method):
        @functools.wraps(method)
        def logging_forward(self, *args, **kwargs):
            seen.append(kwargs)
            return method(self, *args, **kwargs)
        return logging_forward

    class Notify(smolagents.Tool):
        name = "notify"
        description = "Notify someone."
        inputs = {"to": {"type": "string", "description": "Who."}}
        output_type = "string"

        @logged
        def forward(self, to: str) -> str:
            runs.append(to)
            return "sent"

    [tool] = g.wrap_tools([Notify()], blocked_return="already done")
    assert [tool(to="a"), tool(to="a")] == ["sent", "already done"]
    assert runs == ["a"] and seen == [{"to": "a"}]


def test_smolagents_duplicates_are_blocked_through_the_agent(g):
    example = example_module("smolagents_agent", "smolagents")
    runs = []
    tools = g.wrap_tools([example.refund, smolagents_search_tool(runs)], blocked_return="already done")
    refund, search = ("refund", {"order_id": 1, "amount": 2.0}), ("search", {"query": "x"})
    assert smolagents_run(example, tools, [refund, refund, search]) == \
           ["already done", "found x", "refunded 2.0 on order 1"]
    assert smolagents_run(example, tools, [search]) == ["already done"]
    assert example.REFUNDS == ["order 1: 2.0"] and runs == ["x"]


def test_smolagents_duplicates_are_replayed_and_users_scoped_by_workflow(g):
    example = example_module("smolagents_agent", "smolagents")
    g.policy("refund", replay=True)
    tools = g.wrap_tools([example.refund])
    call = ("refund", {"order_id": 1, "amount": 2.0})
    for user in ("ada", "bob"):
        with g.workflow(f"user-{user}"):
            assert smolagents_run(example, tools, [call, call]) == ["refunded 2.0 on order 1"] * 2
    assert example.REFUNDS == ["order 1: 2.0"] * 2


@pytest.mark.filterwarnings("ignore:Function .* has decorators other than @tool")  # smolagents' source export
def test_smolagents_once_in_either_order_guards_the_tool(g):
    smolagents = framework("smolagents")
    runs = []

    @g.once
    @smolagents.tool
    def notify(to: str) -> str:
        """Notify someone.

        Args:
            to: Who to notify.
        """
        runs.append(to)
        return "sent"

    @smolagents.tool
    @g.once(name="notify")
    def notify_below(to: str) -> str:
        """Notify someone.

        Args:
            to: Who to notify.
        """
        runs.append(to)
        return "sent"

    assert isinstance(notify, smolagents.Tool) and notify.name == "notify" and notify_below.name == "notify_below"
    assert notify.inputs == notify_below.inputs
    assert [notify(to="a"), notify_below(to="a"), notify(to="b")] == ["sent", BLOCKED, "sent"]
    assert runs == ["a", "b"]


# AutoGen ------------------------------------------------------------------

def autogen_run(example, tools, calls):
    """The sorted tool results of an AssistantAgent run whose model asks for `calls` in one turn."""
    agent = example.AssistantAgent("a", model_client=example.scripted_client([calls, "done"]), tools=tools)
    return sorted(asyncio.run(example.run(agent, "go")))


def test_autogen_function_tool_keeps_name_description_and_schema(g):
    example = example_module("autogen_agent", "autogen_agentchat")
    tool = example.FunctionTool(example.refund, description="Refund an order.", name="refund_order")
    [guarded] = g.wrap_tools([tool])
    assert type(guarded) is type(tool) and guarded is not tool
    assert (guarded.name, guarded.description, guarded.schema) == (tool.name, tool.description, tool.schema)


def test_autogen_cancellation_token_is_passed_on_but_not_fingerprinted(g):
    example = example_module("autogen_agent", "autogen_agentchat")
    [tool] = g.wrap_tools([example.FunctionTool(example.refund, description="Refund.")], blocked_return="already done")
    arguments = {"order_id": 1, "amount": 2.0}
    results = [asyncio.run(tool.run_json(arguments, example.CancellationToken())) for _ in range(2)]
    assert results == ["refunded 2.0 on order 1", "already done"] and example.REFUNDS == ["order 1: 2.0"]


def test_autogen_sync_function_tool_is_guarded_in_its_executor_thread(g):
    tools = framework("autogen_core.tools")
    from autogen_core import CancellationToken
    notify, runs = a_notify_function()
    [tool] = g.wrap_tools([tools.FunctionTool(notify, description="Notify someone.")])
    with g.workflow("user-ada"):  # the scope reaches the thread AutoGen runs a sync tool in
        results = [asyncio.run(tool.run_json({"to": "x"}, CancellationToken())) for _ in range(2)]
    assert results == ["sent", ledger.BLOCKED_MESSAGE] and runs == ["x"]
    assert {h["workflow"] for h in g.history()} == {"user-ada"}


def test_autogen_duplicates_are_blocked_through_the_agent(g):
    example = example_module("autogen_agent", "autogen_agentchat")
    tools = g.wrap_tools([example.FunctionTool(example.refund, description="Refund.")], blocked_return="already done")
    call = ("refund", {"order_id": 1, "amount": 2.0})
    assert_a_repeated_call_is_blocked_through_the_agent(autogen_run, example, tools, call, "refunded 2.0 on order 1")
    assert example.REFUNDS == ["order 1: 2.0"]


def test_autogen_duplicates_are_replayed_and_users_scoped_by_workflow(g):
    example = example_module("autogen_agent", "autogen_agentchat")
    g.policy("refund", replay=True)
    tools = g.wrap_tools([example.FunctionTool(example.refund, description="Refund.")])
    call = ("refund", {"order_id": 1, "amount": 2.0})
    for user in ("ada", "bob"):
        with g.workflow(f"user-{user}"):
            assert autogen_run(example, tools, [call, call]) == ["refunded 2.0 on order 1"] * 2
    assert example.REFUNDS == ["order 1: 2.0"] * 2


def test_autogen_static_workbench_is_guarded_with_its_overrides(g):
    example = example_module("autogen_agent", "autogen_agentchat")
    from autogen_core.tools import StaticWorkbench, ToolOverride
    tool = example.FunctionTool(example.refund, description="Refund.")
    workbench = StaticWorkbench([tool], tool_overrides={"refund": ToolOverride(name="refund_order")})
    guarded = g.wrap_tools(workbench, blocked_return="already done")
    assert type(guarded) is StaticWorkbench and asyncio.run(guarded.list_tools()) == asyncio.run(workbench.list_tools())
    agent = example.AssistantAgent("a", workbench=guarded, model_client=example.scripted_client(
        [[("refund_order", {"order_id": 1, "amount": 2.0})] * 2, "done"]))
    assert sorted(asyncio.run(example.run(agent, "go"))) == ["already done", "refunded 2.0 on order 1"]
    assert example.REFUNDS == ["order 1: 2.0"] and {h["tool"] for h in g.history()} == {"refund"}


@pytest.mark.slow
def test_autogen_once_in_either_order_guards_the_tool(g):
    example = example_module("autogen_agent", "autogen_agentchat")
    above = g.once(example.FunctionTool(example.refund, description="Refund."))
    below = example.FunctionTool(g.once(example.refund), description="Refund.")
    assert isinstance(above, example.FunctionTool) and above.schema == below.schema
    call = ("refund", {"order_id": 1, "amount": 2.0})
    assert autogen_run(example, [above], [call]) == ["refunded 2.0 on order 1"]
    assert autogen_run(example, [below], [call]) == [ledger.BLOCKED_MESSAGE]
    assert autogen_run(example, [g.once(example.refund)], [call]) == [ledger.BLOCKED_MESSAGE]  # a plain function
    assert example.REFUNDS == ["order 1: 2.0"]


# Google ADK ---------------------------------------------------------------

def adk_run(example, tools, calls, user):
    """The sorted tool results of an LlmAgent run for `user` whose model asks for `calls` in one turn."""
    return sorted(asyncio.run(example.run(tools, [calls, "done"], user)))


@pytest.mark.slow
def test_adk_function_tool_keeps_name_description_and_declaration(g):
    example = example_module("google_adk_agent", "google.adk")
    tool = example.FunctionTool(example.refund)
    [guarded] = g.wrap_tools([tool])
    assert type(guarded) is type(tool) and guarded is not tool and guarded.name == tool.name
    assert guarded.description == tool.description
    assert guarded._get_declaration() == tool._get_declaration()  # what the model is shown


@pytest.mark.slow
def test_adk_duplicates_are_blocked_per_user_through_the_agent(g):
    example = example_module("google_adk_agent", "google.adk")
    tools = g.wrap_tools([example.FunctionTool(example.refund)], blocked_return="already done")
    call = ("refund", {"order_id": 1, "amount": 2.0})
    assert adk_run(example, tools, [call, call], "ada") == ["already done", "refunded 2.0 on order 1"]
    assert adk_run(example, tools, [call], "ada") == ["already done"]  # a new session of the same user
    assert adk_run(example, tools, [call], "bob") == ["refunded 2.0 on order 1"]
    assert example.REFUNDS == ["ada: order 1, 2.0", "bob: order 1, 2.0"]


def test_adk_duplicates_are_replayed_through_the_agent(g):
    example = example_module("google_adk_agent", "google.adk")
    g.policy("refund", replay=True)
    tools = g.wrap_tools([example.FunctionTool(example.refund)])
    call = ("refund", {"order_id": 1, "amount": 2.0})
    assert adk_run(example, tools, [call, call], "ada") == ["refunded 2.0 on order 1"] * 2
    assert example.REFUNDS == ["ada: order 1, 2.0"]


@pytest.mark.slow
def test_adk_once_in_either_order_guards_the_tool(g):
    example = example_module("google_adk_agent", "google.adk")
    above = g.once(example.FunctionTool(example.refund), replay=True)
    below = g.once(example.refund, replay=True)  # ADK makes a FunctionTool of a plain function itself
    assert isinstance(above, example.FunctionTool)
    assert above._get_declaration() == example.FunctionTool(below)._get_declaration()
    call = ("refund", {"order_id": 1, "amount": 2.0})
    for tool in (above, below):
        assert adk_run(example, [tool], [call, call], "ada") == ["refunded 2.0 on order 1"] * 2
    assert example.REFUNDS == ["ada: order 1, 2.0"]  # one function, guarded either way, is one tool


def test_adk_once_below_returns_a_blocked_message_the_model_can_read(g):
    example = example_module("google_adk_agent", "google.adk")
    tool = example.FunctionTool(g.once(example.refund))
    call = ("refund", {"order_id": 1, "amount": 2.0})
    assert adk_run(example, [tool], [call, call], "ada") == [ledger.BLOCKED_MESSAGE, "refunded 2.0 on order 1"]


# CrewAI -------------------------------------------------------------------
# CrewAI pins versions of mcp, openai and pydantic that the frameworks above
# cannot share, so it has an environment of its own (.ci/run makes it): where
# crewai is not installed and LEDGER_TEST_CREWAI_PYTHON names that environment's
# interpreter, one test runs the crewai tests there (and the crewai example runs
# there too); elsewhere they run here.

CREWAI_PYTHON = os.environ.get("LEDGER_TEST_CREWAI_PYTHON")
CREWAI_ELSEWHERE = bool(CREWAI_PYTHON) and not has_module("crewai")


def crewai(module: str):
    """A crewai module, imported with its telemetry off (as the example does): the tests stay offline."""
    need(module, has_module("crewai"), "CrewAI needs an environment of its own: pip install -e '.[test,crewai]' "
         "in a virtualenv and run the tests there, or set LEDGER_TEST_CREWAI_PYTHON to its python (as .ci/run does)")
    os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")
    return importlib.import_module(module)


def crewai_example():
    crewai("crewai")
    return example_module("crewai_crew", "crewai")


def crewai_search_tool(runs: list):
    tools = crewai("crewai.tools")

    class Search(tools.BaseTool):
        name: str = "search"
        description: str = "Search the orders."

        def _run(self, query: str) -> str:
            runs.append(query)
            return "found " + query

    return Search()


if CREWAI_ELSEWHERE:
    @pytest.mark.slow
    def test_the_crewai_tests_pass_in_their_own_environment(tmp_path):
        wanted = len(re.findall(r"^    def test_crewai_", (HERE / "test_ledger.py").read_text(), re.M))
        env = {**os.environ, "PYTHONPATH": str(HERE), "LEDGER_TEST_REQUIRE_ALL": "1"}
        done = subprocess.run([CREWAI_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_crewai_",
                               str(HERE / "test_ledger.py")], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert re.search(rf"^{wanted} passed, \d+ deselected", done.stdout, re.M), done.stdout[-3000:]
else:
    def test_crewai_tools_keep_name_description_and_schema(g):
        example = crewai_example()
        tools = [example.refund, crewai_search_tool([])]
        for before, after in zip(tools, g.wrap_tools(tools)):
            assert type(after) is type(before) and after is not before
            assert (after.name, after.description) == (before.name, before.description)
            assert after.args_schema.model_json_schema() == before.args_schema.model_json_schema()

    def test_crewai_duplicates_are_blocked_through_the_crew(g):
        example = crewai_example()
        runs = []
        tools = g.wrap_tools([example.refund, crewai_search_tool(runs)], blocked_return="already done")
        script = [("refund", {"order_id": 1, "amount": 2.0}), ("search", {"query": "x"}), "done"]
        assert example.run(tools, script) == ["refunded 2.0 on order 1", "found x"]
        assert example.run(tools, script) == ["already done", "already done"]  # the crew run again
        assert example.REFUNDS == ["order 1: 2.0"] and runs == ["x"]

    def test_crewai_duplicates_are_replayed_and_users_scoped_by_workflow(g):
        example = crewai_example()
        g.policy("refund", replay=True)
        tools = g.wrap_tools([example.refund])
        script = [("refund", {"order_id": 1, "amount": 2.0}), "done"]
        for user in ("ada", "bob", "ada"):
            with g.workflow(f"user-{user}"):
                assert example.run(tools, script) == ["refunded 2.0 on order 1"]
        assert example.REFUNDS == ["order 1: 2.0"] * 2

    def test_crewai_once_in_either_order_guards_the_tool(g):
        tools = crewai("crewai.tools")
        runs = []

        @g.once
        @tools.tool("notify")
        def notify(to: str) -> str:
            """Notify someone."""
            runs.append(to)
            return "sent"

        @tools.tool("notify")
        @g.once(name="notify")
        def notify_below(to: str) -> str:
            """Notify someone."""
            runs.append(to)
            return "sent"

        assert isinstance(notify, tools.BaseTool) and type(notify) is type(notify_below)
        assert notify.args_schema.model_json_schema() == notify_below.args_schema.model_json_schema()
        assert [notify.run(to="a"), notify_below.run(to="a"), notify_below.run(to="b")] == \
               ["sent", ledger.BLOCKED_MESSAGE, "sent"]
        assert runs == ["a", "b"]

    def test_crewai_basetool_subclass_is_guarded_through_run_and_structured_tool(g):
        runs = []
        [search] = g.wrap_tools([crewai_search_tool(runs)], blocked_return="already done")
        assert search.run(query="x") == "found x"
        assert search.to_structured_tool().invoke({"query": "x"}) == "already done"
        assert runs == ["x"]


# ---------------------------------------------------------------------------
# Stores: memory and SQLite specifics, and the ledger-once files they carry over.
# ---------------------------------------------------------------------------

def pragma(store: SQLiteStore, name: str):
    return store._run(f"PRAGMA {name}", (), ledger._fetch_one)[0]


def test_sqlite_uses_wal_and_normal_sync_by_default_and_full_when_durable(tmp_path):
    plain, durable = SQLiteStore(tmp_path / "a.db"), SQLiteStore(tmp_path / "b.db", durable=True)
    assert pragma(plain, "journal_mode") == "wal"
    assert pragma(plain, "synchronous") == 1
    assert pragma(durable, "synchronous") == 2


def test_sqlite_gives_each_thread_its_own_connection(tmp_path):
    store = SQLiteStore(tmp_path / "a.db")
    other = []
    t = threading.Thread(target=lambda: (store.get("x"), other.append(store._connection().conn)))
    t.start()
    t.join()
    assert other[0] is not None and other[0] is not store._connection().conn


def statements_of(store: SQLiteStore) -> list[str]:
    """The first word of each statement this thread's connection runs from now on."""
    seen: list[str] = []
    store.get("")   # this thread's connection, opened
    store._connection().conn.set_trace_callback(lambda sql: seen.append(sql.split()[0]))
    return seen


def test_sqlite_claims_a_new_call_after_one_without_reading_first(tmp_path):
    guard = Guard(str(tmp_path / "l.db"), quiet=True, secret="s")
    path = str(tmp_path / "runs")
    guard(log_run, path, "first")
    seen = statements_of(guard.store)
    guard(log_run, path, "second")
    assert seen == ["INSERT", "UPDATE"] and len(runs_of(path)) == 2


def test_sqlite_answers_a_duplicate_after_one_with_a_single_read(tmp_path):
    guard = Guard(str(tmp_path / "l.db"), quiet=True, secret="s")
    path = str(tmp_path / "runs")
    guard(log_run, path, "a"), guard(log_run, path, "b")
    assert guard(log_run, path, "a") is BLOCKED   # the look that finds a record
    seen = statements_of(guard.store)
    assert guard(log_run, path, "b") is BLOCKED
    assert seen == ["SELECT"] and len(runs_of(path)) == 2


def test_sqlite_answers_a_duplicate_after_a_new_call_while_another_process_holds_the_write_lock(tmp_path):
    guard = Guard(SQLiteStore(tmp_path / "l.db", timeout=5.0), quiet=True, secret="s")
    path = str(tmp_path / "runs")
    guard(log_run, path, "a"), guard(log_run, path, "b")   # this thread now tries the claim first
    with sqlite_write_locked(guard.store.path):
        began = time.monotonic()
        assert guard(log_run, path, "a") is BLOCKED
        took = time.monotonic() - began
    assert took < 1.0 and len(runs_of(path)) == 2   # the read answered; the claim did not wait for the lock


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=25))
def test_sqlite_runs_each_call_once_whatever_the_order_of_new_calls_and_duplicates(calls):
    # Each step calls one of six calls, through this process's guard or through a second
    # guard on the same file that stands for another process: the first guard's
    # thread then meets records it never looked at, in whichever order it tries first.
    with tempfile.TemporaryDirectory() as folder:
        here, there = (Guard(os.path.join(folder, "l.db"), quiet=True, secret="s") for _ in range(2))
        path, ran = os.path.join(folder, "runs"), set()
        for n, elsewhere in calls:
            value = (there if elsewhere else here)(log_run, path, str(n))
            assert value == (BLOCKED if n in ran else f"{n}-{os.getpid()}")
            ran.add(n)
        assert len(runs_of(path)) == len(ran)
        here.close(), there.close()


def _open_connections(store: SQLiteStore) -> list:
    return [slot.conn for slot in store._connections if slot.conn is not None]


def test_closing_a_guard_closes_every_threads_connection_and_they_reopen(tmp_path):
    guard = Guard(str(tmp_path / "l.db"), quiet=True, secret="s")
    path, done = str(tmp_path / "runs"), threading.Event()

    def worker(n):   # a thread that lives on after its call, as in a pool
        guard(log_run, path, str(n))
        done.wait(30)
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    [t.start() for t in threads]
    wait_for(lambda: len(runs_of(path)) == 3, what="the three calls")
    guard.store.get("")   # this thread's connection, beside the three workers' (and perhaps the counter thread's)
    wait_for(lambda: len(_open_connections(guard.store)) >= 4, what="the threads' connections")
    opened = _open_connections(guard.store)
    guard.close()
    assert _open_connections(guard.store) == []
    for conn in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")
    done.set()
    [t.join() for t in threads]
    assert guard(log_run, path, "after-close") == f"after-close-{os.getpid()}" and len(runs_of(path)) == 4


def test_a_statement_waiting_for_another_process_holds_up_neither_close_nor_fork(tmp_path):
    store, errors = SQLiteStore(tmp_path / "l.db", timeout=2.0), []

    def write():
        try:
            store.insert(scratch_record("r1"))
        except ledger.StoreError as e:
            errors.append(str(e))
    with sqlite_write_locked(store.path):
        writer = threading.Thread(target=write)
        started = time.monotonic()
        writer.start()
        time.sleep(0.2)   # the insert is now waiting for the lock
        store.close()
        closed = time.monotonic() - started
        child = forked(os._exit, 0)
        child.start()
        child.join(10)
        forked_at = time.monotonic() - started
        writer.join(10)
        failed_at = time.monotonic() - started
    assert closed < 0.5 and forked_at < 1.0, (closed, forked_at)
    assert 2.0 <= failed_at < 4.0 and errors and "held its write lock for 2s" in errors[0]
    assert store.get("r1") is None and store.insert(scratch_record("r1")) is True


def test_sqlite_records_the_schema_version(tmp_path):
    SQLiteStore(tmp_path / "a.db")
    assert sqlite3.connect(tmp_path / "a.db").execute("PRAGMA user_version").fetchone()[0] == ledger.SCHEMA_VERSION


def test_sqlite_refuses_a_database_from_a_newer_version(tmp_path):
    conn = sqlite3.connect(tmp_path / "a.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ledger.StoreError, match="newer"):
        SQLiteStore(tmp_path / "a.db")


SCHEMA_1_SQLITE = [  # a ledger file as ledger.py wrote it before prune existed
    "CREATE TABLE records (" + ", ".join(f"{f} {ledger._sqlite_type(f)}" for f in ledger.RECORD_FIELDS)
    + ", PRIMARY KEY (id)) WITHOUT ROWID",
    "CREATE INDEX records_workflow ON records (workflow)",
    "PRAGMA user_version = 1",
]


def old_ledger_file(path: pathlib.Path, records: list[Record]) -> None:
    conn = sqlite3.connect(path)
    for sql in SCHEMA_1_SQLITE:
        conn.execute(sql)
    conn.executemany(ledger._SQL_INSERT, [ledger._record_values(r) for r in records])
    conn.commit()
    conn.close()


def as_schema_1(path) -> None:
    """Turn a ledger file into what ledger.py wrote before the lease clock (schema 1)."""
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE clock")
    for index in ("records_finished", "records_expiring"):   # schema 1 had no prune indexes either
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("create", [True, False])
def test_sqlite_upgrades_a_schema_1_file_in_place_keeping_every_record(tmp_path, create):
    now = time.time()
    records = [finished_record(1, now - 7200), finished_record(2, now, status="RUNNING"), finished_record(3, now)]
    old_ledger_file(tmp_path / "a.db", records)
    store = SQLiteStore(tmp_path / "a.db", create=create)
    assert [r.as_dict() for r in store.records()] == [r.as_dict() for r in records]
    conn = sqlite3.connect(tmp_path / "a.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == ledger.SCHEMA_VERSION
    indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"records_finished", "records_expiring"} <= indexes
    assert store.prune(now - 3600, now) == {("SUCCESS", "t"): 1}


def test_sqlite_prune_selects_through_its_indexes_never_a_full_scan(tmp_path):
    SQLiteStore(tmp_path / "a.db").close()
    conn = sqlite3.connect(tmp_path / "a.db")
    for statuses, workflow in [(ledger.PRUNABLE, None), (("FAILED",), None), (ledger.PRUNABLE, "w")]:
        for (where, params), index in zip(ledger._sql_prune_passes(1.0, 2.0, statuses, workflow, "?"),
                                          ["records_expiring", "records_finished"]):
            plan = " ".join(row[-1] for row in conn.execute(
                f"EXPLAIN QUERY PLAN SELECT id, status, tool FROM records WHERE {where} LIMIT 10", params))
            assert "SEARCH records USING INDEX" in plan and "SCAN" not in plan, plan
            if workflow is None:
                assert index in plan


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sqlite_prunes_a_million_records_in_batches_without_loading_them(tmp_path):
    """The figure quoted in the README: 1,000,000 records, 600,000 of them prunable."""
    import tracemalloc
    now = time.time()
    path = tmp_path / "big.db"
    SQLiteStore(path).close()

    template = finished_record(0, now).as_dict()
    fields = list(template)

    def rows():
        for n in range(1_000_000):
            kind = n % 10
            row = {**template, "id": f"r{n}", "run_key": f"r{n}", "tool": f"tool{n % 7}", "workflow": f"wf{n % 100}",
                   "status": "RUNNING" if kind == 0 else "FAILED" if kind == 1 else "SUCCESS",
                   "updated": now - 86400 * 40 if kind < 7 else now - 60}   # kinds 0..6 old, 7..9 recent
            yield [row[f] for f in fields]

    conn = sqlite3.connect(path)
    started = time.perf_counter()
    with conn:
        conn.executemany(ledger._SQL_INSERT, rows())
    loaded = time.perf_counter() - started
    conn.close()
    guard = Guard(str(path), quiet=True)
    tracemalloc.start()
    started = time.perf_counter()
    report = guard.prune(30 * 86400)
    pruned = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"\nprune of 1,000,000 SQLite records: loaded in {loaded:.1f}s, removed {report['removed']:,} "
          f"in {pruned:.1f}s, Python memory peak {peak / 1e6:.1f} MB", file=sys.stderr)
    assert report["removed"] == 600_000
    totals: dict = {}
    for row in report["counts"]:
        totals[row["status"]] = totals.get(row["status"], 0) + row["count"]
    assert totals == {"SUCCESS": 500_000, "FAILED": 100_000} and len(report["counts"]) == 14
    by_status = dict(sqlite3.connect(path).execute("SELECT status, COUNT(*) FROM records GROUP BY status"))
    assert by_status == {"RUNNING": 100_000, "SUCCESS": 300_000}
    assert peak < 20e6   # a batch at a time, not a million records


def test_a_schema_1_file_keeps_its_records_and_their_leases(tmp_path):
    path, runs = tmp_path / "old.db", str(tmp_path / "runs")
    guard = Guard(str(path), quiet=True, secret="s")
    guard(log_run, runs, "done")
    wall = time.time()   # schema 1 kept leases in wall time
    live, stale = (scratch_record(id).evolve(lease_until=wall + delta) for id, delta in (("live", 60), ("stale", -1)))
    guard.store.insert(live)
    guard.store.insert(stale)
    guard.close()
    as_schema_1(path)
    before = sorted(r.as_dict().items() for r in records_of_file(path))
    assert run_cli("show", "--db", path).returncode == 0   # a read-only command opens it too
    store = SQLiteStore(path)
    assert pragma(store, "user_version") == ledger.SCHEMA_VERSION
    assert sorted(r.as_dict().items() for r in store.records()) == before
    now = store.now()
    assert not store.get("live").stale(now) and store.get("stale").stale(now)
    assert Guard(store, quiet=True, secret="s")(log_run, runs, "done") is BLOCKED and len(runs_of(runs)) == 1


def records_of_file(path) -> list[Record]:
    conn = sqlite3.connect(path)
    try:
        return [Record(*row) for row in conn.execute(f"SELECT {', '.join(ledger.RECORD_FIELDS)} FROM records")]
    finally:
        conn.close()


def test_after_a_reboot_running_calls_are_expired_and_ttl_windows_carry_over(tmp_path):
    path = tmp_path / "l.db"
    store = SQLiteStore(path)
    now = store.now()
    store.insert(scratch_record("running").evolve(lease_until=now + 3600))
    store.insert(scratch_record("cached", expires=now + 600).evolve(status="SUCCESS", lease_until=now))
    store.close()
    conn = sqlite3.connect(path)   # as if the file was last used in an earlier boot
    conn.execute("UPDATE clock SET boot = 'an-earlier-boot'")
    conn.commit()
    conn.close()
    rebooted = SQLiteStore(path)
    now = rebooted.now()
    assert rebooted.get("running").stale(now), "its process is gone"
    assert 590 < rebooted.get("cached").expires - now <= 600, "the ttl window goes on, bridged by wall time"
    assert rebooted._run("SELECT boot FROM clock", (), ledger._fetch_all) == [(ledger._boot_id(),)]


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


def test_a_file_that_is_no_database_is_named_and_moving_it_aside_is_said_to_forget_every_call(tmp_path):
    (tmp_path / "l.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ledger.StoreError, match="not an SQLite database") as err:
        Guard(str(tmp_path / "l.db"))(charge, 1)
    assert "point LEDGER_DB at the ledger" in str(err.value) and "forgets every past call" in str(err.value)


def test_a_path_that_is_a_directory_fails_clearly(tmp_path):
    with pytest.raises(ledger.StoreError, match="cannot open"):
        Guard(str(tmp_path))(charge, 1)


def test_the_database_and_its_wal_and_shm_are_created_readable_by_the_owner_only(tmp_path):
    guard = Guard(str(tmp_path / "l.db"), quiet=True)
    guard(charge, 1)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    guard.close()
    assert modes == {"l.db": 0o600, "l.db-wal": 0o600, "l.db-shm": 0o600, "l.db.key": 0o600}


def test_an_existing_database_keeps_its_mode(tmp_path):
    SQLiteStore(tmp_path / "l.db").close()
    os.chmod(tmp_path / "l.db", 0o640)
    Guard(str(tmp_path / "l.db"), quiet=True)(charge, 1)
    assert (tmp_path / "l.db").stat().st_mode & 0o777 == 0o640


def test_a_signing_key_readable_by_others_draws_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("LEDGER_SECRET", raising=False)
    Guard(str(tmp_path / "l.db"), quiet=True)(charge, 1)
    os.chmod(tmp_path / "l.db.key", 0o644)
    with caplog.at_level("WARNING", logger="ledger"):
        Guard(str(tmp_path / "l.db"), quiet=True)(charge, 2)
    assert "can be read by other users" in caplog.text and "chmod 600" in caplog.text


@contextlib.contextmanager
def small_filesystem(tmp_path, size="64k", options=""):
    """A real tmpfs of its own (mounting needs root), unmounted afterwards."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(mount)],
                          capture_output=True)
    need("a tmpfs mount", done.returncode == 0, "run the tests as root (mount -t tmpfs)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder) -> None:
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"x" * 4096)


def test_a_full_disk_while_creating_the_signing_key_is_a_store_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LEDGER_SECRET", raising=False)
    with small_filesystem(tmp_path) as mount:
        fill(mount)
        with pytest.raises(ledger.StoreError, match="cannot create the signing key.*Free space"):
            ledger._key_file(str(mount / "l.db.key"))
        assert sorted(p.name for p in mount.iterdir()) == ["filler"]


def test_a_read_only_filesystem_is_named_as_such(tmp_path):
    with small_filesystem(tmp_path) as mount:
        Guard(str(mount / "l.db"), quiet=True, secret="s").close()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(ledger.StoreError, match="is on a read-only filesystem.*remount it") as err:
            Guard(str(mount / "l.db"), quiet=True, secret="s")(charge, 1)
    assert "move it aside" not in str(err.value) and CHARGES == []


def _open_as_nobody(path, queue):
    os.setgid(65534)
    os.setuid(65534)
    try:
        Guard(path, quiet=True, secret="s")(charge, 1)
        queue.put("ran")
    except ledger.StoreError as e:
        queue.put(str(e))


def test_a_database_this_user_may_not_write_is_a_permission_problem(tmp_path):
    need("root", os.geteuid() == 0, "run as root, so that a child can become another user")
    folder = pathlib.Path(tempfile.mkdtemp(prefix="ledger-perm-"))   # reachable by another user
    try:
        folder.chmod(0o755)
        Guard(str(folder / "l.db"), quiet=True, secret="s").close()
        queue = FORK.Queue()
        child = forked(_open_as_nobody, str(folder / "l.db"), queue)
        child.start()
        message = queue.get(timeout=30)
        child.join(10)
    finally:
        shutil.rmtree(folder)
    assert "is not writable by this user (uid 65534; it belongs to uid 0" in message
    assert "move it aside" not in message


def test_a_full_disk_advises_freeing_space(tmp_path):
    with small_filesystem(tmp_path, size="256k") as mount:
        guard = Guard(str(mount / "l.db"), quiet=True, secret="s")
        guard(charge, 0)
        fill(mount)
        with pytest.raises(ledger.StoreError, match="disk is full"):
            for n in range(1, 1000):
                guard(charge, n, currency="x" * 4000)
        (mount / "filler").unlink()
        guard.close()


def _write_past_a_file_size_limit(path, queue):
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit then fails with EFBIG
    guard = Guard(path, quiet=True, secret="s")
    guard(charge, 0)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        for n in range(1, 1000):
            guard(charge, n, currency="x" * 5000)
        queue.put("no error")
    except ledger.LedgerError as e:
        queue.put(str(e))


@pytest.mark.slow
def test_an_io_error_advises_on_the_disk_not_on_moving_the_ledger(tmp_path):
    queue = FORK.Queue()
    child = forked(_write_past_a_file_size_limit, str(tmp_path / "l.db"), queue)
    child.start()
    message = queue.get(timeout=60)
    child.join(10)
    assert "disk I/O error" in message and "disk failed to read or write" in message
    assert "move it aside" not in message


def test_a_database_locked_by_another_process_names_the_lock(tmp_path):
    SQLiteStore(tmp_path / "l.db").close()
    holder = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ledger.StoreError, match="holds a lock on it") as err:
            Guard(SQLiteStore(tmp_path / "l.db", timeout=0.1), quiet=True, secret="s")(charge, 1)
    finally:
        holder.rollback()
        holder.close()
    assert "move it aside" not in str(err.value) and CHARGES == []


def test_a_corrupt_ledger_is_advised_to_be_recovered_and_warned_that_a_new_one_forgets(tmp_path):
    g = Guard(str(tmp_path / "l.db"), quiet=True, secret="s")
    for n in range(200):
        g(charge, n)
    g.close()
    data = bytearray((tmp_path / "l.db").read_bytes())
    data[4096:len(data)] = b"\xff" * (len(data) - 4096)   # every page but the header page
    (tmp_path / "l.db").write_bytes(bytes(data))
    with pytest.raises(ledger.StoreError) as err:
        Guard(str(tmp_path / "l.db"), quiet=True, secret="s")(charge, 1000)
    assert "forgets every past call" in str(err.value) and f"sqlite3 {tmp_path / 'l.db'} .recover" in str(err.value)
    assert [order for order, *_ in CHARGES] == list(range(200))   # the call after it did not run


def _use_after_fork(store, queue):
    guard = Guard(store, quiet=True, secret="s")
    queue.put(guard(charge, 99))


def test_sqlite_is_safe_after_fork(tmp_path):
    store = SQLiteStore(tmp_path / "l.db")
    guard = Guard(store, quiet=True, secret="s")
    guard(charge, 1)
    queue = FORK.Queue()
    child = forked(_use_after_fork, store, queue)
    child.start()
    assert queue.get(timeout=10) == {"charged": 10.0, "order": 99}
    child.join()
    assert guard(charge, 99) is BLOCKED and guard(charge, 2)["order"] == 2


def _jobs_in_a_forked_worker(guard, path, jobs, started, go_on):
    for job in jobs:
        guard(log_run, path, f"job-{job}", key=f"job-{job}")
        if job == jobs[0]:
            started.set()
            go_on.wait(30)


def _jobs_in_a_forked_worker_with_its_own_guard(db, path, jobs, started, go_on):
    _jobs_in_a_forked_worker(Guard(db, quiet=True, secret="s"), path, jobs, started, go_on)


@pytest.mark.slow
@pytest.mark.parametrize("own_guard", [False, True], ids=["parents-guard", "own-guard"])
@pytest.mark.parametrize("parent_keeps_using_it", [False, True], ids=["parent-closes", "parent-keeps-using"])
@pytest.mark.parametrize("used_before", [True, False], ids=["used-before-fork", "unused-before-fork"])
def test_forked_workers_lose_no_record_while_an_operator_reads_the_file(tmp_path, own_guard, parent_keeps_using_it,
                                                                          used_before):
    db, path, jobs = str(tmp_path / "l.db"), str(tmp_path / "runs"), list(range(10))
    guard = Guard(db, quiet=True, secret="s")
    guard(log_run, path, "warm-up", key="warm-up")
    if not used_before:   # the parent made the file, then closed it: no connection is open when it forks
        guard.close()
    for round in range(2):   # a second round of workers finds every job done
        started, go_on = FORK.Event(), FORK.Event()
        target = _jobs_in_a_forked_worker_with_its_own_guard if own_guard else _jobs_in_a_forked_worker
        worker = forked(target, db if own_guard else guard, path, jobs, started, go_on)
        worker.start()
        assert started.wait(30)
        if parent_keeps_using_it:
            guard(log_run, path, f"parent-{round}", key=f"parent-{round}")
        else:
            guard.close()
        assert run_cli("show", "--db", db).returncode == 0   # an operator opens and closes the file
        go_on.set()
        worker.join(60)
        assert worker.exitcode == 0
    calls = 1 + len(jobs) + (2 if parent_keeps_using_it else 0)
    keys = [line.split()[1] for line in runs_of(path)]
    assert (len(keys), len(set(keys))) == (calls, calls), "every call runs exactly once"
    records = SQLiteStore(db).records()
    assert sorted(r.run_key for r in records) == sorted(keys) and {r.status for r in records} == {"SUCCESS"}


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


def test_sqlite_without_create_refuses_a_missing_file_and_makes_none(tmp_path):
    with pytest.raises(ledger.StoreError, match="no ledger database at"):
        ledger.open_store(str(tmp_path / "missing.db"), create=False)
    assert list(tmp_path.iterdir()) == []


def test_sqlite_without_create_leaves_a_file_that_is_no_ledger_as_it_was(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    before = path.read_bytes()
    with pytest.raises(ledger.StoreError, match="not a ledger database"):
        SQLiteStore(path, create=False)
    assert path.read_bytes() == before

# ledger-once databases. ledger-once 0.1.5 runs from its own virtualenv (its module is
# also `ledger`, so it never shares a process with ours), writes a real database, and
# then ledger.py opens the same folder: no call it recorded as done may run again.

LEDGER_ONCE_PYTHON = os.environ.get("LEDGER_TEST_LEDGER_ONCE")

LEGACY_TOOLS = '''
import json, os

EFFECTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "effects.txt")


def effect(*what):
    with open(EFFECTS, "a") as f:
        f.write(" ".join(map(str, what)) + "\\n")


def charge(order_id, amount, currency="usd"):
    effect("charge", order_id, amount, currency)
    return {"charged": amount, "order": order_id}


def send_email(to, sent_at=None):
    effect("email", to, sent_at)
    return "sent"


def book(a, b=0, c=None):
    effect("book", json.dumps([a, b, c]))
    return [a, b, c]


async def post_webhook(url, payload=None):
    effect("webhook", url)
    return 200


def spread(first, *rest, flag=False, **options):
    effect("spread", json.dumps([first, rest, flag, options]))
    return "spread"


def flaky(n):
    effect("flaky", n)
    raise RuntimeError("card declined")


def crash(n):
    effect("crash", n)
    if os.environ.get("LEGACY_CRASH"):  # only in the process that ledger-once runs
        os._exit(3)
    return "survived"


class Mailer:
    def send(self, to):
        effect("mailer.send", to)
        return "sent"


def make_notifier(channel):
    def notify(to):
        effect("notify", channel, to)
        return "notified"
    return notify
'''


class LedgerOnceFolder:
    """A folder with a tools module that ledger-once (in a subprocess) and this process share."""

    def __init__(self, folder: pathlib.Path, python: str):
        self.folder, self.python = folder, python
        self.module = "legacy_tools_" + uuid.uuid4().hex[:8]
        (folder / f"{self.module}.py").write_text(LEGACY_TOOLS)
        self.db = folder / "ledger.db"

    def record(self, code: str, expect_exit: int = 0, crash: bool = False) -> None:
        """Run `code` under ledger-once, with `guard` and `tools` (the shared module) at hand."""
        prelude = textwrap.dedent(f"""
            import ledger
            assert hasattr(ledger, "_Engine"), "not ledger-once: " + ledger.__file__
            from ledger import guard
            guard.quiet()
            import {self.module} as tools
        """)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LEDGER_DB", "LEDGER_WORKFLOW")}
        env.update({"LEGACY_CRASH": "1"} if crash else {})
        done = subprocess.run([self.python, "-c", prelude + textwrap.dedent(code)], cwd=self.folder, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == expect_exit, done.stderr

    def tools(self):
        """The same module, imported here under the same name (so its functions are the same tools)."""
        if self.module not in sys.modules:
            spec = importlib.util.spec_from_file_location(self.module, self.folder / f"{self.module}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[self.module] = module
            spec.loader.exec_module(module)
        return sys.modules[self.module]

    def effects(self) -> list[str]:
        path = self.folder / "effects.txt"
        return path.read_text().splitlines() if path.exists() else []

    def guard(self) -> Guard:
        return Guard(str(self.db), quiet=True)

    def legacy_rows(self) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return conn.execute("SELECT * FROM ledger ORDER BY id").fetchall()


@pytest.fixture
def ledger_once(tmp_path):
    need("ledger-once 0.1.5", bool(LEDGER_ONCE_PYTHON) and os.path.exists(LEDGER_ONCE_PYTHON or ""),
         "set LEDGER_TEST_LEDGER_ONCE to the python of a virtualenv with `pip install ledger-once==0.1.5` "
         "(.ci/run makes one)")
    folder = LedgerOnceFolder(tmp_path, LEDGER_ONCE_PYTHON)
    yield folder
    sys.modules.pop(folder.module, None)


@pytest.mark.slow
def test_no_call_ledger_once_recorded_as_done_runs_again_after_the_swap(ledger_once):
    ledger_once.record("""
        guard(tools.charge, order_id=1, amount=9.99)
        guard(tools.charge, 2, 5.0)                                    # positional
        guard(tools.send_email, to="a@x.io", sent_at="08:00", key="welcome-a")
        guard.workflow("order-42")                                     # its statement style
        guard(tools.charge, order_id=42, amount=1.0)
        guard.workflow("default")
        guard.wrap_tools({"bill": tools.charge})["bill"](order_id=3, amount=2.5)
    """)
    ran = ledger_once.effects()
    tools, g = ledger_once.tools(), ledger_once.guard()
    assert g(tools.charge, 1, 9.99) is BLOCKED                        # spelled positionally now
    assert g(tools.charge, amount=5.0, order_id=2, currency="usd") is BLOCKED
    assert g(tools.send_email, to="a@x.io", sent_at="09:30", key="welcome-a") is BLOCKED
    g.workflow("order-42")
    assert g(tools.charge, 42, 1.0) is BLOCKED
    g.workflow("default")
    assert g.wrap_tools({"bill": tools.charge})["bill"](3, 2.5) is BLOCKED
    assert ledger_once.effects() == ran


AGENT_SCRIPT = """
import os
from ledger import guard

def charge(order_id, amount):
    with open("effects.txt", "a") as f:
        f.write(f"charge {order_id}\\n")
    return {"charged": amount}

guard.quiet()
guard.workflow("order-42")
guard.as_caller("agent-A")
print(guard(charge, 42, 9.99), guard(charge, order_id=43, amount=1.0, key="charge-43"))
"""


@pytest.mark.slow
def test_the_same_agent_script_run_again_after_the_swap_runs_nothing_twice(ledger_once):
    (ledger_once.folder / "agent.py").write_text(AGENT_SCRIPT)  # its tools live in __main__
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LEDGER_DB", "LEDGER_WORKFLOW")}
    before = subprocess.run([ledger_once.python, "agent.py"], cwd=ledger_once.folder, env=env,
                            capture_output=True, text=True, timeout=120)
    after = subprocess.run([sys.executable, "agent.py"], cwd=ledger_once.folder, capture_output=True, text=True,
                           env={**env, "PYTHONPATH": str(HERE)}, timeout=120)
    assert before.stdout.split() == ["{'charged':", "9.99}", "{'charged':", "1.0}"], before.stderr
    assert after.stdout == f"{ledger.BLOCKED_MESSAGE} {ledger.BLOCKED_MESSAGE}\n", after.stderr   # str(BLOCKED)
    assert ledger_once.effects() == ["charge 42", "charge 43"]


@pytest.mark.slow
def test_an_async_call_ledger_once_recorded_does_not_run_again(ledger_once):
    ledger_once.record("""
        import asyncio
        asyncio.run(guard(tools.post_webhook, url="https://h", payload={"b": 1, "a": 2}))
    """)
    tools, g = ledger_once.tools(), ledger_once.guard()
    g.policy(tools.post_webhook, replay=True)

    async def main():
        return await g(tools.post_webhook, "https://h", {"a": 2, "b": 1})
    assert asyncio.run(main()) == 200 and ledger_once.effects() == ["webhook https://h"]


@pytest.mark.slow
def test_a_replay_policy_gets_the_result_ledger_once_recorded(ledger_once):
    ledger_once.record("guard(tools.charge, order_id=7, amount=3.5)")
    tools, g = ledger_once.tools(), ledger_once.guard()
    g.policy(tools.charge, replay=True)
    assert g(tools.charge, 7, 3.5) == {"charged": 3.5, "order": 7}
    assert g.execute(tools.charge, 7, 3.5).source == "replayed"
    assert ledger_once.effects() == ["charge 7 3.5 usd"]


@pytest.mark.slow
def test_a_different_call_still_runs_after_the_swap(ledger_once):
    ledger_once.record("""
        guard(tools.charge, order_id=1, amount=9.99)
        guard(tools.send_email, to="a@x.io", key="welcome-a")
    """)
    tools, g = ledger_once.tools(), ledger_once.guard()
    assert g(tools.charge, 1, 10.0) == {"charged": 10.0, "order": 1}
    assert g.workflow("other")(tools.charge, 1, 9.99) == {"charged": 9.99, "order": 1}
    assert g(tools.send_email, to="a@x.io", key="welcome-b") == "sent"
    assert ledger_once.effects()[2:] == ["charge 1 10.0 usd", "charge 1 9.99 usd", "email a@x.io None"]


def set_lease_clock_off_by(db: pathlib.Path, seconds: float) -> None:
    """Give the file a lease clock `seconds` off its wall clock, as a worker whose wall clock was
    that far off leaves it when it made the schema and stopped before carrying ledger-once's
    calls over (or while another process carries them over)."""
    need("a boot id and CLOCK_BOOTTIME", ledger._boot_id() is not None, "the lease clock is the wall clock here")
    store, real_time = object.__new__(SQLiteStore), time.time
    store.path, store.create = str(db), True
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        time.time = lambda: real_time() + seconds
        try:
            store._migrate(conn)
        finally:
            time.time = real_time
        base = conn.execute("SELECT base FROM clock").fetchone()[0]
    assert abs(time.clock_gettime(ledger._BOOTTIME) + base - time.time() - seconds) < 60


# The file's lease clock as the carrying-over worker's wall clock reads it, or hours behind or ahead of it.
LEASE_CLOCK_OFFSETS = [0, -3 * 3600, 3 * 3600]


@pytest.mark.slow
@pytest.mark.parametrize("lease_clock", LEASE_CLOCK_OFFSETS)
def test_a_call_ledger_once_left_running_stays_blocked_until_retried(ledger_once, lease_clock):
    ledger_once.record("guard(tools.crash, 7)", expect_exit=3, crash=True)  # died inside the tool
    if lease_clock:
        set_lease_clock_off_by(ledger_once.db, lease_clock)
    tools, g = ledger_once.tools(), ledger_once.guard()
    g.policy(tools.crash, lease=0.01)  # recover="retry" (the default) would take over a lease of its own
    assert g(tools.crash, 7) is BLOCKED
    assert g(tools.crash, n=7) is BLOCKED
    assert g.stats()["stale"] == 2  # ledger-once's record, and this call's copy of it
    assert ledger_once.effects() == ["crash 7"]
    assert g.retry(tools.crash, 7) is True
    assert g(tools.crash, 7) == "survived"
    assert ledger_once.effects() == ["crash 7", "crash 7"] and g.stats()["stale"] == 0


@pytest.mark.slow
def test_a_call_that_failed_under_ledger_once_may_run_again(ledger_once):
    ledger_once.record("""
        try:
            guard(tools.flaky, 1)
        except RuntimeError:
            pass
    """)
    tools, g = ledger_once.tools(), ledger_once.guard()
    with pytest.raises(RuntimeError, match="declined"):
        g(tools.flaky, 1)
    assert ledger_once.effects() == ["flaky 1", "flaky 1"]


@pytest.mark.slow
def test_floats_ledger_once_rounded_together_stay_one_call_in_either_order(ledger_once):
    ledger_once.record("guard(tools.charge, order_id=1, amount=99.99)")
    tools, g = ledger_once.tools(), ledger_once.guard()
    assert g(tools.charge, 1, 99.9900000001) is BLOCKED  # the drifted retry comes first
    assert g(tools.charge, 1, 99.99) is BLOCKED          # and the recorded spelling still finds its record
    assert ledger_once.effects() == ["charge 1 99.99 usd"]


LEGACY_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
LEGACY_CALLS = st.lists(st.fixed_dictionaries({
    "values": st.lists(LEGACY_VALUES, min_size=3, max_size=3),
    "positional": st.integers(0, 3), "again_positional": st.integers(0, 3),
    "key": st.none() | st.text(min_size=1, max_size=8), "wf": st.sampled_from(["default", "order-1", "ü/2"]),
}), min_size=1, max_size=6)


def legacy_spelling(call: dict, positional: int) -> tuple[list, dict]:
    """book(a, b=0, c=None) with the first `positional` arguments by position, the rest by name."""
    names = ["a", "b", "c"]
    return call["values"][:positional], dict(zip(names[positional:], call["values"][positional:]))


def a_legacy_folder(tmp_path_factory) -> LedgerOnceFolder:
    """A new folder for ledger-once 0.1.5 to record calls in (the test skips without it)."""
    need("ledger-once 0.1.5", bool(LEDGER_ONCE_PYTHON), "set LEDGER_TEST_LEDGER_ONCE (.ci/run does)")
    return LedgerOnceFolder(tmp_path_factory.mktemp("legacy"), LEDGER_ONCE_PYTHON)


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(calls=LEGACY_CALLS)
def test_every_call_ledger_once_recorded_is_found_by_the_same_call_spelled_any_way(calls, tmp_path_factory):
    folder = a_legacy_folder(tmp_path_factory)
    spelled = [[*legacy_spelling(c, c["positional"]), c["key"], c["wf"]] for c in calls]
    (folder.folder / "calls.json").write_text(json.dumps(spelled))
    try:
        folder.record("""
            import json
            for args, kwargs, key, wf in json.load(open("calls.json")):
                guard.workflow(wf)
                guard(tools.book, *args, **kwargs, **({"key": key} if key is not None else {}))
        """)
        ran = folder.effects()
        tools, g = folder.tools(), folder.guard()
        for c in calls:
            args, kwargs = legacy_spelling(c, c["again_positional"])
            g.workflow(c["wf"])
            assert g(tools.book, *args, **kwargs, **({"key": c["key"]} if c["key"] is not None else {})) is BLOCKED
        assert folder.effects() == ran
    finally:
        sys.modules.pop(folder.module, None)
        ledger._WORKFLOW.set(None)


def binds(fn, args, kwargs) -> bool:
    try:
        inspect.signature(fn).bind(*args, **kwargs)
        return True
    except TypeError:
        return False


FINGERPRINTED_CALLS = st.lists(st.tuples(
    st.sampled_from(["book", "spread"]), st.lists(LEGACY_VALUES, min_size=1, max_size=4),
    st.dictionaries(st.sampled_from(["b", "c", "flag", "x", "y"]), LEGACY_VALUES, max_size=2),
    st.none() | st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=6)), min_size=20, max_size=40)


@pytest.mark.slow
@settings(max_examples=4, deadline=None)
@given(calls=FINGERPRINTED_CALLS)
def test_the_id_ledger_py_looks_for_is_the_id_ledger_once_gave_the_call(calls, tmp_path_factory):
    folder = a_legacy_folder(tmp_path_factory)
    tools = folder.tools()
    calls = [c for c in calls if binds(getattr(tools, c[0]), c[1], c[2])]  # calls a tool could be given
    (folder.folder / "calls.json").write_text(json.dumps(calls))
    try:
        folder.record("""
            import json
            ids = []
            for tool, args, kwargs, key, wf in json.load(open("calls.json")):
                fn = getattr(tools, tool)
                ids.append(ledger._fp(ledger._tool_name(fn), ledger._bind(fn, tuple(args), kwargs), wf, key))
            json.dump(ids, open("ids.json", "w"))
        """)
        theirs = json.loads((folder.folder / "ids.json").read_text())
        g = Guard(MemoryStore(), quiet=True)
        ours = []
        for tool, args, kwargs, key, wf in calls:
            with g.workflow(wf):
                if key and tool == "spread":  # key= next to **options is refused: guard.keyed passes it
                    call = g._prepare(tools.spread, tuple(args), kwargs, key)
                else:
                    call = g._prepare(getattr(tools, tool), tuple(args), {**kwargs, **({"key": key} if key else {})})
            ours.append(ledger._ledger_once_id(call))
        assert ours == [ledger.LEGACY_PREFIX + id for id in theirs]
    finally:
        sys.modules.pop(folder.module, None)


@pytest.mark.slow
def test_a_key_ledger_once_took_beside_a_tools_own_keywords_finds_its_record_through_keyed(ledger_once):
    ledger_once.record('guard(tools.spread, 1, flag=True, key="spread-1")')
    tools, g = ledger_once.tools(), ledger_once.guard()
    with pytest.raises(ledger.ConfigError, match=r"guard\.keyed\(key, tool"):  # key= or one of **options?
        g(tools.spread, 1, flag=True, key="spread-1")
    assert g.keyed("spread-1", tools.spread, 1, flag=True) is BLOCKED
    assert len(ledger_once.effects()) == 1


@pytest.mark.slow
def test_ledger_once_calls_are_carried_over_once_so_a_reset_stays_reset(ledger_once):
    ledger_once.record("guard(tools.charge, order_id=1, amount=9.99)")
    tools, g = ledger_once.tools(), ledger_once.guard()
    assert g(tools.charge, 1, 9.99) is BLOCKED
    g.reset()
    g.close()
    again = ledger_once.guard()
    assert again(tools.charge, 1, 9.99) == {"charged": 9.99, "order": 1}
    assert ledger_once.effects() == ["charge 1 9.99 usd"] * 2


@pytest.mark.slow
def test_carrying_over_leaves_ledger_once_table_as_it_was(ledger_once):
    ledger_once.record("""
        guard(tools.charge, order_id=1, amount=9.99)
        guard(tools.send_email, to="a@x.io", key="welcome-a")
    """)
    before = ledger_once.legacy_rows()
    tools, g = ledger_once.tools(), ledger_once.guard()
    assert g(tools.charge, 1, 9.99) is BLOCKED
    assert ledger_once.legacy_rows() == before


@pytest.mark.slow
def test_a_read_only_open_of_a_ledger_once_file_names_ledger_migrate_and_changes_nothing(ledger_once):
    ledger_once.record("guard(tools.charge, order_id=1, amount=9.99)")
    before = ledger_once.db.read_bytes()
    with pytest.raises(ledger.StoreError, match="ledger migrate"):
        ledger.open_store(str(ledger_once.db), create=False)
    assert ledger_once.db.read_bytes() == before


def _import_and_count(path: str, queue) -> None:
    store = SQLiteStore(path)
    queue.put(len([r for r in store.records() if r.id.startswith(ledger.LEGACY_PREFIX)]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_processes_opening_a_ledger_once_file_at_once_carry_it_over_once(ledger_once, method):
    ledger_once.record("""
        guard(tools.charge, order_id=1, amount=9.99)
        guard(tools.charge, order_id=2, amount=9.99)
    """)
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    workers = [ctx.Process(target=_import_and_count, args=(str(ledger_once.db), queue)) for _ in range(4)]
    [w.start() for w in workers]
    counts = [queue.get(timeout=60) for _ in workers]
    [w.join() for w in workers]
    assert counts == [2] * 4
    with contextlib.closing(sqlite3.connect(ledger_once.db)) as conn:
        assert conn.execute("SELECT calls FROM ledger_once_import").fetchall() == [(2,)]


@pytest.mark.slow
def test_a_method_of_an_object_ledger_once_accepted_needs_a_name_before_anything_runs(ledger_once):
    ledger_once.record("guard(tools.Mailer().send, 'a@x.io')")
    tools, g = ledger_once.tools(), ledger_once.guard()
    with pytest.raises(ledger.ConfigError, match=r"Mailer\.send .*pass name="):
        g(tools.Mailer().send, "a@x.io")
    assert ledger_once.effects() == ["mailer.send a@x.io"]


@pytest.mark.slow
def test_a_closure_ledger_once_accepted_needs_a_name_then_an_operators_word_before_it_runs(ledger_once):
    ledger_once.record("guard(tools.make_notifier('sms'), 'a@x.io')")
    tools, g = ledger_once.tools(), ledger_once.guard()
    with pytest.raises(ledger.ConfigError, match=r"closure over 'channel'.*pass name="):
        g(tools.make_notifier("sms"), "a@x.io")
    notify = g.once(tools.make_notifier("sms"), name="notify-sms")
    with pytest.raises(ledger.AmbiguousRecordError, match="ledger migrate --confirm lo:"):
        notify("a@x.io")  # ledger-once named every `notify` of the module alike
    assert ledger_once.effects() == ["notify sms a@x.io"]


def refused_as_ambiguous(ledger_once) -> tuple[Callable, str]:
    """A method ledger-once recorded under a name every `send` of its module shares, named for
    ledger.py and called again: refused before it runs, with both ways an operator settles it.
    Returns the guarded method and the carried-over record's id."""
    ledger_once.record("guard(tools.Mailer().send, 'a@x.io')")
    tools, g = ledger_once.tools(), ledger_once.guard()
    send = g.once(tools.Mailer().send, name="mailer.send")
    with pytest.raises(ledger.AmbiguousRecordError) as refused:
        send("a@x.io")
    assert ledger_once.effects() == ["mailer.send a@x.io"]
    legacy_id = re.search(r"--confirm (lo:\w+)", str(refused.value)).group(1)
    assert f"ledger retry {legacy_id}" in str(refused.value)
    return send, legacy_id


@pytest.mark.slow
def test_a_method_ledger_once_named_ambiguously_is_refused_until_an_operator_decides(ledger_once, cli):
    send, legacy_id = refused_as_ambiguous(ledger_once)
    assert cli("migrate", str(ledger_once.db), "--confirm", legacy_id)[0] == 0
    assert send("a@x.io") is BLOCKED
    assert ledger_once.effects() == ["mailer.send a@x.io"]


@pytest.mark.slow
def test_an_ambiguous_record_an_operator_retries_lets_the_call_run(ledger_once, cli):
    send, legacy_id = refused_as_ambiguous(ledger_once)
    assert cli("retry", legacy_id, "--db", ledger_once.db)[0] == 0
    assert send("a@x.io") == "sent"
    assert ledger_once.effects() == ["mailer.send a@x.io"] * 2


@pytest.mark.slow
def test_force_runs_a_call_whatever_ledger_once_recorded_ambiguous_or_not(ledger_once):
    ledger_once.record("""
        guard(tools.Mailer().send, 'a@x.io')
        guard(tools.charge, order_id=1, amount=9.99)
    """)
    tools, g = ledger_once.tools(), ledger_once.guard()
    assert g.force(g.once(tools.Mailer().send, name="mailer.send"), "a@x.io") == "sent"
    assert g.force(tools.charge, 1, 9.99) == {"charged": 9.99, "order": 1}
    assert g(tools.charge, 1, 9.99) is BLOCKED
    assert ledger_once.effects() == ["mailer.send a@x.io", "charge 1 9.99 usd"] * 2


@pytest.mark.slow
@pytest.mark.parametrize("lease_clock", LEASE_CLOCK_OFFSETS)
def test_a_ledger_once_ttl_counts_from_the_records_last_touch(ledger_once, lease_clock):
    ledger_once.record("""
        guard.policy(tools.charge, ttl=3600)
        guard(tools.charge, order_id=1, amount=9.99)
        guard(tools.charge, order_id=2, amount=9.99)
    """)
    with contextlib.closing(sqlite3.connect(ledger_once.db)) as conn, conn:
        two_hours_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)
        conn.execute("UPDATE ledger SET touched = ?", (two_hours_ago.isoformat(),))
    if lease_clock:
        set_lease_clock_off_by(ledger_once.db, lease_clock)
    tools, g = ledger_once.tools(), ledger_once.guard()
    g.policy(tools.charge, ttl=3600)
    assert g(tools.charge, 1, 9.99) == {"charged": 9.99, "order": 1}  # touched two hours ago: expired
    g.policy(tools.charge, ttl=3 * 3600)
    assert g(tools.charge, 2, 9.99) is BLOCKED                        # within three hours of its touch
    assert ledger_once.effects() == ["charge 1 9.99 usd", "charge 2 9.99 usd", "charge 1 9.99 usd"]


# ---------------------------------------------------------------------------
# Command line: every subcommand, its exit codes and output. (The dashboard,
# which `serve` loads from ledger_dashboard.py, is tested in test_ledger_dashboard.py.)
# ---------------------------------------------------------------------------

@pytest.fixture
def cli(capsys, monkeypatch):
    """Runs the command in this process, on an 80-column terminal: (exit code, stdout, stderr)."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("NO_COLOR", raising=False)

    def run(*argv) -> tuple[int, str, str]:
        code = ledger.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def quiet_environ() -> dict:
    """This environment on an 80-column terminal, without NO_COLOR."""
    return {**{k: v for k, v in os.environ.items() if k != "NO_COLOR"}, "COLUMNS": "80"}


def run_cli(*argv: str, env: dict | None = None, cwd=None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `python ledger.py ...` as a user would, with no terminal."""
    return subprocess.run([sys.executable, LEDGER_PY, *map(str, argv)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env={**quiet_environ(), **(env or {})}, cwd=cwd, timeout=timeout)


def run_in_terminal(*argv: str, typed: bytes = b"", env: dict | None = None, timeout: float = 20) -> tuple[int, str]:
    """Run `python ledger.py ...` on a pseudo-terminal: (exit code, what the terminal showed)."""
    import pty
    import select
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, LEDGER_PY, *map(str, argv)], stdin=slave, stdout=slave, stderr=slave,
                            env={**quiet_environ(), "TERM": "xterm", **(env or {})})
    os.close(slave)
    os.write(master, typed)
    shown, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None and not select.select([master], [], [], 0.05)[0]:
            break
    os.close(master)
    return proc.wait(timeout=5), shown.decode(errors="replace")


@pytest.mark.parametrize("argv", [[], ["bogus"], ["retry"], ["export", "--format", "xml"], ["serve", "--port", "x"],
                                  ["serve", "--port", "70000"], ["show", "--limit", "0"], ["show", "--status", "done"],
                                  ["tail", "--interval", "0"], ["stats", "--nope"]],
                         ids=lambda argv: " ".join(argv) or "nothing")
def test_usage_errors_exit_2_with_argparse_usage(cli, argv):
    code, out, err = cli(*argv)
    assert code == 2 and out == "" and "usage: ledger" in err


def test_help_lists_every_command_and_exits_0(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("demo", "show", "tail", "stats", "savings", "clear", "prune", "retry", "export", "check",
                    "serve"):
        assert command in out


@pytest.mark.parametrize("argv", [["show"], ["tail"], ["stats"], ["savings"], ["clear", "--yes"], ["retry", "abcd"],
                                  ["export"], ["check"], ["serve", "--port", "0"], ["prune", "--older-than", "1d"]],
                         ids=lambda argv: argv[0])
def test_commands_refuse_a_missing_database_and_create_none(cli, tmp_path, argv):
    missing = tmp_path / "nope.db"
    code, out, err = cli(*argv, "--db", missing)
    assert (code, out, err) == (2, "", f"ledger: no ledger database at {missing}\n")
    assert list(tmp_path.iterdir()) == []


def test_db_defaults_to_the_ledger_db_environment_variable(ledger_db, cli, monkeypatch):
    monkeypatch.setenv("LEDGER_DB", str(ledger_db))
    code, out, _ = cli("show", "--json")
    assert code == 0 and len(json.loads(out)) == 5


def test_db_may_come_before_the_command(ledger_db, cli):
    code, out, _ = cli("--db", ledger_db, "show", "--json")
    assert code == 0 and len(json.loads(out)) == 5


def test_a_corrupt_database_is_one_line_on_stderr_and_exit_2(tmp_path):
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not a database" * 100)
    result = run_cli("show", "--db", path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "not a database" in result.stderr and "Traceback" not in result.stderr


def test_a_sqlite_file_that_is_no_ledger_is_refused_and_left_as_it_was(tmp_path, cli):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    before = path.read_bytes()
    code, _, err = cli("stats", "--db", path)
    assert code == 2 and "is not a ledger database" in err and path.read_bytes() == before


def test_show_lists_every_call_within_80_columns(ledger_db, cli):
    code, out, _ = cli("show", "--db", ledger_db)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1 + 5
    assert lines[0].split()[:3] == ["ID", "STATUS", "TOOL"]
    assert max(map(len, lines)) <= 80
    states = sorted(line.split()[1] for line in lines[1:])
    assert states == ["FAILED", "STALE", "SUCCESS", "SUCCESS", "SUCCESS"]
    assert "agent-2" in out and "\x1b" not in out


def test_show_filters_by_workflow_tool_status_and_limit(ledger_db, cli):
    def ids(*options):
        code, out, _ = cli("show", "--db", ledger_db, "--json", *options)
        assert code == 0
        return [r["tool"] for r in json.loads(out)]
    assert ids("--wf", "triage") == ["crm.lookup"]
    assert ids("--tool", "crm.lookup") == ["crm.lookup", "crm.lookup"]
    assert ids("--status", "stale") == ["nightly_job"]
    assert ids("--status", "FAILED") == ["flaky_api"]
    assert ids("--limit", "2") == ["crm.lookup", "nightly_job"]


def test_the_readme_lists_the_states_show_filters_by_as_ledger_spells_them():
    row = next(line for line in (HERE / "README.md").read_text().splitlines() if line.startswith("| `show` |"))
    listed = row.split("`--status` (", 1)[1].split(")", 1)[0]
    assert re.findall(r"`(\w+)`", listed) == list(ledger.STATES)


def test_show_json_has_every_field_and_the_state(ledger_db, cli):
    code, out, _ = cli("show", "--db", ledger_db, "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 5
    assert set(rows[0]) == set(ledger.RECORD_FIELDS) | {"state"}
    assert {r["tool"]: r["state"] for r in rows}["nightly_job"] == "STALE"


def test_untrusted_text_sends_no_control_characters_to_the_terminal(tmp_path, cli):
    g = Guard(str(tmp_path / "ledger.db"), quiet=True)

    def evil(x):
        raise RuntimeError("\x1b]0;owned\x07\x1b[2J")

    with pytest.raises(RuntimeError):
        g.wrap_tools({"evil\x1b[31m": evil})["evil\x1b[31m"](x="\x1b[5m")
    g.close()
    for command in ("show", "stats", "savings"):
        code, out, _ = cli(command, "--db", tmp_path / "ledger.db")
        assert code == 0 and "\x1b" not in out and "\x07" not in out


def test_stats_are_guard_stats_with_a_duplicate_rate_bar(ledger_db, cli):
    code, out, _ = cli("stats", "--db", ledger_db, "--json")
    expected = Guard(str(ledger_db), quiet=True).stats()
    assert code == 0 and json.loads(out) == expected
    assert (expected["attempts"], expected["blocked"], expected["stale"]) == (9, 4, 1)
    code, out, _ = cli("stats", "--db", ledger_db)
    assert code == 0 and "44%" in out and "█" in out and "$0.75" in out
    assert max(map(len, out.splitlines())) <= 80


def test_stats_of_one_workflow(ledger_db, cli):
    code, out, _ = cli("stats", "--db", ledger_db, "--wf", "triage", "--json")
    assert code == 0 and (json.loads(out)["attempts"], json.loads(out)["blocked"]) == (3, 2)


def test_savings_per_tool_money_from_cost_and_time_from_durations(ledger_db, cli):
    code, out, _ = cli("savings", "--db", ledger_db, "--json")
    report = json.loads(out)
    assert code == 0 and report["totals"]["saved_usd"] == 0.75
    assert report["tools"]["crm.lookup"]["blocked"] == 3 and report["tools"]["charge_card"]["saved_usd"] == 0
    durations = {r["tool"]: r["duration"] for r in records_of(ledger_db) if r["workflow"] == "order-7"}
    assert report["tools"]["charge_card"]["saved_seconds"] == round(durations["charge_card"], 6)
    code, out, _ = cli("savings", "--db", ledger_db)
    lines = out.splitlines()
    bars = [line for line in lines if line.startswith("crm.lookup")]
    assert code == 0 and "4 of 9 calls" in lines[0] and "$0.75" in lines[1]
    assert bars and bars[0].endswith("█") and max(map(len, lines)) <= 80


def test_clear_refuses_on_a_non_interactive_stdin_without_yes(ledger_db):
    result = run_cli("clear", "--db", ledger_db)
    assert result.returncode == 2 and "--yes" in result.stderr and result.stdout == ""
    assert len(records_of(ledger_db)) == 5


def test_clear_asks_on_a_terminal_and_keeps_everything_unless_told_yes(ledger_db):
    code, shown = run_in_terminal("clear", "--db", ledger_db, typed=b"n\n")
    assert code == 1 and "Delete 5 records" in shown and len(records_of(ledger_db)) == 5
    code, shown = run_in_terminal("clear", "--db", ledger_db, "--wf", "triage", typed=b"y\n")
    assert code == 0 and "deleted 1 records" in shown and len(records_of(ledger_db)) == 4


def test_clear_yes_deletes_only_the_workflow_given(ledger_db, cli):
    code, out, _ = cli("clear", "--db", ledger_db, "--wf", "order-7", "--yes")
    assert code == 0 and "deleted 3 records" in out
    assert sorted(r["workflow"] for r in records_of(ledger_db)) == ["default", "triage"]


@pytest.mark.parametrize("command", [["show"], ["stats"], ["show", "--wf", "triage"], ["stats", "--wf", "triage"]])
def test_commands_take_the_database_as_their_first_argument_as_ledger_once_did(ledger_db, cli, command):
    first = cli(command[0], ledger_db, *command[1:])
    assert first == cli(*command, "--db", ledger_db) and first[0] == 0 and first[1]   # the same report, not one error


@pytest.mark.parametrize("command", ["tail", "savings", "export", "serve", "migrate"])
def test_every_command_ledger_once_had_or_replaces_parses_the_database_first(command):
    assert ledger._db_spec(ledger._parser().parse_args([command, "agent.db"])) == "agent.db"


def test_clear_takes_the_database_as_its_first_argument(ledger_db, cli):
    code, out, _ = cli("clear", ledger_db, "--wf", "order-7", "--yes")
    assert code == 0 and "deleted 3 records" in out


@pytest.mark.slow
def test_migrate_carries_ledger_once_calls_over_and_reports_them(ledger_once, cli):
    ledger_once.record("""
        guard(tools.charge, order_id=1, amount=9.99)
        try:
            guard(tools.flaky, 1)
        except RuntimeError:
            pass
    """)
    code, out, _ = cli("migrate", ledger_once.db)
    assert code == 0 and "1 calls recorded by ledger-once were carried over" in out
    assert "1 of them are in the ledger under ids starting with lo:" in out
    assert [r["tool"] for r in records_of(ledger_once.db)] == [f"{ledger_once.module}.charge"]
    assert cli("migrate", ledger_once.db)[1] == out  # a second run changes nothing


def test_migrate_of_a_file_without_ledger_once_table_changes_nothing(ledger_db, cli):
    before = records_of(ledger_db)
    code, out, _ = cli("migrate", ledger_db)
    assert code == 0 and "nothing to carry over" in out and records_of(ledger_db) == before


def test_migrate_of_a_missing_file_is_a_usage_error_that_creates_none(tmp_path, cli):
    code, _, err = cli("migrate", tmp_path / "missing.db")
    assert code == 2 and "no SQLite file" in err and list(tmp_path.iterdir()) == []


def test_retry_releases_a_stale_call_so_that_it_runs_again(ledger_db, cli):
    stale = next(r for r in records_of(ledger_db) if r["tool"] == "nightly_job")
    code, out, _ = cli("retry", "--db", ledger_db, stale["id"][:8])
    assert code == 0 and "released" in out and "was STALE" in out
    g = Guard(str(ledger_db), quiet=True)
    runs = []
    g.policy("nightly_job", recover="block")
    g.wrap_tools({"nightly_job": lambda job: runs.append(job)})["nightly_job"](job=1)
    assert runs == [1]


def test_retry_of_a_running_call_is_refused_with_its_lease_unless_forced(tmp_path, cli):
    g = Guard(str(tmp_path / "ledger.db"), quiet=True)
    g.policy("job", lease=60)
    inside, release = threading.Event(), threading.Event()
    job = g.wrap_tools({"job": lambda n: (inside.set(), release.wait(10))})["job"]
    worker = threading.Thread(target=job, args=(1,))
    worker.start()
    try:
        inside.wait(10)
        id = g.store.records()[0].id
        code, out, err = cli("retry", "--db", tmp_path / "ledger.db", id)
        assert code == 2 and "is running now" in err and "--force" in err and out == ""
        assert g.store.get(id).status == "RUNNING"
        code, out, _ = cli("retry", "--db", tmp_path / "ledger.db", "--force", id)
        assert code == 0 and "was RUNNING" in out and g.store.get(id).status == "FAILED"
    finally:
        release.set()
        worker.join()
        g.close()


@pytest.mark.parametrize("wanted, error", [("ffffffff", "no record"), ("ab", "at least 4"), ("", "at least 4")])
def test_retry_of_an_unknown_id_is_a_usage_error(ledger_db, cli, wanted, error):
    code, _, err = cli("retry", "--db", ledger_db, wanted)
    assert code == 2 and error in err


def unknown_record(db) -> dict:
    return next(r for r in records_of(db) if r["tool"] == "charge_card")


def test_show_and_stats_show_an_unknown_call_and_its_error(unknown_db, cli):
    code, out, _ = cli("show", "--db", unknown_db, "--status", "unknown")
    assert code == 0 and "UNKNOWN" in out and "TimeoutError: no answer" in out and "lookup" not in out
    assert unknown_record(unknown_db)["status"] == "UNKNOWN"
    code, out, _ = cli("stats", "--db", unknown_db, "--json")
    assert code == 0 and json.loads(out)["unknown"] == 1


@contextlib.contextmanager
def tailing(db, last: int):
    """`ledger tail --last <last>` on db, its output read line by line, until the block ends;
    then Ctrl-C, which must end it cleanly."""
    proc = subprocess.Popen([sys.executable, LEDGER_PY, "tail", "--db", str(db), "--last", str(last),
                             "--interval", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    try:
        yield Lines(proc.stdout)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
    assert code == 0 and "Traceback" not in proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()


def test_tail_shows_an_unknown_call(unknown_db):
    with tailing(unknown_db, 5) as lines:
        line = lines.until("charge_card")
        assert " unknown " in line and "TimeoutError: no answer" in line


def test_resolve_done_records_the_result_and_settles_only_once(unknown_db, cli):
    id = unknown_record(unknown_db)["id"]
    code, out, _ = cli("resolve", "--db", unknown_db, id[:8], "--done", "--result", '{"charge": "ch_1"}')
    assert code == 0 and f"resolved {id}" in out and "SUCCESS" in out
    code, out, err = cli("resolve", "--db", unknown_db, id[:8], "--not-done")
    assert code == 1 and "not UNKNOWN (it is SUCCESS)" in err and out == ""
    g = Guard(str(unknown_db), quiet=True)
    g.policy("charge_card", replay=True)
    runs = []
    assert g.wrap_tools({"charge_card": lambda order: runs.append(order)})["charge_card"](order=7) == {"charge": "ch_1"}
    assert runs == []


def test_resolve_not_done_lets_the_call_run_again(unknown_db, cli):
    record = unknown_record(unknown_db)
    code, out, _ = cli("resolve", "--db", unknown_db, record["id"], "--not-done")
    assert code == 0 and "FAILED: its next call runs again, same key" in out
    g, keys = Guard(str(unknown_db), quiet=True), []
    g.wrap_tools({"charge_card": lambda order: keys.append(current_key())})["charge_card"](order=7)
    assert keys == [record["run_key"]]


@pytest.mark.parametrize("argv, error", [(["--done", "--not-done"], "not allowed with"), ([], "one of the arguments"),
                                         (["--not-done", "--result", "1"], "--result goes with --done"),
                                         (["--done", "--result", "{not json"], "invalid")])
def test_resolve_refuses_a_contradictory_or_unreadable_answer(unknown_db, cli, argv, error):
    code, _, err = cli("resolve", "--db", unknown_db, unknown_record(unknown_db)["id"], *argv)
    assert code == 2 and error in err and unknown_record(unknown_db)["status"] == "UNKNOWN"


def test_prune_dry_run_reports_per_status_and_tool_and_deletes_nothing(ledger_db, cli):
    before = records_of(ledger_db)
    code, out, _ = cli("prune", "--db", ledger_db, "--older-than", "0", "--dry-run")
    assert code == 0 and out.startswith("would delete 4 records (all workflows)")
    assert re.search(r"SUCCESS\s+2\s+crm.lookup", out) and re.search(r"FAILED\s+1\s+flaky_api", out)
    assert records_of(ledger_db) == before


def test_prune_deletes_finished_calls_older_than_the_duration_never_a_running_one(ledger_db, cli):
    code, out, _ = cli("prune", "--db", ledger_db, "--older-than", "1h", "--json")
    assert code == 0 and json.loads(out) == {"removed": 0, "dry_run": False, "counts": []}
    code, out, _ = cli("prune", "--db", ledger_db, "--older-than", "0s", "--status", "failed", "--json")
    assert json.loads(out)["counts"] == [{"status": "FAILED", "tool": "flaky_api", "count": 1}]
    code, out, _ = cli("prune", "--db", ledger_db, "--older-than", "0", "--wf", "triage")
    assert code == 0 and out.startswith("deleted 1 records (workflow 'triage')")
    code, out, _ = cli("prune", "--db", ledger_db, "--older-than", "0")
    assert code == 0 and out.startswith("deleted 2 records (all workflows)")
    assert [r["tool"] for r in records_of(ledger_db)] == ["nightly_job"]   # RUNNING (stale), kept


@pytest.mark.parametrize("argv", [["prune"], ["prune", "--older-than", "soon"], ["prune", "--older-than", "-1d"],
                                  ["prune", "--older-than", "1d", "--status", "running"]])
def test_prune_usage_errors_exit_2(ledger_db, cli, argv):
    code, _, err = cli(*argv, "--db", ledger_db)
    assert code == 2 and "usage" in err


def test_export_jsonl_round_trips_every_record(ledger_db, cli, tmp_path):
    code, out, _ = cli("export", "--db", ledger_db)
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == records_of(ledger_db)


def test_export_csv_round_trips_every_record(ledger_db, cli, tmp_path):
    import csv
    target = tmp_path / "ledger.csv"
    code, out, err = cli("export", "--db", ledger_db, "--format", "csv", "-o", target)
    assert code == 0 and out == "" and "wrote 5 records" in err
    kinds = {f.name: f.type for f in dataclasses.fields(Record)}

    def typed(field, text):
        if text == "":
            return None
        return int(text) if "int" in kinds[field] else float(text) if "float" in kinds[field] else text
    with open(target, newline="", encoding="utf-8") as f:
        rows = [{k: typed(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert rows == records_of(ledger_db)


def hostile_ledger(path) -> None:
    """Records whose texts are terminal escapes and spreadsheet formulas."""
    g = Guard(str(path), quiet=True)
    tools = g.wrap_tools({"=HYPERLINK(\"http://x\")": lambda a: a, "ok": lambda a: a})
    g.policy("ok", serializer=(str, str))   # results stored as their own text, so cells start with it
    for text in ("+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\x1b]0;owned\x07\x1b[2J\x9b31m"):
        tools["ok"](text)
    tools["=HYPERLINK(\"http://x\")"]("x")
    g.close()


def test_export_csv_neutralizes_formulas_and_terminal_escapes(tmp_path, cli):
    import csv
    hostile_ledger(tmp_path / "ledger.db")
    code, out, _ = cli("export", "--db", tmp_path / "ledger.db", "--format", "csv")
    assert code == 0 and not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", out)
    cells = [cell for row in csv.reader(out.splitlines()[1:]) for cell in row]

    def number(cell):
        with contextlib.suppress(ValueError):
            return float(cell)
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "-", "\t", "\r") and number(c) is None]
    assert {"'=HYPERLINK(\"http://x\")", "'+1+1", "'-2+3", "'@SUM(A1)", " cmd"} <= set(cells)


def test_export_jsonl_escapes_c1_controls_and_stays_lossless(tmp_path, cli):
    hostile_ledger(tmp_path / "ledger.db")
    code, out, _ = cli("export", "--db", tmp_path / "ledger.db")
    assert code == 0 and not re.search("[\x00-\x1f\x7f-\x9f]", out.replace("\n", ""))
    assert [json.loads(line) for line in out.splitlines()] == records_of(tmp_path / "ledger.db")


def test_json_output_escapes_c1_controls_and_stays_lossless(tmp_path, cli):
    hostile_ledger(tmp_path / "ledger.db")
    code, out, _ = cli("show", "--json", "--db", tmp_path / "ledger.db")
    assert code == 0 and not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", out)
    shown = [{k: v for k, v in r.items() if k != "state"} for r in json.loads(out)]
    assert sorted(shown, key=lambda r: r["id"]) == sorted(records_of(tmp_path / "ledger.db"), key=lambda r: r["id"])


def test_check_passes_and_touches_no_existing_record(ledger_db, cli):
    before = records_of(ledger_db)
    code, out, _ = cli("check", "--db", ledger_db)
    assert code == 0 and out.startswith("ok ")
    assert records_of(ledger_db) == before


def test_check_fails_with_exit_1_on_a_database_that_breaks_the_contract(ledger_db, cli):
    with sqlite3.connect(ledger_db) as conn:  # a defect: inserted records come back changed
        conn.execute("CREATE TRIGGER broken AFTER INSERT ON records WHEN NEW.workflow LIKE 'ledger-check-%' "
                     "BEGIN UPDATE records SET caller = 'mangled' WHERE id = NEW.id; END")
    code, out, _ = cli("check", "--db", ledger_db, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and "unchanged" in report["failure"]
    assert len(records_of(ledger_db)) == 5


@pytest.mark.slow
def test_colours_only_on_a_terminal_and_never_with_no_color(ledger_db):
    code, shown = run_in_terminal("stats", "--db", ledger_db)
    assert code == 0 and "\x1b[" in shown
    code, shown = run_in_terminal("stats", "--db", ledger_db, env={"NO_COLOR": "1"})
    assert code == 0 and "\x1b[" not in shown and "duplicates" in shown
    piped = run_cli("stats", "--db", ledger_db)
    assert piped.returncode == 0 and "\x1b[" not in piped.stdout


@pytest.mark.slow
def test_tail_shows_the_latest_calls_then_new_activity_until_ctrl_c(ledger_db):
    with tailing(ledger_db, 2) as lines:
        assert "stale" in lines.until("nightly_job")
        g = Guard(str(ledger_db), quiet=True)
        g.wrap_tools({"fresh_tool": lambda n: n})["fresh_tool"](n=41)
        line = lines.until("fresh_tool")
        assert " ran " in line and '{"n":41}' in line
        g.wrap_tools({"fresh_tool": lambda n: n})["fresh_tool"](n=41)
        g.close()  # writes the blocked count
        assert "+1 duplicate" in lines.until("blocked")


@pytest.mark.slow
def test_demo_shows_all_three_stories_and_the_savings_in_under_ten_seconds(tmp_path):
    began = time.perf_counter()
    result = run_cli("demo", cwd=tmp_path)
    took = time.perf_counter() - began
    out = result.stdout
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert took < 10
    assert "the card was charged once for 3 attempts" in out
    assert "web_search ran once" in out and "8 of 8 agents" in out
    assert "kill -9" in out and "retry at once      BLOCKED" in out and "taken over under the same key" in out
    assert "Savings: 10 of 14 calls were duplicates" in out and "saved $0.35" in out
    assert max(map(len, out.splitlines())) <= 80
    assert list(tmp_path.iterdir()) == []  # its database was temporary


@pytest.mark.slow
def test_demo_keeps_its_ledger_with_db(tmp_path):
    result = run_cli("demo", "--db", tmp_path / "demo.db")
    assert result.returncode == 0, result.stderr
    by_tool = {r["tool"]: r for r in records_of(tmp_path / "demo.db")}
    assert {t: (r["executed"], r["blocked"]) for t, r in by_tool.items()} == \
        {"charge_card": (1, 2), "web_search": (1, 7), "send_invoice": (2, 1)}
    assert by_tool["send_invoice"]["epoch"] == 2 and by_tool["send_invoice"]["status"] == "SUCCESS"


def test_stats_wait_for_counts_the_heartbeat_is_writing(tmp_path, monkeypatch):
    class SlowCounts(SQLiteStore):
        def add_counts(self, counts):
            time.sleep(0.3)
            super().add_counts(counts)
    guard = Guard(SlowCounts(tmp_path / "l.db"), quiet=True, secret="s")
    guard(charge, 1)
    guard(charge, 1)
    heartbeat_flush = threading.Thread(target=guard._core.flush)
    heartbeat_flush.start()
    time.sleep(0.05)  # the batch is taken and being written
    assert guard.stats()["attempts"] == 2
    heartbeat_flush.join()


# ---------------------------------------------------------------------------
# Docs and examples (all slow): each example runs as its users would run it, and
# every code block of README.md and llms.txt runs, as a reader pastes them.
# ---------------------------------------------------------------------------

# Examples: each runs as its users would run it, and leaves no file behind ---

EXAMPLES = {
    "openai_dispatch.py": (None, ["-> {\"status\": \"already done\"}", "charges at the provider: [99.0]",
                                  "payment provider timed out", "executed 2, blocked 2"]),
    "langchain_tools.py": ("langchain_core", ["-> already done", "side effects: ['invoice acme 120.0', 'refund 9']"]),
    "langgraph_graph.py": ("langgraph", ["run 2: receipt ch_7, tool replies ['already sent']", "charged: [7]",
                                         "confirmations sent: ['order 7, receipt ch_7']"]),
    "openai_agents_sdk.py": ("agents", ["refunds that ran: [42, 43]", "executed 2, blocked 2"]),
    "mcp_server.py": ("mcp", ["tickets filed: ['printer on fire']", "-> already done", "1 ticket(s) match"]),
    "fastmcp_server.py": ("fastmcp", ["refunds that ran: ['order 7 for alice', 'order 7 for bob']",
                                      "alice: refund({'order_id': 7}) -> already done",
                                      "executed 3, blocked 2"]),
    "multiprocess_workers.py": (None, ["payouts sent: 12 for 12 jobs; each exactly once: True"]),
    "uncertain_payment.py": (None, ["attempt 1: TimeoutError", "the call is UNKNOWN", "verifier in worker: not done",
                                    "then was killed by SIGKILL", "verifier in main: done, ch_1",
                                    "attempt 3: verified, ran again: False, returns ch_1", "attempt 4: blocked",
                                    "charges at the provider: 1 (ch_1)"]),
    "llama_index_agent.py": ("llama_index.core", ["  already cancelled: the warehouse was told before",
                                                  "orders cancelled: ['order 17 (ordered twice)']",
                                                  "1 cancellation ran; 2 repeats were blocked"]),
    "smolagents_agent.py": ("smolagents", ["refunds that ran: ['order 42: 30.0']", "executed 1, blocked 2"]),
    "autogen_agent.py": ("autogen_agentchat", ["refunds that ran: ['order 42: 30.0']", "executed 1, blocked 2"]),
    "google_adk_agent.py": ("google.adk", ["refunds that ran, one for each user: ['ada: order 42, 30.0', "
                                            "'bob: order 42, 30.0']", "2 refunds ran; 4 duplicates were blocked"]),
    "crewai_crew.py": ("crewai", ["crew run 2: tool results ['already done: this refund ran before']",
                                  "refunds that ran: ['order 42: 30.0']", "executed 1, blocked 1"]),
    "pydantic_ai_agent.py": ("pydantic_ai", ["texts sent: ['ada: Your refund is on its way.', "
                                             "'bob: Your refund is on its way.']", "executed 2, blocked 2"]),
}


@pytest.mark.slow
def test_every_example_is_tested():
    tested_elsewhere = ["benchmark.py"]  # in the Benchmark section
    assert sorted(p.name for p in (HERE / "examples").glob("*.py")) == sorted([*EXAMPLES, *tested_elsewhere])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_offline_and_prints_what_ran(name, tmp_path):
    package, expected = EXAMPLES[name]
    python = sys.executable
    if package == "crewai" and CREWAI_ELSEWHERE:
        python = CREWAI_PYTHON
    elif package == "crewai":
        crewai("crewai")
    elif package:
        framework(package)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    env.pop("LEDGER_DB", None)
    done = subprocess.run([python, str(HERE / "examples" / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for line in expected:
        assert line in done.stdout, f"{line!r} not in:\n{done.stdout}"
    assert list(tmp_path.iterdir()) == []


# Docs: every python block of each document runs, in order, in one namespace
# (as a reader pastes them), in a fresh folder; bash lines that only run an
# example or the demo run too. Blocks importing a framework need its package.

DOCS = ["README.md", "llms.txt", "CLAUDE.md"]
# The full benchmark takes a minute; the Benchmark section runs it with --quick.
SAFE_COMMAND = re.compile(r"^python (examples/(?!benchmark\.py)\w+\.py|ledger\.py demo)$")

DOC_RUNNER = """
import json, sys, traceback
namespace = {"__name__": "__main__"}
for name, line, code in json.load(sys.stdin):
    try:
        exec(compile(code, f"{name} block at line {line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"{name}: the code block at line {line} failed")
"""


def code_blocks(name: str, language: str) -> list[tuple[int, str]]:
    """(line, code) of each ```language block of a document."""
    blocks, current, start = [], None, 0
    for number, line in enumerate((HERE / name).read_text().splitlines(), 1):
        if current is None and line.strip() == "```" + language:
            current, start = [], number
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.slow
def test_docs_have_python_blocks():
    assert all(code_blocks(name, "python") for name in ("README.md", "llms.txt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", DOCS)
def test_python_blocks_of_the_docs_run(name, tmp_path):
    blocks = code_blocks(name, "python")
    for package in ("langchain_core", "langchain", "langgraph", "agents", "mcp", "fastmcp", "pydantic_ai",
                    "llama_index", "smolagents", "autogen_agentchat", "autogen_core", "google.adk",
                    "opentelemetry.sdk"):
        if any(re.search(rf"\b(from|import) {package}\b", code) for _, code in blocks):
            framework(package)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    env.pop("LEDGER_DB", None)
    done = subprocess.run([sys.executable, "-c", DOC_RUNNER], cwd=tmp_path, env=env, text=True,
                          input=json.dumps([(name, line, code) for line, code in blocks]),
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_safe_bash_lines_of_the_readme_run():
    commands = [line.split("#")[0].strip() for _, code in code_blocks("README.md", "bash")
                for line in code.splitlines()]
    safe = list(filter(SAFE_COMMAND.match, commands))
    assert "python ledger.py demo" in safe
    for command in safe:
        done = subprocess.run(command.split(), cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE)},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command}: {done.stderr}"


# ---------------------------------------------------------------------------
# Benchmark: examples/benchmark.py runs with tiny counts and reports every
# figure, so that it cannot rot.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def benchmark_report():
    run = subprocess.run([sys.executable, str(HERE / "examples" / "benchmark.py"), "--quick", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _per_call(figure):
    return 0 < figure["median_us"] <= figure["p99_us"] and figure["n"] > 0


@pytest.mark.slow
def test_benchmark_reports_every_path_for_each_local_store(benchmark_report):
    assert set(benchmark_report["stores"]) == {"memory", "sqlite"}
    for figures in benchmark_report["stores"].values():
        for path in ("fingerprint", "miss", "hit_blocked", "hit_replayed"):
            assert _per_call(figures[path]), path
        for size in ("100", "1000"):
            assert _per_call(figures["scale"][size]["miss"]) and _per_call(figures["scale"][size]["hit"])


@pytest.mark.slow
def test_benchmark_measures_the_raw_floor_in_the_same_run(benchmark_report):
    floor = benchmark_report["floor"]
    assert _per_call(floor["claim_complete"]) and _per_call(floor["lookup"]) and _per_call(floor["fingerprint"])
    assert floor["lookup"]["median_us"] < floor["claim_complete"]["median_us"]
    assert 0 < floor["thread_wake"]["p50_ms"] <= floor["thread_wake"]["p99_ms"]


@pytest.mark.slow
def test_benchmark_shared_wait_runs_the_tool_once(benchmark_report):
    for figures in benchmark_report["stores"].values():
        shared = figures["shared_wait"]
        assert shared["executions"] == 1
        assert shared["waiters"] + shared["late"] == benchmark_report["threads"] + benchmark_report["tasks"] - 1
        assert 0 <= shared["wake"]["p50_ms"] <= shared["wake"]["p99_ms"]


class _NoGuard:
    """Stands in for a guard that runs every call: what the benchmark must refuse to report on."""

    kind, store = "memory", types.SimpleNamespace(get=lambda id: None)

    def guard(self):
        return self

    def policy(self, *args, **kwargs):
        pass

    def wrap_tools(self, tools):
        return tools

    def close(self):
        pass


@pytest.mark.slow
def test_benchmark_stops_when_a_shared_wait_runs_the_tool_more_than_once():
    bench = runpy.run_path(str(HERE / "examples" / "benchmark.py"))
    with pytest.raises(SystemExit, match="memory shared wait: 3 threads and 2 tasks on one call ran it 5 times"):
        bench["shared_wait"](_NoGuard(), 3, 2, 20)


@pytest.mark.slow
def test_benchmark_cross_process_runs_each_key_once(benchmark_report):
    assert benchmark_report["stores"]["memory"]["cross_process"] is None  # one process's memory
    cross = benchmark_report["stores"]["sqlite"]["cross_process"]
    assert cross["executions_per_key"] == {"min": 1, "max": 1}
    assert cross["distinct_calls_per_s"] > 0 and cross["wake"]["p99_ms"] is not None
    # the raw floor ran in the same processes, in turns with the guard
    assert cross["floor_calls_per_s"] > 0
    assert cross["distinct_over_floor"] == round(cross["distinct_calls_per_s"] / cross["floor_calls_per_s"], 2)


@pytest.mark.slow
def test_benchmark_reports_each_target_with_whether_it_is_met(benchmark_report):
    targets = {t["target"]: t for t in benchmark_report["targets"]}
    assert len(targets) == 9 + 2 + 4  # and, on memory and SQLite, the shared wait and both paths at scale
    for t in targets.values():
        if t["goal"] == "reported":  # a figure the issue asks to see, with no number to meet
            assert t["met"] is None
            continue
        op, limit = t["goal"].split()[0], float(t["goal"].split()[1].rstrip("x").replace(",", ""))
        if t["measured"] is None:  # ledger-once and callgrind figures need --against and --callgrind
            assert t["met"] is None
        else:
            assert t["met"] == (t["measured"] <= limit if op == "<=" else t["measured"] >= limit)
    floor, sqlite = benchmark_report["floor"], benchmark_report["stores"]["sqlite"]
    miss = targets["SQLite miss / raw floor (INSERT + UPDATE, two commits)"]["measured"]
    hit = targets["SQLite hit / raw floor (fingerprint + SELECT)"]["measured"]
    assert miss == round(sqlite["miss"]["median_us"] / floor["claim_complete"]["median_us"], 2)
    assert hit == round(sqlite["hit_blocked"]["median_us"] / floor["fingerprint_lookup"]["median_us"], 2)
    memory, commits = benchmark_report["stores"]["memory"], floor["claim_complete"]["median_us"]
    miss_bound = (commits + memory["miss"]["median_us"]) / commits
    hit_bound = ((floor["lookup"]["median_us"] + memory["hit_blocked"]["median_us"])
                 / floor["fingerprint_lookup"]["median_us"])
    assert targets["SQLite miss / raw floor (INSERT + UPDATE, two commits)"]["floor"] == (
        f"{miss_bound:.2f}x (the raw floor plus the memory store's miss, over the raw floor)")
    assert targets["SQLite hit / raw floor (fingerprint + SELECT)"]["floor"] == (
        f"{hit_bound:.2f}x (the bare SELECT plus the memory store's hit, over the raw floor)")
    throughput = {name.split()[0]: t["measured"] for name, t in targets.items() if t["goal"] == "reported"}
    assert throughput == {"SQLite": sqlite["cross_process"]["distinct_over_floor"], "PostgreSQL": None, "Redis": None}
    wake = [t for name, t in targets.items() if name.startswith("SQLite shared wait")]
    assert [t["measured"] for t in wake] == [round(sqlite["shared_wait"]["wake"]["p99_ms"]
                                                   / floor["thread_wake"]["p99_ms"], 2)]
    at_scale = {name: t["measured"] for name, t in targets.items() if " records / with " in name}
    assert at_scale["SQLite hit with 1,000 records / with 100"] == round(
        sqlite["scale"]["1000"]["hit"]["median_us"] / sqlite["scale"]["100"]["hit"]["median_us"], 2)
    assert len(at_scale) == 4
    bare = sqlite["scale"]["1000"]["raw_lookup"]["median_us"] / sqlite["scale"]["100"]["raw_lookup"]["median_us"]
    assert targets["SQLite hit with 1,000 records / with 100"]["floor"] == f"{bare:.2f}x (its SELECT, bare)"
    assert benchmark_report["stores"]["memory"]["scale"]["1000"]["raw_lookup"] is None
    assert benchmark_report["against"] is None and benchmark_report["callgrind"] is None


def _benchmark(*options: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "examples" / "benchmark.py"), *options],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE)


@pytest.mark.slow
def test_benchmark_against_ledger_once_measures_both_in_rounds_side_by_side():
    need("ledger-once 0.1.5", bool(LEDGER_ONCE_PYTHON) and os.path.exists(LEDGER_ONCE_PYTHON or ""),
         "set LEDGER_TEST_LEDGER_ONCE to the python of a virtualenv with `pip install ledger-once==0.1.5`")
    run = _benchmark("--quick", "--store", "sqlite", "--scale", "100", "--json",
                     "--against", "ledger-once", "--ledger-once-python", LEDGER_ONCE_PYTHON)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    against = report["against"]
    # each side imported its own module, even from a checkout whose ledger.py could shadow ledger-once's
    assert against["ledger.py"]["module"] == str((HERE / "ledger.py").resolve())
    assert against["ledger-once"]["module"] != against["ledger.py"]["module"]
    assert pathlib.Path(against["ledger-once"]["module"]).parent.name == "site-packages"
    for side in against.values():
        for path in ("miss", "hit_blocked", "hit_replayed"):
            assert 0 < side[path]["median_us"] <= side[path]["p99_us"] and side[path]["rounds"] == 3, path
    targets = {t["target"]: t for t in report["targets"]}
    faster = targets["SQLite hit: ledger-once time / ledger.py time"]
    assert faster["measured"] == round(against["ledger-once"]["hit_blocked"]["median_us"]
                                       / against["ledger.py"]["hit_blocked"]["median_us"], 2)
    # the most any implementation could be faster: ledger-once's time over the raw floor of the same run
    most = against["ledger-once"]["miss"]["median_us"] / report["floor"]["claim_complete"]["median_us"]
    assert targets["SQLite miss: ledger-once time / ledger.py time"]["floor"] == (
        f"{most:.2f}x (ledger-once's miss over the raw floor: the most two commits allow)")


@pytest.mark.slow
def test_benchmark_refuses_a_python_without_ledger_once_before_measuring():
    run = _benchmark("--quick", "--against", "ledger-once", "--ledger-once-python", sys.executable, timeout=60)
    assert run.returncode != 0 and run.stdout == ""
    assert "does not import ledger-once" in run.stderr and "pip install ledger-once==0.1.5" in run.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)  # eight runs under valgrind, about fifty times slower than natively
def test_benchmark_callgrind_counts_instructions_per_call_without_start_up():
    need("valgrind", bool(shutil.which("valgrind")), "apt-get install valgrind")
    run = _benchmark("--quick", "--store", "memory", "--scale", "100", "--json", "--callgrind", timeout=880)
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout)["callgrind"]["ledger.py"]
    assert set(counts) == {"memory_miss", "memory_hit", "sqlite_miss", "sqlite_hit"}
    # a count that kept the interpreter's start-up (hundreds of millions of instructions) would be far larger
    assert all(0 < count < 5_000_000 for count in counts.values()), counts
    assert counts["sqlite_miss"] > counts["memory_miss"]  # two commits on top of the same Python work
    least = json.loads(run.stdout)["callgrind"]["stdlib floor"]
    assert set(least) == set(counts) and all(0 < least[path] < counts[path] for path in counts), (least, counts)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_benchmarks_stdlib_floor_runs_a_new_call_once_and_checks_a_duplicates_signature(kind, tmp_path):
    worker = runpy.run_path(str(HERE / "examples" / "benchmark.py"))["WORKER"].split('if sys.argv[1] == "serve"')[0]
    check = worker + textwrap.dedent(f"""
        ran = []
        def tool(**kw):
            ran.append(kw)
            return {{"hits": len(ran)}}
        g = open_guard({kind!r})
        first, second = new_calls(2)
        assert g(tool, **first) == {{"hits": 1}} and g(tool, **second) == {{"hits": 2}}
        assert g(tool, **first) is FloorGuard.BLOCKED and len(ran) == 2
        if g.db is None:
            g.records = {{k: (text, "forged") for k, (text, sig) in g.records.items()}}
        else:
            g.db.execute("UPDATE records SET sig = 'forged'")
        assert g(tool, **first) is None and len(ran) == 2  # a forged record blocks nothing, runs nothing
        print("checked")
    """)
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={**os.environ, "BENCHMARK_FLOOR": "1"})
    assert run.returncode == 0 and run.stdout == "checked\n", run.stderr


def _mint_tokens(queue):
    queue.put([ledger._unique_token() for _ in range(3)])


def test_owner_tokens_never_repeat_across_a_fork():
    mine = [ledger._unique_token() for _ in range(3)]
    queue = FORK.Queue()
    child = forked(_mint_tokens, queue)
    child.start()
    theirs = queue.get(timeout=10)
    child.join(10)
    after = [ledger._unique_token() for _ in range(3)]
    assert len(set(mine + theirs + after)) == 9


def test_ledger_workflow_environment_variable_sets_the_default_workflow(tmp_path, monkeypatch):
    monkeypatch.setenv("LEDGER_WORKFLOW", "nightly")
    guard = Guard(str(tmp_path / "l.db"), quiet=True)
    guard(charge, 1)
    assert guard.workflow("other")(charge, 1) is not BLOCKED
    assert sorted(r["workflow"] for r in guard.history()) == ["nightly", "other"]


@given(st.text(max_size=20), st.text(max_size=20), st.dictionaries(st.text(max_size=5), st.integers(), max_size=4))
def test_fingerprint_is_sha256_of_the_canonical_json_triple(tool, workflow, arguments):
    arguments = ledger._canonical_arguments(arguments)
    canonical_triple = json.dumps([tool, workflow, arguments], sort_keys=True, separators=(",", ":"))
    assert ledger.fingerprint(tool, workflow, arguments) == \
        hashlib.sha256(canonical_triple.encode()).hexdigest()[:32]
