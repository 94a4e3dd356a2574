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
