"""ledger.py: exactly-once and singleflight for AI-agent tool calls.

Agents retry, fan out and run in parallel. When a tool charges a card or
sends an email, a duplicate call is an incident; when a tool is an expensive
lookup, identical concurrent calls waste money. ledger.py records every tool
call under a fingerprint of (tool, normalized arguments, workflow) and lets
each one run once::

    from ledger import guard

    def charge_card(order_id: int, amount: float) -> dict:
        return {"charged": amount}

    guard(charge_card, order_id=123, amount=99.0)   # runs, returns {'charged': 99.0}
    guard(charge_card, order_id=123, amount=99.0)   # blocked: returns ledger.BLOCKED

    tools = guard.wrap_tools({"charge_card": charge_card})  # a whole toolset
    tools["charge_card"](order_id=124, amount=5.0)

Shareable work (lookups, searches) runs once while identical calls wait for it
and all get its result, then reuse it for `ttl` seconds::

    guard.policy("search", replay=True, ttl=300)

Records live in SQLite (``$LEDGER_DB`` or ``./ledger.db``, opened on first
use); ``Guard(":memory:")`` keeps them in memory for tests. Workers on several
machines share PostgreSQL or Redis instead (``LEDGER_DB=postgresql://...`` or
``redis://...``, with ``LEDGER_SECRET`` set), through the companion file
ledger_servers.py, copied beside this one. Inside a running
tool, ``current_key()`` is a stable idempotency key to hand to the downstream
API, which is what makes a crash between the side effect and the record
harmless.

The file reads top to bottom in the order a call flows through it: errors ->
normalize -> fingerprint -> records and states -> the Store contract ->
engine (calls and runs, the decision, singleflight, the state machine, leases
and their heartbeat, telemetry) -> Guard -> framework adapters -> the memory
and SQLite stores (and the ledger-once files they carry over) -> command line. To verify the guarantee, read three
sections: the decision (its transition table and _decide), the state machine
(_Core.settle, which carries a decision out, and _Core.complete, which records
how a run ended), and the Store contract they rely on (check_store tests any
backend against it). The rest prepares a call or presents it.

Two companion files import this one, each a single file to copy beside it:
ledger_servers.py (PostgresStore, RedisStore) and ledger_dashboard.py (the
page `ledger serve` shows); `pip install tool-ledger` installs all three.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import contextvars
import copy
import dataclasses
import datetime as _dt
import decimal
import enum
import functools
import gc
import hashlib
import hmac
import importlib
import inspect
import itertools
import json
import logging
import math
import operator
import os
import pathlib
import re
import secrets
import site
import sqlite3
import sys
import sysconfig
import threading
import time
import types
import typing
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Annotated, Any

# ledger.py's own public names. PostgresStore and RedisStore live in ledger_servers.py and are
# imported by name (`from ledger import PostgresStore`), so `*` works with ledger.py alone.
__all__ = [
    "guard", "Guard", "Store", "MemoryStore", "SQLiteStore", "Record", "Status",
    "Policy", "Outcome", "BLOCKED", "BLOCKED_MESSAGE", "Ignore", "Identity", "current_key", "check_store", "main",
    "LedgerError", "FingerprintError", "KeyReuseError", "IntegrityError",
    "StoreError", "CompletionError", "WaitTimeout", "LeaderFailed", "ConfigError", "DeferredToolError",
    "ReentrantCallError", "LeaseLiveError", "NotAToolError", "AmbiguousRecordError",
    "OutcomeUnknown", "Done", "NOT_DONE", "UNCERTAIN_ERRORS",
]
__version__ = "0.1.0"

log = logging.getLogger("ledger")


# Public names that live in a companion file, loaded on first use by `ledger.X` or
# `from ledger import X`. They are not in __all__, so that `from ledger import *`
# works with ledger.py alone; import them by name.
_COMPANION_NAMES = {
    "PostgresStore": "ledger_servers",
    "RedisStore": "ledger_servers",
}


def __getattr__(name: str) -> Any:
    if name in _COMPANION_NAMES:
        return getattr(_companion(_COMPANION_NAMES[name], name), name)
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")


# ---------------------------------------------------------------------------
# Errors. Everything the library raises on purpose is a LedgerError, and each
# message says what to do next.
# ---------------------------------------------------------------------------

class LedgerError(Exception):
    """Base class of every error ledger.py raises on purpose."""


class FingerprintError(LedgerError, TypeError):
    """An argument has no stable canonical form; raised before the tool runs."""


class ConfigError(LedgerError, ValueError):
    """A policy, URL or setting is invalid."""


class NotAToolError(ConfigError, TypeError):
    """wrap_tools was given something that is not a tool or a toolset (a TypeError too, as
    ledger-once raised)."""


class KeyReuseError(LedgerError):
    """The same idempotency key came back with different validated arguments."""


class IntegrityError(LedgerError):
    """A stored record failed HMAC verification; it is neither replayed nor re-run."""


class DeferredToolError(LedgerError, TypeError):
    """A plain (sync) tool returned work that had not run yet (a coroutine, a future, a
    generator): refused before it runs, see _refuse_deferred."""


class ReentrantCallError(LedgerError):
    """A replay call waited for a run of its own thread or task: it would wait forever."""


class LeaseLiveError(LedgerError):
    """retry was asked for a call whose worker still holds its lease."""


class StoreError(LedgerError):
    """The store cannot be opened, read or written."""


class CompletionError(LedgerError):
    """The tool ran, but its record could not be completed. `.value` holds its result."""

    def __init__(self, message: str, value: Any = None):
        super().__init__(message)
        self.value = value


class WaitTimeout(LedgerError):
    """A duplicate waited for the running call longer than the policy's `wait`."""


class LeaderFailed(LedgerError):
    """The run a duplicate was waiting for raised; the next new call runs again."""


class OutcomeUnknown(LedgerError):
    """Whether a call's last run took effect is unknown (status UNKNOWN), so it is not run
    again until that is settled: by the policy's verify=, or by `ledger resolve` /
    guard.resolve(). `.id` is the record's id, `.key` the run's current_key()."""

    def __init__(self, message: str, id: str, key: str):
        super().__init__(message)
        self.id, self.key = id, key


class AmbiguousRecordError(LedgerError):
    """A call matches a record ledger-once kept under a name several functions share;
    raised before the tool runs, until an operator says whose record it is."""


# ---------------------------------------------------------------------------
# Normalize: turn argument values into a canonical JSON structure, so that
# equal calls encode to equal bytes in every process. Special values become
# ["\x00tag", payload] lists; user strings that start with "\x00" are escaped
# with a second one, so no user value can imitate a tag.
#
# Floats are rounded to 10 significant digits (format(x, ".10g")); a float
# that is then integral becomes an int (99.0 == 99, -0.0 == 0); NaN and the
# infinities get tags. Use Decimal or integer cents where 10 digits are not enough:
# Decimals and timedeltas are exact, whatever the thread's decimal context.
# ---------------------------------------------------------------------------

FLOAT_DIGITS = 10
_TAG = "\x00"


class _Unsupported(Exception):
    """Carries the path to a value that has no canonical form, innermost first."""

    def __init__(self, value: Any, path: list[str]):
        self.value, self.path = value, path


def _str(s: str) -> str:
    return _TAG + s if s[:1] == _TAG else s


_FLOAT_FORMAT = ".%dg" % FLOAT_DIGITS


def _float(x: float) -> Any:
    if x - x != 0.0:  # NaN or an infinity (the cheapest test for both)
        return [_TAG + "float", repr(x)]
    r = float(format(x, _FLOAT_FORMAT))
    if r - r != 0.0:  # rounding up past the largest float
        r = x
    return int(r) if r.is_integer() else r


def _list(items: Iterable[Any]) -> list:
    out: list = []
    try:
        for item in items:
            # Plain strings and ints are their own canonical form; testing for them
            # here instead of calling canonical() is a third of a fingerprint's cost,
            # and other common types go straight to their handler.
            t = type(item)
            out.append(item if t is int or (t is str and item[:1] != _TAG) else (_CANON.get(t) or canonical)(item))
    except _Unsupported as e:
        e.path.append("[%d]" % len(out))
        raise
    return out


def _dict(d: Mapping) -> Any:
    for k in d:
        if type(k) is not str:
            pairs = [[canonical(k), canonical(v)] for k, v in d.items()]
            pairs.sort(key=_dump)
            return [_TAG + "map", pairs]
    out = {}
    k = None
    try:
        for k, v in d.items():
            t = type(v)  # as in _list
            out[k if k[:1] != _TAG else _TAG + k] = v if t is int or (t is str and v[:1] != _TAG) else (
                _CANON.get(t) or canonical)(v)
    except _Unsupported as e:
        e.path.append("[%r]" % k)
        raise
    return out


def _set(s: Any) -> list:
    items = [canonical(v) for v in s]
    items.sort(key=_dump)
    return [_TAG + "set", items]


def _typed(tag: str, obj: Any, fields: Mapping) -> list:
    return [_TAG + tag, type(obj).__module__ + "." + type(obj).__qualname__, _dict(fields)]


def _datetime(d: _dt.datetime) -> list:
    if d.tzinfo is None or d.utcoffset() is None:
        return [_TAG + "naive", d.isoformat()]
    return [_TAG + "datetime", d.astimezone(_dt.timezone.utc).isoformat()]


def _decimal(d: decimal.Decimal) -> str:
    """Exact and the same under any decimal context: trailing zeros and a zero's sign dropped, as
    equal values are one call; never rounded, under a context made to fit this number's digits."""
    if not d.is_finite():
        return str(d)
    if not d:
        return "0"
    exact = decimal.Context(prec=len(d.as_tuple().digits), Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN,
                            capitals=1, clamp=0, traps=[decimal.Inexact, decimal.Rounded])
    return exact.to_sci_string(d.normalize(exact))


_CANON: dict[type, Callable[[Any], Any]] = {
    str: _str,
    int: lambda v: v,
    bool: lambda v: v,
    type(None): lambda v: v,
    float: _float,
    list: _list,
    tuple: _list,
    dict: _dict,
    set: _set,
    frozenset: _set,
    bytes: lambda v: [_TAG + "bytes", base64.b64encode(v).decode()],
    bytearray: lambda v: [_TAG + "bytes", base64.b64encode(v).decode()],
    decimal.Decimal: lambda v: [_TAG + "decimal", _decimal(v)],
    _dt.datetime: _datetime,
    _dt.date: lambda v: [_TAG + "date", v.isoformat()],
    _dt.time: lambda v: [_TAG + "time", v.isoformat()],
    _dt.timedelta: lambda v: [_TAG + "timedelta", v.days, v.seconds, v.microseconds],  # exact, not a float
    uuid.UUID: lambda v: [_TAG + "uuid", str(v)],
}


def canonical(value: Any) -> Any:
    """The canonical JSON structure of `value`; raises _Unsupported if it has none."""
    # The common types are tested inline: this runs for every value of every call.
    t = type(value)
    if t is str:
        return value if value[:1] != _TAG else _TAG + value
    if t is int or t is bool or value is None:
        return value
    if t is dict:
        return _dict(value)
    if t is list:
        return _list(value)
    handler = _CANON.get(t)
    if handler is not None:
        return handler(value)
    return _canonical_other(value)


def _canonical_other(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return [_TAG + "enum", type(value).__module__ + "." + type(value).__qualname__, canonical(value.value)]
    if isinstance(value, pathlib.PurePath):
        return [_TAG + "path", value.as_posix()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _typed("dataclass", value, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return _typed("namedtuple", value, value._asdict())
    if callable(getattr(type(value), "model_dump", None)) and not isinstance(value, type):
        return _typed("model", value, value.model_dump())  # on the class: a Mock answers any name
    for base, handler in _CANON.items():
        if isinstance(value, base) and base is not bool and base is not type(None):
            return handler(base(value) if base in (str, int, float) else value)
    raise _Unsupported(value, [])


def _no_default(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# The encoder json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
# builds on every call, built once: the same bytes, at half the cost.
_ENCODE = json.encoder.c_make_encoder and json.encoder.c_make_encoder(
    None, _no_default, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, False)


def _dump(value: Any) -> str:
    if _ENCODE is None:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "".join(_ENCODE(value, 0))


def _describe(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else t.__module__ + "." + t.__qualname__


# ---------------------------------------------------------------------------
# Fingerprint: bind a call's arguments to the tool's parameters (so positional
# and keyword spellings and defaults agree), then hash (tool, arguments,
# workflow) with sha256. Tool names are module.qualname, with the module a
# script was run as resolved to its import name (in every worker), lambdas and
# nested functions told apart by their code and the callables they capture, and
# bound methods by the class or immutable value they are bound to. A callable
# with no such name (a closure over data, a method of a mutable object) raises
# ConfigError asking for name=: never a silent merge, never a silent split.
# What a framework injects is left out, except what identifies the caller.
# ---------------------------------------------------------------------------

class _ToolInfo:
    """What the guard needs to know about a callable, computed once per callable."""

    __slots__ = ("name", "is_async", "key_spellings", "names", "name_set", "defaults", "signature", "simple",
                 "var_keyword", "injected")

    def __init__(self, fn: Callable):
        try:
            self.name: str | ConfigError = tool_name(fn)
        except ConfigError as e:
            self.name = e  # raised by _Core.record_name, only where no name= was given
        self.is_async = _is_async(fn)
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            self.signature = None
        params = list(self.signature.parameters.values()) if self.signature else []
        self.names = tuple(p.name for p in params)
        # The guard's own key keywords, where the tool has no parameter of that name.
        self.key_spellings = tuple(k for k in ("idempotency_key", "key") if k not in self.names)
        self.name_set = frozenset(self.names)
        self.defaults = tuple((p.name, p.default) for p in params if p.default is not p.empty)
        self.simple = self.signature is not None and all(
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
        self.var_keyword = next((p.name for p in params if p.kind == p.VAR_KEYWORD), None)
        self.injected = _injected_parameters(fn)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Arguments by parameter name, defaults filled in; TypeError if they do not fit."""
        if self.simple and not args and kwargs.keys() == self.name_set:
            return kwargs  # every parameter by keyword, as agent frameworks call tools
        if self.simple and len(args) <= len(self.names):
            bound = dict(zip(self.names, args))
            if not kwargs.keys() & bound.keys():
                bound.update(kwargs)
                for name, default in self.defaults:
                    bound.setdefault(name, default)
                if len(bound) == len(self.names):
                    return bound
        if self.signature is None:
            return {"*args": args, "**kwargs": kwargs}
        ba = self.signature.bind(*args, **kwargs)
        ba.apply_defaults()
        bound = dict(ba.arguments)
        extra = bound.pop(self.var_keyword, None) if self.var_keyword else None
        if extra:  # f(**options) is fingerprinted by the options' own names
            if extra.keys() & bound.keys():
                bound[self.var_keyword] = extra
            else:
                bound.update(extra)
        return bound


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _info(fn: Callable) -> _ToolInfo:
    try:
        info = _INFO.get(fn)
    except TypeError:
        return _ToolInfo(fn)
    if info is None:
        info = _INFO[fn] = _ToolInfo(fn)
    return info


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _module_name(module: str | None) -> str:
    """A function's module as it would be imported, also when it ran as a script: `__main__` in the
    parent and `__mp_main__` in spawn and forkserver workers are both the script's import name."""
    if module != "__main__" and module != "__mp_main__":
        return module or "?"
    main_mod = sys.modules.get(module)
    spec = getattr(main_mod, "__spec__", None)
    if spec is not None and spec.name and spec.name not in ("__main__", "__mp_main__"):
        return spec.name.removesuffix(".__main__")  # python -m pkg.script
    path = getattr(main_mod, "__file__", None)
    return _import_name(path) if path else "__main__"


@functools.lru_cache(maxsize=64)
def _import_name(path: str) -> str:
    """The name `import` gives the file at `path`: its stem, under each enclosing folder that has an
    __init__.py, so that `python pkg/script.py` agrees with `python -m pkg.script` and `import pkg.script`."""
    file = pathlib.Path(os.path.abspath(path))
    parts = [file.stem]
    folder = file.parent
    while (folder / "__init__.py").is_file() and folder.name:
        parts.append(folder.name)
        folder = folder.parent
    return ".".join(reversed(parts)).removesuffix(".__main__")


def tool_name(fn: Callable) -> str:
    """The stable name records of `fn` are kept under: module.qualname, the same in every process.
    ConfigError where no such name tells `fn` apart from another tool (pass name= then)."""
    return _storable(_name(fn, ()), "tool name")


def _storable(label: str, what: str) -> str:
    """`label` (a tool name, workflow or caller, which records keep as they are) if every
    store can hold it: no NUL (PostgreSQL refuses it) and no lone surrogate (no UTF-8
    store accepts one). Checked where a label is given, so a call never fails on it later."""
    if "\x00" not in label and (label.isascii() or not _has_lone_surrogate(label)):
        return label
    raise ConfigError(f"{what} {label!r} holds a NUL or a lone surrogate (text no UTF-8 store can keep); "
                      f"give a {what} without it")


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_NAME_HINT = ("pass name= (guard.once(tool, name='...') or a dict key in guard.wrap_tools({'name': tool})) "
              "to give it a stable name of your own")


def _name(fn: Any, seen: tuple) -> str:
    if isinstance(fn, functools.partial):
        return _name(fn.func, seen)  # a partial's own arguments are bound into each call (see _prepare)
    if inspect.ismethod(fn):
        return _name(fn.__func__, seen) + _bound_to(fn.__self__, fn.__func__)
    if inspect.isfunction(fn):
        return _function_name(fn, seen)
    if isinstance(fn, type) or inspect.isbuiltin(fn) or inspect.ismethoddescriptor(fn):
        owner = getattr(fn, "__self__", None)
        cls = getattr(fn, "__objclass__", owner if isinstance(owner, type) else None)
        module = getattr(fn, "__module__", None) or getattr(cls, "__module__", None)  # str.upper has none
        name = _module_name(module) + "." + fn.__qualname__
        if isinstance(fn, type) or owner is None or isinstance(owner, (type, type(sys))):
            return name  # a class, a module's function, a builtin classmethod
        return name + _bound_to(owner, fn)
    own = getattr(fn, "__dict__", None)
    if isinstance(own, dict) and "__wrapped__" in own and isinstance(own.get("__qualname__"), str):
        # functools.update_wrapper made it stand for the function it wraps (functools.lru_cache does)
        return _module_name(own.get("__module__")) + "." + own["__qualname__"]
    cls = type(fn)  # a callable instance: its class's __call__, bound to the instance
    return _module_name(cls.__module__) + "." + cls.__qualname__ + _bound_to(fn, cls.__call__)


def _bound_to(owner: Any, fn: Any) -> str:
    """What tells a method bound to `owner` apart from the same method bound to something else."""
    if isinstance(owner, type(sys)):
        return ""
    if isinstance(owner, type):  # a classmethod, told apart by the class it is called on
        defined_in = getattr(fn, "__qualname__", "").rpartition(".")[0]
        if defined_in == owner.__qualname__ and getattr(fn, "__module__", None) == owner.__module__:
            return ""
        return "[" + _module_name(owner.__module__) + "." + owner.__qualname__ + "]"
    if _is_value(owner):
        return "[" + hashlib.sha256(_dump(canonical(owner)).encode()).hexdigest()[:10] + "]"
    raise ConfigError(
        f"{getattr(fn, '__qualname__', _describe(owner))} is bound to a {_describe(owner)} instance, whose state "
        f"can change and has no canonical form, so no name can tell this instance from another one (two "
        f"configured instances would share records); {_NAME_HINT}. Instances of enums, frozen dataclasses "
        f"and named tuples of plain values are told apart by their value")


def _is_value(owner: Any) -> bool:
    """An immutable value with a canonical form: its identity is its value, the same in every process."""
    if not (isinstance(owner, enum.Enum) or isinstance(owner, tuple) or type(owner) in _CANON
            or getattr(getattr(owner, "__dataclass_params__", None), "frozen", False)):
        return False
    try:
        hash(owner)  # a frozen dataclass or a tuple holding a list could still change
        canonical(owner)
    except Exception:
        return False
    return True


def _function_name(fn: Any, seen: tuple) -> str:
    """A function defined at module or class level (or named by functools.wraps) is module.qualname.
    A lambda or nested function is told apart by its code and by the functions, classes and modules
    it captures; captured data (a start time, a client, a currency) could split one tool across
    processes or merge two, so a closure over data is refused."""
    name = _module_name(fn.__module__) + "." + fn.__qualname__
    if "<" not in fn.__qualname__:
        return name
    captured = []
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # not assigned yet
            raise ConfigError(f"{name} captures {var!r} before it is assigned; {_NAME_HINT}") from None
        captured.append(_captured_name(name, var, value, seen + (fn,)))
    digest = hashlib.sha256(_dump([_code_parts(fn.__code__), captured]).encode()).hexdigest()[:10]
    callables = [c for c in captured if c != "<self>"]
    return name + ("(" + ", ".join(callables) + ")" if callables else "") + "#" + digest


def _captured_name(name: str, var: str, value: Any, seen: tuple) -> str:
    if any(value is s for s in seen):
        return "<self>"  # a nested function that calls itself
    if isinstance(value, type(sys)):
        return value.__name__
    plain_partial = isinstance(value, functools.partial) and not value.args and not value.keywords
    if callable(value) and (not isinstance(value, functools.partial) or plain_partial):
        return _name(value, seen)
    raise ConfigError(
        f"{name} is a closure over {var!r} (a {_describe(value)}). Its records cannot be named after that "
        f"value: a value that differs between processes (a start time) would run one call twice, and "
        f"leaving it out would merge tools that differ only in it (a currency); {_NAME_HINT}, or pass "
        f"the value as an argument")


def _code_parts(code: Any) -> list:
    """What a function does, the same in every process: bytecode, names and constants, nested code too."""
    return [code.co_code.hex(), list(code.co_names), [_constant(c) for c in code.co_consts]]


def _constant(c: Any) -> Any:
    if inspect.iscode(c):
        return _code_parts(c)
    if type(c) is frozenset:  # `x in {"a", "b"}`: its repr's order changes with the hash seed
        return sorted(_dump(_constant(item)) for item in c)
    if type(c) is tuple:
        return [_constant(item) for item in c]
    return repr(c)


class Ignore:
    """`Annotated[T, ledger.Ignore]`: the parameter reaches the tool but is not part of the
    call's identity (two calls that differ only in it are the same call)."""


class Identity:
    """`Annotated[T, ledger.Identity]`: the parameter is part of the call's identity even where
    a framework injects it. `Annotated[T, ledger.Identity(lambda v: v.user_id)]` counts only
    what the function returns, which must be a plain value (str, number, dict, dataclass, ...)."""

    __slots__ = ("extract",)

    def __init__(self, extract: Callable[[Any], Any]):
        if not callable(extract):
            raise ConfigError(f"ledger.Identity takes a function value -> identity, not {_describe(extract)}")
        self.extract = extract

    def __repr__(self) -> str:
        return f"ledger.Identity({self.extract!r})"


def _itself(value: Any) -> Any:
    return value


def _context_of(value: Any) -> Any:
    """A run's user context (LangGraph Runtime / ToolRuntime, Agents SDK RunContextWrapper)."""
    return getattr(value, "context", None)


def _mcp_caller(auth_module: str, context: Any) -> Any:
    """The authenticated principal of an MCP request (None without auth): who calls, not which
    request. The SDKs keep the request's access token where get_access_token() finds it."""
    auth = sys.modules.get(auth_module)
    token = auth.get_access_token() if auth is not None else None
    if token is None:
        return None
    return [token.client_id, getattr(token, "subject", None), (getattr(token, "claims", None) or {}).get("iss")]


_SKIPPED = object()


def _deps_of(context: Any) -> Any:
    """A Pydantic AI RunContext's deps, which identify the caller (a user id, an account) but
    often also hold clients and connections, which do not: the deps without the values that
    have no canonical form, picked field by field from dataclasses, pydantic models and dicts.
    Deps that have no such fields and no canonical form get the identity error and its fixes."""
    return _plain_part(getattr(context, "deps", None), top=True)


def _plain_part(value: Any, top: bool = False) -> Any:
    try:
        canonical(value)
        return value
    except (_Unsupported, ValueError):
        pass
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(getattr(type(value), "model_fields", None), dict):
        fields = {name: getattr(value, name) for name in type(value).model_fields}
    elif isinstance(value, Mapping):
        fields = dict(value)
    else:
        return value if top else _SKIPPED
    return {str(name): part for name, field in fields.items() if (part := _plain_part(field)) is not _SKIPPED}


def _adk_caller(context: Any) -> Any:
    """Google ADK ToolContext: who calls (the app and the user), not which session or invocation."""
    return [context.session.app_name, context.user_id]


# Values a framework injects into a tool, by type: (module prefix, class name, extractor).
# extractor None: per-invocation noise (a call id, callbacks, a run's config, a store, a
# stream writer) that differs between retries of one call, passed on, never fingerprinted.
# Otherwise extractor(value) is what in the value identifies the caller (a run's user
# context, a value the application injects such as a user_id); it is fingerprinted under
# the parameter's name. A parameter's annotation is matched along each class's MRO, most
# derived class first, then row by row, so a specific row (InjectedToolCallId) wins over
# its base's (InjectedToolArg). Add a framework by adding rows.
_INJECTED: list[tuple[str, str, Callable[[Any], Any] | None]] = [
    ("langchain_core", "InjectedToolCallId", None),
    ("langgraph", "InjectedState", None),
    ("langgraph", "InjectedStore", None),
    ("langgraph", "ToolRuntime", _context_of),
    ("langchain_core", "InjectedToolArg", _itself),
    ("langchain_core", "RunnableConfig", None),
    ("langchain_core", "BaseRunManager", None),
    ("langchain_core", "BaseCallbackManager", None),
    ("langchain_core", "CallbackManagerForToolRun", None),
    ("langchain_core", "AsyncCallbackManagerForToolRun", None),
    ("langgraph", "BaseStore", None),
    ("langgraph", "StreamWriter", None),
    ("langgraph", "Runtime", _context_of),
    ("mcp", "Context", functools.partial(_mcp_caller, "mcp.server.auth.middleware.auth_context")),
    ("fastmcp", "Context", functools.partial(_mcp_caller, "fastmcp.server.dependencies")),
    ("agents", "RunContextWrapper", _context_of),
    ("pydantic_ai", "RunContext", _deps_of),
    ("workflows", "Context", None),  # LlamaIndex's workflow Context (llama_index.core.workflow)
    ("autogen_core", "CancellationToken", None),
    ("google", "ReadonlyContext", _adk_caller),  # ADK's ToolContext and CallbackContext
]
# LangChain passes its callback manager as `run_manager` to a tool's _run, annotated or not.
_INJECTED_NAMES: dict[str, Callable[[Any], Any] | None] = {"run_manager": None}
_NOT_INJECTED = object()


def _injected_parameters(fn: Callable) -> dict[str, Callable[[Any], Any] | None]:
    """{parameter: extractor} for the parameters of `fn` that are injected or marked (see _INJECTED)."""
    try:
        names = inspect.signature(fn).parameters.keys()
    except (TypeError, ValueError):
        return {}
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # one unresolvable annotation: resolve the others one by one
        hints = {name: _resolved(fn, hint) for name, hint in (getattr(fn, "__annotations__", None) or {}).items()}
    injected = {}
    for name in names:
        extract = _injection(hints[name]) if name in hints else _NOT_INJECTED
        if extract is _NOT_INJECTED:
            extract = _INJECTED_NAMES.get(name, _NOT_INJECTED)
        if extract is not _NOT_INJECTED:
            injected[name] = extract
    return injected


def _resolved(fn: Callable, hint: Any) -> Any:
    """An annotation postponed as a string, evaluated as typing.get_type_hints would; else the string."""
    if not isinstance(hint, str):
        return hint
    try:
        return eval(hint, getattr(fn, "__globals__", {}))  # noqa: S307 - the tool's own annotation
    except Exception:
        return hint


def _injection(hint: Any) -> Any:
    """A parameter's extractor from its annotation: a ledger marker first, then the table;
    _NOT_INJECTED for an ordinary argument."""
    if isinstance(hint, str):  # unresolvable: recognise the names in it
        words = set(re.findall(r"\w+", hint))
        if re.search(r"\bIdentity\s*\(", hint):
            raise ConfigError(f"the annotation {hint!r} could not be evaluated, so its ledger.Identity(...) "
                              f"cannot be applied: define the names it uses at module level")
        if "Ignore" in words or "Identity" in words:
            return None if "Ignore" in words else _itself
        return next((extract for _, cls_name, extract in _INJECTED if cls_name in words), _NOT_INJECTED)
    parts = (hint, typing.get_origin(hint), *typing.get_args(hint))
    for part in parts:
        if part is Ignore:
            return None
        if part is Identity:
            return _itself
        if isinstance(part, Identity):
            return part.extract
    for part in parts:
        cls = part if isinstance(part, type) else type(part)
        for base in getattr(cls, "__mro__", ()):
            for module, cls_name, extract in _INJECTED:
                if base.__name__ == cls_name and base.__module__.partition(".")[0] == module:
                    return extract
    return _NOT_INJECTED


def _identity_arguments(bound: Mapping[str, Any], injected: Mapping[str, Callable[[Any], Any] | None],
                        tool: str) -> dict[str, Any]:
    """The bound arguments as the call's identity: injected noise left out, and an injected
    value that identifies the caller replaced by its identifying part, checked here so that
    the error names the parameter and the fix."""
    identity = {}
    for name, value in bound.items():
        if name not in injected:
            identity[name] = value
        elif injected[name] is not None:
            try:
                identity[name] = part = injected[name](value)
            except Exception as e:
                raise FingerprintError(f"{tool}: what identifies the caller in parameter {name!r} could not be "
                                       f"taken from {_describe(value)}: {type(e).__name__}: {e}") from e
            try:
                _canonical_arguments({name: part})
            except FingerprintError as e:
                raise FingerprintError(
                    f"{tool}: parameter {name!r} is injected by the framework and identifies the caller, but "
                    f"what identifies the caller in it ({_describe(part)}) has no canonical form "
                    f"({str(e).partition('. ')[0]}). "
                    f"Make it a plain value (a dataclass, pydantic model or dict of str and numbers), or "
                    f"annotate the parameter Annotated[..., ledger.Identity(lambda v: v.context.user_id)] to "
                    f"count only what identifies the caller, or Annotated[..., ledger.Ignore] to leave it out"
                ) from None
    return identity


def _canonical_arguments(bound: Mapping[str, Any]) -> dict:
    try:
        return _dict(bound)
    except _Unsupported as e:
        outermost = e.path.pop()  # "['name']", added by _dict for the argument itself
        name = next(name for name in bound if "[%r]" % name == outermost)
        raise _fingerprint_error(name + "".join(reversed(e.path)),
                                 f"is a {_describe(e.value)}, which has no stable fingerprint") from None
    except Exception as e:  # a conversion that raised (a Mock, a self-reference, an overflow)
        raise _unfingerprintable(bound, e) from None


def _arguments_text(bound: Mapping[str, Any], arguments: dict) -> str:
    try:
        return _dump(arguments)
    except Exception as e:  # an int longer than str() allows
        raise _unfingerprintable(bound, e) from None


def _key_from(name: str, info: _ToolInfo, kwargs: dict) -> str | None:
    """The guard's key=/idempotency_key= keyword, taken out of `kwargs`, unless the tool has a
    parameter of that name: a tool's own parameters always reach it (guard.keyed passes a key then)."""
    key = None
    for spelling in info.key_spellings:
        if spelling in kwargs:
            if info.var_keyword:
                raise ConfigError(
                    f"{name} takes **{info.var_keyword}, so {spelling}= could be meant for it or for the guard; "
                    f"pass the guard's key with guard.keyed(key, tool, ...), which leaves every keyword to the tool")
            if key is not None:
                raise ConfigError("pass key= or idempotency_key=, not both")
            key = kwargs.pop(spelling)
    return key


def _argsum(bound: Mapping[str, Any], validate: bool | tuple[str, ...]) -> str:
    names = bound.keys() if validate is True else validate
    return hashlib.sha256(_dump(_canonical_arguments({n: bound.get(n) for n in names})).encode()).hexdigest()[:16]


def _fingerprint_error(where: str, problem: str) -> FingerprintError:
    if len(where) > 200:
        where = where[:120] + "..." + where[-60:]
    return FingerprintError(
        f"argument '{where}' {problem}. Pass key='...' (a stable id for this call, e.g. "
        f"key=f'refund-{{order_id}}', or guard.keyed(key, tool, ...)) so the arguments are not "
        f"fingerprinted, or pass a plain value (str, number, dict, list, dataclass, pydantic model) instead")


def _unfingerprintable(bound: Mapping[str, Any], error: BaseException) -> FingerprintError:
    """Find, off the hot path, the innermost argument value whose fingerprint fails."""
    for name, value in bound.items():
        failure = _fingerprints(value)
        if failure is None:
            continue
        if isinstance(failure, RecursionError):  # a value that contains itself, or one nested too deeply
            loop = _path_back_to_a_container(value)
            if loop is not None:
                where, inner = loop
                return _fingerprint_error(name + where, f"contains itself (a {_describe(inner)} that refers back "
                                                        f"to one of its own containers), which has no fingerprint")
            return _fingerprint_error(name, f"is nested too deeply (a {_describe(value)} over "
                                            f"{sys.getrecursionlimit() // 2} levels) to fingerprint")
        where = name   # not recursion: the failing value is within the recursion limit, so descend to it
        while True:
            for step, child in _children(value):
                if _fingerprints(child) is not None:
                    where, value = where + step, child
                    break
            else:
                break
        failure = _fingerprints(value)
        return _fingerprint_error(where, f"is a {_describe(value)}, and fingerprinting it raised "
                                         f"{type(failure).__name__}: {failure}")
    return _fingerprint_error("?", f"cannot be fingerprinted ({type(error).__name__}: {error})")


def _path_back_to_a_container(value: Any) -> tuple[str, Any] | None:
    """The path to the first value found inside `value` that is one of its own containers
    (and that value), or None. Iterative, and each container is looked into once, so any depth
    or sharing takes time in proportion to the number of containers."""
    on_path, looked_into, path = {id(value)}, set(), [(value, _children(value), "")]
    while path:
        container, children, _ = path[-1]
        step, child = next(children, (None, None))
        if step is None:  # nothing in it leads back to a container on any path
            on_path.discard(id(container))
            looked_into.add(id(container))
            path.pop()
            continue
        if id(child) in on_path:
            return "".join(s for _, _, s in path[1:]) + step, child
        if id(child) not in looked_into and (isinstance(child, (Mapping, list, tuple, set, frozenset)) or (
                dataclasses.is_dataclass(child) and not isinstance(child, type))):
            on_path.add(id(child))
            path.append((child, _children(child), step))
    return None


def _fingerprints(value: Any) -> BaseException | None:
    try:
        _dump(canonical(value))
    except Exception as e:
        return e
    return None


def _children(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in list(value.items()):
            yield "[%r]" % (k,), k
            yield "[%r]" % (k,), v
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(list(value)):
            yield "[%d]" % i, item
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield "." + f.name, getattr(value, f.name)


def fingerprint(tool: str, workflow: str, arguments: Any) -> str:
    """sha256 of the canonical (tool, workflow, arguments) triple, 32 hex digits."""
    return _fingerprint_text(tool, workflow, _dump(arguments))


def _fingerprint_text(tool: str, workflow: str, arguments_text: str) -> str:
    """`fingerprint` from the arguments already dumped, which a new call's record keeps too."""
    quote = json.encoder.encode_basestring_ascii  # what _dump does to a str, without the encoder's setup
    triple = "[" + quote(tool) + "," + quote(workflow) + "," + arguments_text + "]"  # == _dump([tool, ...])
    return hashlib.sha256(triple.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------
# Records and states. A record is one call's row in the ledger; its status
# moves only along these arrows:
#
#   (none) --claim--> RUNNING --returned---------------> SUCCESS
#                       | | |--raised-------------------> FAILED
#                       | | \--raised an uncertain error-> UNKNOWN
#                       | \--interrupted, recover="block": stays RUNNING, turns stale
#                       \--lease expired, next call (recover="retry")--> RUNNING (epoch+1)
#
#   FAILED  --next call-------------------------------> RUNNING (same run, same key)
#   SUCCESS --ttl window over, runs < max, force------> RUNNING (a new run, a new key)
#   UNKNOWN --verify= says NOT_DONE / Done(value)-----> RUNNING / SUCCESS
#   UNKNOWN --resolve(done=True / False)---------------> SUCCESS / FAILED
#   any but FAILED --retry (operator; a live lease needs force)--> FAILED (the next call runs)
#
# A takeover of an expired lease, or of an UNKNOWN record, asks the policy's
# verifier first when there is one: it may end the call (SUCCESS or UNKNOWN)
# without running it. Which arrow a call takes is _decide's table (engine).
#
# Every transition is one compare-and-set on (epoch, owner), so two workers
# never both win, and a leader whose lease was taken over (a lower epoch)
# cannot overwrite the new leader's record.
# ---------------------------------------------------------------------------

class Status(enum.StrEnum):
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"   # the run may or may not have taken effect: duplicates do not run


# The states a record is shown in, the one vocabulary of every command and of the dashboard
# (ledger_dashboard.py): its status, or STALE for a RUNNING one whose lease ran out.
STALE = "STALE"
STATES = (Status.RUNNING.value, STALE, *(s.value for s in Status if s != Status.RUNNING))


# The only states whose records `prune` may remove: a finished call's. A RUNNING
# record (or any state added later that still stops duplicates) is never prunable.
PRUNABLE = (Status.SUCCESS.value, Status.FAILED.value)
# The states whose records are signed, and verified before they steer a call: a SUCCESS
# replays or blocks; an UNKNOWN blocks, and gives the verifier and the next run their key.
_SIGNED = (Status.SUCCESS.value, Status.UNKNOWN.value)
# Status.X.value is two Python-level calls: on the hot path, read it once
_RUNNING, _SUCCESS = Status.RUNNING.value, Status.SUCCESS.value


@dataclasses.dataclass(slots=True)
class Record:
    """One call in the ledger. Treat as immutable: use `evolve` for changes.

    Times on the store's lease clock (Store.now(), shared by every worker) decide;
    wall-clock times (time.time()) are for people. attempts and blocked are counters
    the engine buffers and adds later (add_counts), but for a new record's first attempt,
    which its insert writes; every other field is state, written only by a compare-and-set
    on (epoch, owner).
    """

    # -- identity
    id: str                     # the call's fingerprint: tool, workflow, and canonical arguments or key
    tool: str                   # the tool's record name (see _Core.record_name)
    workflow: str               # the workflow the call belongs to
    caller: str | None          # as_caller(...)'s label, for people; identity is in the arguments
    # -- state (the state machine above)
    status: str                 # a Status value
    owner: str                  # token of the worker that claimed the latest run
    epoch: int                  # +1 on every claim; a run whose epoch was passed is fenced off
    lease_until: float          # lease clock: RUNNING is presumed alive until then; a finished
                                # record holds the lease-clock time it finished
    run_key: str                # current_key() of the latest run, the downstream idempotency key:
                                # the id for a call that runs once, id.<token> for each later run
    runs: int = 0               # successful runs in this ttl window; `max` counts these
    # -- wall-clock times, for people (the order of the fields is the stores' column order)
    created: float = 0.0        # first claim
    updated: float = 0.0        # last write of the state
    started: float | None = None    # start of the latest run
    duration: float | None = None   # seconds the latest finished run took
    expires: float | None = None    # lease clock, not wall clock: when the ttl window ends (None: never)
    # -- counts, the outcome, and what was called
    attempts: int = 0           # counter: calls that reached this record (runs and duplicates)
    executed: int = 0           # runs of the tool, one per claim won (a verified Done adds none)
    blocked: int = 0            # counter: duplicates answered without running (blocked, replayed, shared)
    result: str | None = None   # the last success's result, encoded (see _dump_result), or None
    sig: str | None = None      # HMAC of what steers the next call, on SUCCESS and UNKNOWN (see _sign)
    unstored: str | None = None  # why the result was not kept: duplicates then get BLOCKED
    error: str | None = None    # "Type: message" of the last failure, or why the outcome is unknown
    argsum: str | None = None   # with key= and validate=: digest of the validated arguments
    args: str | None = None     # the arguments as shown to operators (never executed)
    cost: float | None = None   # the policy's cost of one run, for the savings report

    def evolve(self, **changes: Any) -> Record:
        record = Record(*_record_values(self))
        for name, value in changes.items():
            setattr(record, name, value)
        return record

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(RECORD_FIELDS, _record_values(self)))

    def stale(self, now: float | None = None) -> bool:
        """RUNNING whose lease ran out: its owner died or was paused. `now` is on the
        store's lease clock (Store.now()); without it, wall time, which is near it."""
        return self.status == Status.RUNNING and self.lease_until <= (now or time.time())


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))
_record_values = operator.attrgetter(*RECORD_FIELDS)  # all fields in order, in one C call
COUNTER_FIELDS = ("attempts", "blocked")
STATE_FIELDS = tuple(f for f in RECORD_FIELDS if f not in COUNTER_FIELDS)


class _Blocked:
    """The value a blocked duplicate returns. Falsy, a singleton, survives pickling."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "BLOCKED"

    def __str__(self) -> str:  # what a framework that stringifies a tool's result shows the model
        return BLOCKED_MESSAGE

    def __bool__(self) -> bool:
        return False

    def __reduce__(self):
        return (_Blocked, ())


BLOCKED = _Blocked()
# What a blocked duplicate returns through a framework tool (wrap_tools, once) unless
# blocked_return= says otherwise: a message the model reads, where BLOCKED would be
# shown as the bare word or rejected by the framework's output checks.
BLOCKED_MESSAGE = "already done: an identical call ran before, so this one was not run again"


class _Unset:
    """blocked_return's default: BLOCKED from a plain function, BLOCKED_MESSAGE through a framework."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()

RECOVER_MODES = ("retry", "block")


# -- uncertain outcomes ---------------------------------------------------------
# An error that leaves open whether the side effect happened: the request may have
# reached the other side before the answer was lost. Classes, and "package.Class"
# names matched against the error's classes (the top-level package of their module),
# so that no HTTP client is imported to name its errors. TimeoutError covers
# socket.timeout and asyncio.TimeoutError (aliases of it) and aiohttp's timeouts;
# ConnectionError covers resets, aborts and broken pipes, and http.client's
# RemoteDisconnected. A refused connection is counted too: it costs one verification,
# and a wrong "certain" costs a second charge.
UNCERTAIN_ERRORS: tuple[type[BaseException] | str, ...] = (
    TimeoutError, ConnectionError,
    "requests.Timeout", "requests.ConnectionError", "urllib3.TimeoutError", "urllib3.ProtocolError",
    "httpx.TimeoutException", "httpx.NetworkError", "httpx.RemoteProtocolError",
    "aiohttp.ClientConnectionError", "aiohttp.ClientPayloadError",
    "openai.APIConnectionError", "anthropic.APIConnectionError", "stripe.APIConnectionError",
    "botocore.ConnectionError", "botocore.HTTPClientError",
)


@dataclasses.dataclass(frozen=True)
class Done:
    """A verifier's answer: the effect happened, and `value` is what the call returns
    (and is recorded, as if the tool had returned it)."""

    value: Any = None


class _NotDone:
    """A verifier's answer: the effect did not happen, so the call runs (with the same key)."""

    def __repr__(self) -> str:
        return "NOT_DONE"

    def __reduce__(self):
        return "NOT_DONE"


NOT_DONE: Any = _NotDone()


def _is_uncertain(error: BaseException, uncertain: tuple[type[BaseException] | str, ...]) -> bool:
    """Whether `error` is one the policy counts as leaving the outcome unknown."""
    for kind in type(error).__mro__:
        for u in uncertain:
            if kind is u or u == f"{kind.__module__.partition('.')[0]}.{kind.__name__}":
                return True
    return False


@dataclasses.dataclass(frozen=True)
class Policy:
    """How calls of one tool are treated.

    unlimited: run every call, keep no record (read-only tools).
    replay:    duplicates get the recorded result, waiting for a running call
               (singleflight); otherwise they get BLOCKED at once.
    max:       how many successful runs a call may have (one at a time);
               None means 1, as in ledger-once.
    ttl:       seconds after a success when the call may run again; None or 0
               (as in ledger-once): never.
    lease:     seconds a running call is presumed alive without a heartbeat.
    recover:   "retry" lets the next call take over an expired lease;
               "block" keeps it blocked until an operator retries it.
    validate:  True, or argument names: with key=, the same key with other
               values of those arguments raises KeyReuseError.
    cost:      what one run costs, for the savings report.
    serializer: an object or pair with dumps(value) -> str and loads(str).
    wait:      longest time in seconds a duplicate waits for a running call.
    fail_open: when the store cannot be reached (a StoreError before the call
               is claimed), run the tool unguarded, with a warning, instead of
               raising; only for tools that are safe to run twice (lookups).
    uncertain: the errors after which whether the tool took effect is unknown
               (classes, or "package.Class" names): the call is recorded UNKNOWN,
               not FAILED, and is not run again until verified or resolved.
               Default UNCERTAIN_ERRORS (timeouts, dropped connections); () to
               re-run after any error.
    verify:    verify(key, arguments) -> Done(value) | NOT_DONE | None (unknown),
               asked before a run that could repeat a side effect (a takeover of
               an expired lease, a retry of an UNKNOWN call): whether the run with
               that current_key() took effect. May be async for async tools.
    """

    unlimited: bool = False
    replay: bool = False
    max: int = 1
    ttl: float | None = None
    lease: float = 30.0
    recover: str = "retry"
    validate: bool | tuple[str, ...] = False
    cost: float | None = None
    serializer: Any = None
    wait: float | None = None
    fail_open: bool = False
    uncertain: tuple[type[BaseException] | str, ...] = UNCERTAIN_ERRORS
    verify: Callable[[str, dict[str, Any]], Any] | None = None

    @classmethod
    def of(cls, **options: Any) -> Policy:
        """A policy from keyword options, as guard.policy and guard.once take them; an unknown
        option is a ConfigError that lists the known ones."""
        unknown = sorted(set(options) - set(POLICY_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown policy option{'s' * (len(unknown) > 1)} {', '.join(unknown)}: a policy "
                              f"takes {', '.join(POLICY_OPTIONS)} (see help(ledger.Policy))")
        return cls(**options)

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise ConfigError(f"policy {what}")
        # ledger-once's spellings of the defaults: max=None is one run, ttl=0 no expiry
        if self.max is None:
            object.__setattr__(self, "max", 1)
        if self.ttl == 0 and not isinstance(self.ttl, bool):
            object.__setattr__(self, "ttl", None)
        need(isinstance(self.max, int) and not isinstance(self.max, bool) and self.max >= 1,
             f"max must be a whole number >= 1, not {self.max!r}")
        need(self.ttl is None or (isinstance(self.ttl, (int, float)) and self.ttl > 0),
             f"ttl must be seconds > 0 or None, not {self.ttl!r}")
        need(isinstance(self.lease, (int, float)) and self.lease > 0, f"lease must be seconds > 0, not {self.lease!r}")
        need(self.recover in RECOVER_MODES, f"recover must be one of {RECOVER_MODES}, not {self.recover!r}")
        need(self.wait is None or (isinstance(self.wait, (int, float)) and self.wait >= 0),
             f"wait must be seconds >= 0 or None, not {self.wait!r}")
        need(self.cost is None or isinstance(self.cost, (int, float)), f"cost must be a number, not {self.cost!r}")
        need(isinstance(self.fail_open, bool), f"fail_open must be True or False, not {self.fail_open!r}")
        if isinstance(self.uncertain, (list, set, frozenset)) or isinstance(self.uncertain, type):
            object.__setattr__(self, "uncertain", tuple(self.uncertain) if not isinstance(self.uncertain, type)
                               else (self.uncertain,))
        need(isinstance(self.uncertain, tuple) and all(
            (isinstance(u, type) and issubclass(u, BaseException)) or (isinstance(u, str) and "." in u)
            for u in self.uncertain),
            f"uncertain must be exception classes or 'package.Class' names, not {self.uncertain!r}")
        need(self.verify is None or callable(self.verify),
             f"verify must be a function verify(key, arguments) or None, not {self.verify!r}")
        if isinstance(self.validate, (list, tuple, set, frozenset)):
            object.__setattr__(self, "validate", tuple(sorted(self.validate)))
        need(isinstance(self.validate, (bool, tuple)), f"validate must be True or argument names, not {self.validate!r}")
        if self.serializer is not None:
            _codec(self.serializer)


POLICY_OPTIONS = tuple(f.name for f in dataclasses.fields(Policy))
DEFAULT_POLICY = Policy()
MAX_RESULT_BYTES = 1 << 20


def _codec(serializer: Any) -> tuple[Callable[[Any], str], Callable[[str], Any]]:
    if isinstance(serializer, (tuple, list)) and len(serializer) == 2 and all(map(callable, serializer)):
        return serializer[0], serializer[1]
    if callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None)):
        return serializer.dumps, serializer.loads
    raise ConfigError(f"serializer must have dumps and loads, or be a (dumps, loads) pair, not {serializer!r}")


# Results are stored as JSON text and come back equal and of the same type.
# A result made only of JSON's own types (dicts with str keys, lists, str,
# int, float, bool, None) is stored as plain JSON, as records always were.
# Any other value that can come back exactly (tuples, dicts with other keys,
# sets, bytes, Decimal, dates and times, UUIDs, and these nested) is stored
# behind the marker "~", which no JSON text starts with, with canonical()'s
# tags: ["\x00tuple", [...]], user strings starting with "\x00" escaped.
# Anything else, subclasses included (an IntEnum would come back an int), is
# refused: the record keeps why in `unstored`. ASCII output keeps NULs and
# lone surrogates as \u escapes, which every store can hold.
# The encoder json.dumps(value, separators=(",", ":")) builds on every call, built once (as
# _ENCODE is). No circular-reference markers: _pack has walked the value already, and a
# value that contains itself fails there, with RecursionError.
_RESULT_ENCODE = json.encoder.c_make_encoder and json.encoder.c_make_encoder(
    None, _no_default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
_TAGGED = "~"


def _encode_result(packed: Any) -> str:
    if _RESULT_ENCODE is None:
        return json.dumps(packed, separators=(",", ":"))
    return "".join(_RESULT_ENCODE(packed, 0))


def _dump_result(value: Any) -> str:
    """The stored text of a result; _Unsupported (with its path) if it cannot come back exactly."""
    packed = _pack(value)
    if packed is value:  # plain JSON: one walk to check, then the C encoder
        return _encode_result(value)
    return _TAGGED + _encode_result(packed)


def _load_result(text: str) -> Any:
    if text[:1] != _TAGGED:
        return json.loads(text)
    return _unpack(json.loads(text[1:]))


def _pack(v: Any) -> Any:
    """`v` itself if it is plain JSON, else its tagged form. Exact types only: a subclass
    (an IntEnum, a namedtuple, an OrderedDict) would come back as its base."""
    pack = _PACK.get(type(v))
    if pack is None:
        raise _Unsupported(v, [])
    return pack(v)


def _pack_list(items: list) -> list:
    out = None
    i = 0
    try:
        for i, item in enumerate(items):
            t = type(item)  # plain scalars inline, as in canonical(): most of a result is them
            packed = item if t is int or t is float or t is bool or item is None or (
                t is str and item[:1] != _TAG) else _pack(item)
            if out is None:
                if packed is item:
                    continue
                out = items[:i]
            out.append(packed)
    except _Unsupported as e:
        e.path.append("[%d]" % i)
        raise
    return items if out is None else out


def _pack_dict(d: dict) -> Any:
    out = None
    k = None
    try:
        for k, v in d.items():
            t = type(v)  # as in _pack_list
            packed = v if t is int or t is float or t is bool or v is None or (
                t is str and v[:1] != _TAG) else _pack(v)
            if out is None:
                if type(k) is str and k[:1] != _TAG and packed is v:
                    continue
                if type(k) is not str:
                    return _pack_map(d)
                out = {}
                for before, value in d.items():  # the plain pairs before this one
                    if before is k:
                        break
                    out[before] = value
            if type(k) is not str:
                return _pack_map(d)
            out[_TAG + k if k[:1] == _TAG else k] = packed
    except _Unsupported as e:
        e.path.append("[%r]" % (k,))
        raise
    return d if out is None else out


def _pack_map(d: dict) -> list:
    pairs = []
    k = None
    try:
        for k, v in d.items():
            pairs.append([_pack(k), _pack(v)])
    except _Unsupported as e:
        e.path.append("[%r]" % (k,))
        raise
    return [_TAG + "map", pairs]


def _pack_datetime(d: _dt.datetime) -> list:
    return [_TAG + "datetime", d.replace(tzinfo=None).isoformat(), d.fold, _pack_zone(d.tzinfo)]


def _pack_time(t: _dt.time) -> list:
    return [_TAG + "time", t.replace(tzinfo=None).isoformat(), t.fold, _pack_zone(t.tzinfo)]


def _pack_zone(tz: Any) -> Any:
    """A time zone that can be rebuilt exactly: none, a fixed offset (named or not) or an IANA zone."""
    if tz is None:
        return None
    if type(tz) is _dt.timezone:
        offset = tz.utcoffset(None)
        return [offset.days, offset.seconds, offset.microseconds, tz.tzname(None)]
    key = getattr(tz, "key", None)
    if type(tz).__module__ == "zoneinfo" and isinstance(key, str):
        return key
    raise _Unsupported(tz, [])


def _unpack_zone(zone: Any) -> Any:
    if zone is None:
        return None
    if isinstance(zone, str):
        import zoneinfo  # only results that hold an IANA zone pay for the import
        return zoneinfo.ZoneInfo(zone)
    offset = _dt.timedelta(zone[0], zone[1], zone[2])
    default = _dt.timezone(offset)
    return default if zone[3] == default.tzname(None) else _dt.timezone(offset, zone[3])


def _b64(v: bytes | bytearray) -> str:
    return base64.b64encode(v).decode()


_PACK: dict[type, Callable[[Any], Any]] = {
    str: lambda v: v if v[:1] != _TAG else _TAG + v,
    int: _itself, float: _itself, bool: _itself, type(None): _itself,
    dict: _pack_dict,
    list: _pack_list,
    tuple: lambda v: [_TAG + "tuple", _pack_list(list(v))],
    set: lambda v: [_TAG + "set", _pack_list(list(v))],
    frozenset: lambda v: [_TAG + "frozenset", _pack_list(list(v))],
    bytes: lambda v: [_TAG + "bytes", _b64(v)],
    bytearray: lambda v: [_TAG + "bytearray", _b64(v)],
    decimal.Decimal: lambda v: [_TAG + "decimal", str(v)],  # str() and Decimal(str) are exact
    _dt.datetime: _pack_datetime,
    _dt.date: lambda v: [_TAG + "date", v.isoformat()],
    _dt.time: _pack_time,
    _dt.timedelta: lambda v: [_TAG + "timedelta", v.days, v.seconds, v.microseconds],
    uuid.UUID: lambda v: [_TAG + "uuid", str(v)],
}

_UNPACK: dict[str, Callable[[list], Any]] = {
    _TAG + "tuple": lambda v: tuple(map(_unpack, v[1])),
    _TAG + "map": lambda v: {_unpack(k): _unpack(x) for k, x in v[1]},
    _TAG + "set": lambda v: set(map(_unpack, v[1])),
    _TAG + "frozenset": lambda v: frozenset(map(_unpack, v[1])),
    _TAG + "bytes": lambda v: base64.b64decode(v[1]),
    _TAG + "bytearray": lambda v: bytearray(base64.b64decode(v[1])),
    _TAG + "decimal": lambda v: decimal.Decimal(v[1]),
    _TAG + "datetime": lambda v: _dt.datetime.fromisoformat(v[1]).replace(fold=v[2], tzinfo=_unpack_zone(v[3])),
    _TAG + "date": lambda v: _dt.date.fromisoformat(v[1]),
    _TAG + "time": lambda v: _dt.time.fromisoformat(v[1]).replace(fold=v[2], tzinfo=_unpack_zone(v[3])),
    _TAG + "timedelta": lambda v: _dt.timedelta(v[1], v[2], v[3]),
    _TAG + "uuid": lambda v: uuid.UUID(v[1]),
}


def _unpack(v: Any) -> Any:
    t = type(v)
    if t is str:
        return v[1:] if v[:1] == _TAG else v
    if t is list:
        head = v[0] if v else None
        if type(head) is str and head[:1] == _TAG and head[1:2] != _TAG:
            return _UNPACK[head](v)
        return [_unpack(item) for item in v]
    if t is dict:
        return {(k[1:] if k[:1] == _TAG else k): _unpack(x) for k, x in v.items()}
    return v


# A SUCCESS record's signature covers every field a decision reads from it: whether
# it counts as done (status, runs, expires), for which call (id: a hash of the tool,
# workflow and arguments or key) and arguments (argsum), under which key (run_key,
# epoch), and what it replays (result, unstored). The two free texts carry their
# lengths, so no text can imitate a boundary. Text is encoded with surrogatepass, so no
# string a tool returns can make signing fail after the tool has run. Signatures of
# version 1 (no prefix) covered id, epoch, run_key and the result only; records
# written then still verify.
def _sign(secret: bytes, r: Record) -> str:
    result, unstored = r.result, r.unstored
    message = (f"v2\x00{r.id}\x00{r.status}\x00{r.epoch}\x00{r.run_key}\x00{r.runs}\x00{r.expires!r}\x00"
               f"{r.argsum}\x00{-1 if result is None else len(result)}\x00{-1 if unstored is None else len(unstored)}"
               f"\x00{result or ''}{unstored or ''}")
    return "v2:" + _mac(secret, message)


def _sign_v1(secret: bytes, r: Record) -> str:
    return _mac(secret, "\x00".join((r.id, str(r.epoch), r.run_key, r.result or "", r.unstored or "")))


def _verified(secret: bytes, r: Record) -> bool:
    """Whether a completed record carries the signature this secret gives it."""
    if r.sig is None:
        return False
    expected = _sign(secret, r) if r.sig.startswith("v2:") else _sign_v1(secret, r)
    return hmac.compare_digest(r.sig, expected)


def _mac(secret: bytes, message: str) -> str:
    mac = _keyed_hmac(secret).copy()
    mac.update(message.encode("utf-8", "surrogatepass"))  # any str, lone surrogates included, one way
    return mac.hexdigest()


@functools.lru_cache(maxsize=16)
def _keyed_hmac(secret: bytes) -> Any:
    """An HMAC with the key already set up; copying it is cheaper than setting up the key per record.
    It is OpenSSL's HMAC object itself where hmac.HMAC wraps one (same copy, update and hexdigest),
    which spares three Python-level calls per signature."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    return getattr(mac, "_hmac", None) or mac


@dataclasses.dataclass(slots=True)
class Outcome:
    """What a guarded call did. `source` is one of: executed, replayed, shared,
    blocked, unlimited, unguarded (run without the store, under fail_open), verified
    (the policy's verifier said an earlier run took effect: nothing ran)."""

    value: Any
    source: str
    key: str | None = None
    record: Record | None = None
    fenced: bool = False   # executed, but another worker had taken the call over: not recorded

    @property
    def ran(self) -> bool:
        return self.source in ("executed", "unlimited", "unguarded")


# ---------------------------------------------------------------------------
# The Store contract. A store keeps records and offers a handful of atomic
# operations; all logic lives in the engine, so a backend is a thin translation
# of these methods into its own atomic primitives. `check_store` verifies one.
# The memory and SQLite stores come after the adapters; PostgreSQL and Redis
# live in the companion file ledger_servers.py, loaded when a URL names them.
# ---------------------------------------------------------------------------

class Store:
    """The interface every backend implements. Each method is atomic.

    get(id)                   the record, or None
    insert(record)            add it if no record has its id; True if added
    insert_or_get(id, claim)  claim a new call: where no record has this id, insert
                              claim() (a function that makes the RUNNING record)
                              and return that very record; else return the stored
                              one, left alone (None: deleted meanwhile). The default
                              reads first and calls claim() only to insert; SQLite
                              tries the insert first after a look that found none; a
                              store that claims and reads in one round trip calls
                              claim() always
    swap(record, epoch, owner) replace the stored record's state fields with
                              record's iff the stored epoch and owner match;
                              the counters attempts and blocked are kept
    delete(id, epoch=None)    remove it (only at that epoch, if given)
    add_counts({id: (attempts, blocked)})  increment counters of existing records; may
                              return the ids it skipped because another session
                              holds them locked (the engine writes them later)
    records(workflow=None, tool=None)      a list, oldest first
    clear(workflow=None)      delete records (of one workflow); how many
    prune(before, now, statuses, workflow=None, dry_run=False, batch=PRUNE_BATCH)
                              delete every record in one of `statuses` (a subset
                              of PRUNABLE, of one workflow) whose ttl window ended
                              by `now` or that finished (updated) before `before`,
                              at most `batch` per transaction, never loading them
                              all; {(status, tool): count} of what it deleted
                              (dry_run: would delete, deleting nothing)
    wait(id, timeout)         sleep up to timeout, waking early if id may have
                              changed (an optimisation; sleeping is correct)
    wait_async(id, timeout)   the same for a coroutine: it must not block the loop
    secret()                  the HMAC key when none is configured
    now()                     the lease clock: seconds on a clock that every process
                              using the store shares, for leases and ttl windows
                              (lease_until, expires); created, updated and started
                              are wall-clock times, for people
    close()
    """

    url = "store"
    # True when the store holds calls carried over from ledger-once; only then does a
    # call that has no record of its own look for one (see _Core.adopt).
    legacy = False
    # True when a look (insert_or_get) is a round trip to a server: callers in one process
    # that look at the same call at the same moment then share one (see _share_look).
    shared_looks = False

    def get(self, id: str) -> Record | None:
        raise NotImplementedError

    def insert(self, record: Record) -> bool:
        raise NotImplementedError

    def swap(self, record: Record, epoch: int, owner: str) -> bool:
        raise NotImplementedError

    def insert_or_get(self, id: str, claim: Callable[[], Record]) -> Record | None:
        stored = self.get(id)
        if stored is None:
            record = claim()
            if self.insert(record):
                return record
            stored = self.get(id)
        return stored

    def delete(self, id: str, epoch: int | None = None) -> bool:
        raise NotImplementedError

    def add_counts(self, counts: Mapping[str, tuple[int, int]]) -> Iterable[str] | None:
        raise NotImplementedError

    def records(self, workflow: str | None = None, tool: str | None = None) -> list[Record]:
        raise NotImplementedError

    def clear(self, workflow: str | None = None) -> int:
        raise NotImplementedError

    def prune(self, before: float, now: float, statuses: tuple[str, ...] = PRUNABLE, workflow: str | None = None,
              dry_run: bool = False, batch: int | None = None) -> dict[tuple[str, str], int]:
        raise NotImplementedError

    def wait(self, id: str, timeout: float) -> None:
        time.sleep(timeout)

    async def wait_async(self, id: str, timeout: float) -> None:
        await asyncio.sleep(timeout)

    def secret(self) -> bytes:
        raise ConfigError(
            f"{type(self).__name__} has no place for a signing key: set LEDGER_SECRET "
            f"(the same value on every worker) or pass Guard(secret=...)")

    def close(self) -> None:
        pass

    def now(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


PRUNE_BATCH = 1000   # records deleted per transaction (or script): writers wait for one batch at most


def _prunable(r: Record, before: float, now: float, statuses: tuple[str, ...], workflow: str | None) -> bool:
    """The prune rule, as the SQL and Lua versions below state it too."""
    return (r.status in PRUNABLE and r.status in statuses and (workflow is None or r.workflow == workflow)
            and ((r.expires is not None and r.expires <= now) or r.updated < before))


def _tally(counts: dict[tuple[str, str], int], status: str, tool: str, n: int = 1) -> None:
    counts[(status, tool)] = counts.get((status, tool), 0) + n


def open_store(spec: str | os.PathLike | Store | None, *, create: bool = True) -> Store:
    """A store from a Store, a file path, ":memory:" or a URL. `create=False` refuses
    to make a new SQLite file where there is none."""
    if _is_ledger_once_store(spec):
        raise ConfigError(
            f"{type(spec).__name__} implements ledger-once's store methods (claim, put, all); a ledger.py store "
            f"implements get, insert, swap, delete, add_counts, records and clear (see help(ledger.Store) and "
            f"ledger.check_store), or use the built-in PostgresStore or RedisStore")
    if isinstance(spec, Store):
        return spec
    spec = os.fspath(spec) if spec is not None else (os.environ.get("LEDGER_DB") or "ledger.db")
    if spec == ":memory:":
        return MemoryStore()
    scheme, sep, rest = spec.partition("://")
    if not sep:
        return SQLiteStore(spec, create=create)
    if scheme == "sqlite":
        return SQLiteStore(rest[1:] if rest.startswith("/") else rest, create=create)
    if scheme in ("postgresql", "postgres"):
        dsn, table = _without_query_parameter(spec, "table")
        return _companion("ledger_servers", "PostgresStore").PostgresStore(dsn, table=table or "ledger")
    if scheme in ("redis", "rediss"):
        url, prefix = _without_query_parameter(spec, "prefix")
        return _companion("ledger_servers", "RedisStore").RedisStore(
            url, prefix=prefix if prefix is not None else "ledger:")
    raise ConfigError(f"unknown store URL scheme {scheme + '://'!r}: use a file path, ':memory:', sqlite:///path, "
                      f"postgresql://user@host/db or redis://host:6379/0")


def _without_query_parameter(url: str, name: str) -> tuple[str, str | None]:
    """`url` without the query parameter `name` (which the driver would reject), and its value."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in query if k == name]
    if not values:
        return url, None
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != name])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), values[-1]


def _is_ledger_once_store(spec: Any) -> bool:
    """A store written to ledger-once's six-method protocol, which this engine cannot drive."""
    if all(callable(getattr(spec, m, None)) for m in ("claim", "put", "all")):
        return not isinstance(spec, Store) or type(spec).insert is Store.insert
    return False


def _companion(module: str, what: str) -> types.ModuleType:
    """Import a companion file of ledger.py (ledger_servers.py, ledger_dashboard.py), or say
    in one line how to get it. Each is a single copyable file beside ledger.py that imports
    ledger; pip install tool-ledger installs them all."""
    if __name__ == "__main__":  # run as `python ledger.py`: the companion's `import ledger` must get this module
        sys.modules.setdefault("ledger", sys.modules[__name__])
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ConfigError(f"{what} lives in {module}.py: copy it next to ledger.py "
                          f"({os.path.dirname(os.path.abspath(__file__))}), or pip install tool-ledger, "
                          f"which installs it") from None


def check_store(store: Store) -> None:
    """Conformance checks for a Store implementation; raises AssertionError on a defect.

    Safe against a live database: it works only on scratch records of its own
    (a workflow named ledger-check-<random>) and removes them afterwards.
    """
    scope = "ledger-check-" + secrets.token_hex(6)
    now = time.time()

    def scratch(n: int, **kw: Any) -> Record:
        base = dict(id=f"{scope}-{n}", tool="ledger.check", workflow=scope, caller=None,
                    status=Status.RUNNING.value, owner="a", epoch=1, lease_until=now + 60,
                    run_key=f"{scope}-{n}", created=now + n, updated=now)
        base.update(kw)
        return Record(**base)

    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise AssertionError(f"{type(store).__name__}: {what}")

    try:
        first = scratch(1, args='{"x":"<b>é</b>"}', argsum="s", expires=now + 5.5)
        expect(store.get(first.id) is None, "get of a missing id must return None")
        expect(store.insert(first) is True, "insert of a new record must return True")
        expect(store.insert(scratch(1, owner="b")) is False, "insert of an existing id must return False")
        got = store.get(first.id)
        expect(got is not None and got.as_dict() == first.as_dict(),
               f"get must return the inserted record unchanged, got {got!r}")
        claimed = scratch(3)
        expect(store.insert_or_get(claimed.id, lambda: claimed) is claimed,
               "insert_or_get of a new id must insert claim()'s record and return that very record")
        got = store.get(claimed.id)
        expect(got is not None and got.as_dict() == claimed.as_dict(), "insert_or_get must store that record unchanged")
        kept = store.insert_or_get(first.id, lambda: scratch(1, owner="b"))
        expect(kept is not None and kept.as_dict() == first.as_dict() == store.get(first.id).as_dict(),
               "insert_or_get of an existing id must return the stored record and leave it alone")
        expect(store.delete(claimed.id) is True, "delete of a record must succeed")

        done = first.evolve(status=Status.SUCCESS.value, result='{"v":1}', sig="s1", duration=0.25, runs=1)
        expect(store.swap(done, 2, "a") is False, "swap with a wrong epoch must fail")
        expect(store.swap(done, 1, "b") is False, "swap with a wrong owner must fail")
        store.add_counts({first.id: (3, 2), f"{scope}-missing": (1, 1)})
        expect(store.get(f"{scope}-missing") is None, "add_counts must not create records")
        expect(store.swap(done.evolve(attempts=99, blocked=99), 1, "a") is True, "swap with epoch and owner must win")
        got = store.get(first.id)
        expect(got.status == "SUCCESS" and got.result == '{"v":1}' and got.runs == 1, "swap must write state fields")
        expect((got.attempts, got.blocked) == (3, 2), f"swap must keep counters, got {(got.attempts, got.blocked)}")

        second = scratch(2, tool="ledger.check2")
        store.insert(second)
        racers = 8
        results: list[bool] = []
        barrier = threading.Barrier(racers)

        def take_over(i: int) -> None:
            barrier.wait()
            results.append(store.swap(second.evolve(owner=f"w{i}", epoch=2), 1, "a"))

        def count() -> None:
            barrier.wait()
            while store.add_counts({second.id: (1, 1)}):   # skipped while another holds it: try again
                time.sleep(0.001)

        for target in (take_over, count):
            threads = [threading.Thread(target=target, args=(i,) if target is take_over else ())
                       for i in range(racers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        expect(results.count(True) == 1, f"exactly one concurrent swap must win, {results.count(True)} did")
        got = store.get(second.id)
        expect((got.attempts, got.blocked) == (racers, racers), "concurrent add_counts must all count")

        ids = [r.id for r in store.records(workflow=scope)]
        expect(ids == [first.id, second.id], f"records(workflow) must list exactly its records oldest first: {ids}")
        expect([r.id for r in store.records(workflow=scope, tool="ledger.check2")] == [second.id],
               "records(tool=) must filter by tool")
        expect(store.delete(second.id, epoch=1) is False, "delete at a stale epoch must fail")
        expect(store.delete(second.id, epoch=2) is True, "delete at the current epoch must succeed")
        expect(store.get(second.id) is None, "a deleted record must be gone")
        expect(store.clear(workflow=scope) == 1, "clear(workflow) must count what it removed")
        expect(store.records(workflow=scope) == [], "clear(workflow) must remove the workflow's records")
        _check_prune(store, scratch, expect, scope, now)
    finally:
        store.clear(workflow=scope)


def _check_prune(store: Store, scratch: Callable[..., Record], expect: Callable[[bool, str], None],
                 scope: str, now: float) -> None:
    """prune's contract, on records of the check's own workflow `scope`."""
    old, recent = now - 3600, now - 10
    finished = dict(owner="a", lease_until=old, run_key="k", runs=1)
    kept = {
        10: scratch(10, updated=old, lease_until=old),                                   # RUNNING, however old
        11: scratch(11, status="SUCCESS", updated=recent, **{**finished, "lease_until": recent}),
        12: scratch(12, status="SUCCESS", updated=recent, expires=now + 600, **finished),  # in its ttl window
    }
    pruned = {
        20: scratch(20, status="SUCCESS", updated=old, **finished),
        21: scratch(21, status="FAILED", updated=old, error="E", **finished),
        22: scratch(22, status="SUCCESS", updated=recent, expires=now - 1, **finished),  # its window ended
        23: scratch(23, tool="ledger.check2", status="FAILED", updated=old, **finished),
        24: scratch(24, status="SUCCESS", updated=old, expires=now + 600, **finished),     # old, window open
    }
    claimed = scratch(25, status="FAILED", updated=old, **finished)                     # claimed again below
    for record in [*kept.values(), *pruned.values(), claimed]:
        expect(store.insert(record) is True, f"insert of {record.id} must return True")
    expect(store.swap(claimed.evolve(status="RUNNING", epoch=2, owner="b", lease_until=now + 60), 1, "a"),
           "swap of a FAILED record back to RUNNING must win")
    before = now - 600
    everything = {("SUCCESS", "ledger.check"): 3, ("FAILED", "ledger.check"): 1, ("FAILED", "ledger.check2"): 1}
    got = store.prune(before, now, PRUNABLE, workflow=scope, dry_run=True)
    expect(got == everything, f"prune(dry_run=True) must count what prune would delete: {got}")
    expect(len(store.records(workflow=scope)) == 9, "prune(dry_run=True) must delete nothing")
    got = store.prune(before, now, ("FAILED",), workflow=scope, batch=1)
    expect(got == {("FAILED", "ledger.check"): 1, ("FAILED", "ledger.check2"): 1},
           f"prune(statuses) must delete only those states, in as many batches as it takes: {got}")
    got = store.prune(before, now, PRUNABLE, workflow=scope, batch=1)
    expect(got == {("SUCCESS", "ledger.check"): 3},
           f"prune must delete finished records older than `before` and those whose ttl ended: {got}")
    left = sorted(r.id for r in store.records(workflow=scope))
    expect(left == sorted([r.id for r in kept.values()] + [claimed.id]),
           f"prune must keep RUNNING records, recent ones and those inside their ttl window: {left}")
    expect(store.prune(now + 1, now, PRUNABLE, workflow=scope + "-other") == {},
           "prune(workflow) must touch no other workflow")


# ---------------------------------------------------------------------------
# Engine: calls and runs. A _Call is everything decided before the store is
# touched (the tool, its name and policy, its fingerprint); a _Run is a call this
# process claimed and is running, whose key current_key() returns inside it.
# ---------------------------------------------------------------------------

class _Tokens:
    """Owner tokens and run-key suffixes, unique across processes and machines: a
    random per-process prefix (drawn again in a forked child) and a counter. Asking
    the OS for randomness on every claim costs more than the rest of the claim."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_unique_token = _Tokens()


# The run this context is inside (its key is current_key()); each run knows the one it
# was started in, so a call that waits for a run of its own context can be caught.
_CURRENT_RUN: contextvars.ContextVar[_Run | _Unguarded | None] = contextvars.ContextVar("ledger_current_run", default=None)
_WORKFLOW: contextvars.ContextVar[str | None] = contextvars.ContextVar("ledger_workflow", default=None)
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("ledger_caller", default=None)
# `with guard.workflow(...)` blocks open in this context, innermost last, each as the
# (workflow, caller) to restore when it ends; kept in the context so one scope object
# may be entered by many threads and tasks at once.
_SCOPE_TOKENS: contextvars.ContextVar[tuple] = contextvars.ContextVar("ledger_scope_tokens", default=())
# The scope the latest workflow()/as_caller() statement set in this context, and what
# it replaced: a `with` block on that same scope ends the statement's setting too.
_STATEMENT: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("ledger_statement", default=None)
_NO_DEFAULT = object()


def current_key(default: Any = _NO_DEFAULT) -> str:
    """The idempotency key of the guarded call running now.

    Stable across a retry after a crash or a failure of the same call, and
    different for each intended run (after `ttl`, or under `max`): pass it to
    the downstream API (an Idempotency-Key header) so that a call re-run after
    a crash between the side effect and the record is deduplicated there.
    Outside a guarded call it raises LedgerError, or returns `default` if given.
    """
    run = _CURRENT_RUN.get()
    if run is None:
        if default is _NO_DEFAULT:
            raise LedgerError("current_key() is only set inside a guarded tool call; "
                              "call the tool through guard(...) or pass current_key(default=None)")
        return default
    return run.key


class _Call:
    """One prepared call: everything decided before the store is touched."""

    __slots__ = ("fn", "args", "kwargs", "info", "name", "workflow", "caller", "policy",
                 "key", "id", "bound", "arguments", "arguments_text", "argsum")


class _Run:
    """A claimed call that this process is running."""

    __slots__ = ("core", "store", "call", "record", "lock", "done", "lost", "renew_at", "renewer", "flight",
                 "token", "outer", "check", "__weakref__")

    def __init__(self, core: _Core, call: _Call, record: Record):
        self.core, self.call, self.record = core, call, record
        self.store = core.store   # the store it is claimed in, which records its outcome
        self.lock = threading.Lock()
        self.done = self.lost = False
        self.check = False   # ask the policy's verifier before running: a side effect may be repeated
        self.renew_at = time.monotonic() + call.policy.lease / 3   # on this process's clock, as the renewer's

    @property
    def key(self) -> str:
        return self.record.run_key

    def __enter__(self) -> _Run:
        """The tool runs inside this block: current_key() is set, and if it raises, the
        run is recorded as failed (the exception itself goes on to the caller)."""
        self.outer = _CURRENT_RUN.get()
        self.token = _CURRENT_RUN.set(self)
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        _CURRENT_RUN.reset(self.token)
        if error is not None:
            self.core.fail(self, error)

    def renew(self) -> None:
        """Push the lease deadline forward; notice if another worker took the call over."""
        with self.lock:
            if self.done or self.lost:
                return
            store, lease, started = self.store, self.call.policy.lease, time.monotonic()
            try:
                renewed = self.record.evolve(lease_until=store.now() + lease, updated=time.time())
                won = store.swap(renewed, self.record.epoch, self.record.owner)
            except Exception as e:
                log.warning("lease of %s could not be renewed: %s", self.call.name, e)
                self.renew_at = time.monotonic() + min(1.0, lease / 10)
                return
            if won:
                self.record = renewed
                self.renew_at = started + lease / 3
            else:
                self.lost = True
                self.core.warn("%s (call %s): lease lost while running; another worker took it over",
                               self.call.name, self.call.id)
        if self.lost:
            self.renewer.discard(self)


class _Unguarded:
    """A call run without the store (fail_open): nothing is claimed or recorded. current_key()
    is its fingerprint, the key its guarded runs start from."""

    __slots__ = ("call", "token", "outer")
    record = None
    check = False

    def __init__(self, call: _Call):
        self.call = call

    @property
    def key(self) -> str:
        return self.call.id

    def __enter__(self) -> _Unguarded:
        self.outer = _CURRENT_RUN.get()
        self.token = _CURRENT_RUN.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _CURRENT_RUN.reset(self.token)


# ---------------------------------------------------------------------------
# Engine: the decision. Given the record the store holds for a call, what
# this caller does: a pure function of the record, the call and its policy, the
# store's clock, and what this caller already waited for. Every transition of
# the state machine is one row:
#
#   record                                  policy / caller            decision
#   ---------------------------------------------------------------------------------------
#   any, argsum differs from the call's     validate= with key=        raise KeyReuseError
#   any                                     guard.force(...)           claim (new run)
#   RUNNING, lease live                     replay=False               duplicate: blocked
#   RUNNING, lease live                     replay, caller inside it   raise ReentrantCallError
#   RUNNING, lease live                     replay, waited past wait=  raise WaitTimeout
#   RUNNING, lease live                     replay                     wait (until it lands, lease, wait=)
#   RUNNING, lease expired                  recover="block"            duplicate: blocked (stale)
#   RUNNING, lease expired, ledger-once's   any                        duplicate: blocked (stale)
#   RUNNING, lease expired                  recover="retry"            claim (take over; verify= asked)
#   UNKNOWN                                 no verify=, or waited it   raise OutcomeUnknown
#   UNKNOWN                                 verify=                    claim (take over; verify= asked)
#   FAILED, the run this caller waited for  any                        raise LeaderFailed
#   FAILED                                  any                        claim (same run, same key)
#   SUCCESS, in ttl, runs >= max            waited for it              duplicate: shared
#   SUCCESS, in ttl, runs >= max            replay=True                duplicate: replayed
#   SUCCESS, in ttl, runs >= max            replay=False               duplicate: blocked
#   SUCCESS, in ttl, runs < max             any                        claim (new run)
#   SUCCESS, ttl window over                any                        claim (new run, new window)
#
# A claim is a compare-and-set on the record's (epoch, owner) (Store.swap): of all
# callers that decide to claim one record, one wins, and the others look again.
# ---------------------------------------------------------------------------

class _Decision(typing.NamedTuple):
    action: str                       # "claim", "duplicate", "wait" or "raise"
    source: str | None = None         # duplicate: "blocked", "replayed" or "shared"
    stale: bool = False               # duplicate: blocked behind a lease that ran out
    new_run: bool = False             # claim: a new intended run (a new current_key())
    new_window: bool = False          # claim: the ttl window ended; max counts from zero
    verify: bool = False              # claim: ask verify= before running (it may have taken effect)
    timeout: float = 0.0              # wait: longest this wait lasts (lease or wait= deadline)
    deadline: float | None = None     # wait: when wait= runs out, on the store's clock
    error: LedgerError | None = None  # raise: the error


def _decide(call: _Call, record: Record, now: float, waited: int | None, deadline: float | None,
            force: bool, here: bool) -> _Decision:
    """The state machine's transition for `call` given its stored `record` (see the table
    above). `now` is on the store's clock; `waited` is the epoch of the RUNNING record this
    caller last waited for, `deadline` when its wait= runs out (None: not waiting yet); `here`
    whether this thread or task is inside the run that holds the record."""
    policy = call.policy
    if call.argsum is not None and record.argsum not in (None, call.argsum):
        return _Decision("raise", error=KeyReuseError(
            f"{call.name}: idempotency key {call.key!r} was first used with other values of "
            f"{_validated_names(policy)}; use a new key for a different request"))
    if force:
        return _Decision("claim", new_run=True)
    status = record.status
    if status == Status.RUNNING:
        if record.lease_until > now:
            if not policy.replay:
                return _DUPLICATE["blocked"]
            if here:
                return _Decision("raise", error=ReentrantCallError(
                    f"{call.name} (call {call.id}) was called again with the same arguments from inside its "
                    f"own run (directly or through another tool); with replay=True it would wait for its own "
                    f"result forever. Give the inner call other arguments or a key= of its own"))
            if deadline is None:
                deadline = now + policy.wait if policy.wait is not None else math.inf
            if now >= deadline:
                return _Decision("raise", error=WaitTimeout(
                    f"{call.name}: waited {policy.wait}s for the running call {call.id} to finish; raise the "
                    f"policy's wait= or try again later"))
            return _Decision("wait", timeout=min(record.lease_until, deadline) - now, deadline=deadline)
        if policy.recover == "block" or record.owner in (LEGACY_OWNER, LEGACY_CONFIRMED):
            return _Decision("duplicate", "blocked", stale=True)
        return _Decision("claim", verify=policy.verify is not None)
    if status == Status.UNKNOWN:
        if policy.verify is None or waited == record.epoch:
            return _Decision("raise", error=_unknown_outcome(call, record))
        return _Decision("claim", verify=True)
    if status == Status.FAILED:
        if waited == record.epoch:
            return _Decision("raise", error=LeaderFailed(
                f"{call.name}: the running call this one waited for raised {record.error}; the next call "
                f"runs it again"))
        return _Decision("claim")
    fresh = record.expires is None or record.expires > now
    if fresh and record.runs >= policy.max:
        source = "shared" if waited is not None else "replayed" if policy.replay else "blocked"
        return _DUPLICATE[source]
    return _Decision("claim", new_run=True, new_window=not fresh)


# The decisions every hit returns, made once: a duplicate is the common case.
_DUPLICATE = {source: _Decision("duplicate", source) for source in ("blocked", "replayed", "shared")}


def _unknown_outcome(call: _Call, record: Record) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"{call.name} (call {record.id}): whether its last run took effect is unknown ({record.error}), "
        f"so it is not run again. Look up key {record.run_key!r} in the system it calls, then settle it: "
        f"`ledger resolve {record.id} --done [--result JSON]` or `--not-done` (guard.resolve(id, "
        f"done=...)); or give the policy a verify= that looks the key up", record.id, record.run_key)


def _tampered(call: _Call, record: Record) -> IntegrityError:
    return IntegrityError(
        f"{call.name}: the stored record {record.id} failed its signature check (tampered with, "
        f"or written with another secret); it is neither replayed nor re-run. Inspect it with "
        f"`ledger show`, then clear it with `ledger retry {record.id}` if the call should run again")


# ---------------------------------------------------------------------------
# Engine: singleflight. A caller the decision tells to wait blocks on the
# leader's flight when the leader runs in this process (woken the moment its
# record is written, and handed that record), else on the store's own wakeup
# (Store.wait / wait_async), polling as a fallback. A duplicate of a run live
# in this process decides on the leader's own record, without reading the
# store; on a server store, callers here that look at one call at the same
# moment share one look (_share_look). The state machine is a
# generator of these waits, so the sync and async paths share every decision
# and differ only in how they wait (_drive, _drive_async).
# ---------------------------------------------------------------------------

POLL_FIRST, POLL_MAX = 0.001, 0.02


class _Flight:
    """Wakes in-process duplicates the moment the leader's record is written, and
    hands them that record, so none of them has to read it back from the store.

    Each waiting thread blocks on a lock of its own and each event loop gets one
    callback, so a hundred duplicates wake without contending for a shared lock.
    """

    __slots__ = ("run", "epoch", "lock", "sleepers", "futures", "landed", "record")

    def __init__(self, run: _Run | None = None):
        self.run = run  # the leader, whose record (renewed in place) a new duplicate here decides on
        self.epoch = run.record.epoch if run is not None else None   # None: a look (see _share_look)
        self.lock = threading.Lock()
        self.sleepers: list[threading.Lock] = []
        self.futures: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        self.landed = False
        self.record: Record | None = None  # the leader's final record, as stored

    def wait(self, timeout: float) -> None:
        sleeper = threading.Lock()
        sleeper.acquire()
        with self.lock:
            if self.landed:
                return
            self.sleepers.append(sleeper)
        sleeper.acquire(timeout=min(timeout, threading.TIMEOUT_MAX))

    async def wait_async(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.lock:
            if self.landed:
                return
            self.futures.setdefault(loop, []).append(future)
        timer = loop.call_later(timeout, _resolve, [future])
        try:
            await future
        finally:
            timer.cancel()

    def land(self, record: Record | None) -> None:
        with self.lock:
            self.landed, self.record = True, record
            sleepers, futures, self.sleepers, self.futures = self.sleepers, self.futures, [], {}
        for sleeper in sleepers:
            sleeper.release()
        for loop, waiting in futures.items():
            try:
                loop.call_soon_threadsafe(_resolve, waiting)
            except RuntimeError:  # that loop has closed; nobody is waiting there
                pass


def _resolve(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


# The flight of each call running in this process, by (store url, call id). A run ends
# its own flight; it removes the entry only while it is still its own.
_FLIGHTS: dict[tuple[str, str], _Flight] = {}
# The first look at each call under way in this process, on stores with shared_looks; it
# lands with the record it found or claimed (None: it failed, the others look themselves).
_LOOKS: dict[tuple[str, str], _Flight] = {}
_FLIGHTS_LOCK = threading.Lock()
# A look is one round trip; callers behind one that takes longer (a statement stalled on
# the server) stop waiting for it and look for themselves.
LOOK_WAIT = 5.0


def _share_look(store: Store, call: _Call) -> tuple[_Flight, bool]:
    """The look at `call` under way in this process, and whether it is this caller's own
    (which it must end with _end_look, found record or not)."""
    key = (store.url, call.id)
    with _FLIGHTS_LOCK:
        look = _LOOKS.get(key)
        if look is not None:
            return look, False
        look = _LOOKS[key] = _Flight()
        return look, True


def _end_look(store: Store, call: _Call, look: _Flight, record: Record | None) -> None:
    with _FLIGHTS_LOCK:
        del _LOOKS[(store.url, call.id)]
    look.land(record)


class _Wait:
    """A pause the state machine asks for; the sync or async driver carries it out."""

    __slots__ = ("flight", "timeout", "store", "id")

    def __init__(self, flight: _Flight | None, timeout: float, store: Store, id: str):
        self.flight, self.timeout, self.store, self.id = flight, max(timeout, 0.0), store, id


def _drive(steps: Iterator) -> Any:
    try:
        wait = next(steps)
        while True:
            if wait.flight is not None:
                wait.flight.wait(wait.timeout)
            else:
                wait.store.wait(wait.id, wait.timeout)
            wait = next(steps)
    except StopIteration as stop:
        return stop.value


async def _drive_async(steps: Iterator) -> Any:
    try:
        wait = next(steps)
        while True:
            if wait.flight is not None:
                await wait.flight.wait_async(wait.timeout)
            else:
                await wait.store.wait_async(wait.id, wait.timeout)
            wait = next(steps)
    except StopIteration as stop:
        return stop.value


# ---------------------------------------------------------------------------
# Engine: the state machine. _Core.settle reads the record, asks _decide, and
# does what it says: claims (insert_or_get, swap), returns a duplicate's
# outcome, or yields a wait and looks again. Then the run's end is recorded
# with one compare-and-set (complete): SUCCESS with its signed result, FAILED,
# or UNKNOWN. What a reviewer must read to verify the guarantee: this section,
# the decision above, and the Store contract.
# ---------------------------------------------------------------------------

COMPLETION_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8)


class _Core:
    """State shared by a Guard and the scoped guards made from it."""

    def __init__(self, store: Any, quiet: bool | None, secret: str | bytes | None):
        self.store_spec = store
        self._store: Store | None = None
        self.quiet = quiet
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.lock = threading.Lock()
        self.policies: dict[str, Policy] = {}
        self.policies_by_fn: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.tools: dict[str, Callable] = {}
        self.names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.callbacks: dict[str, list[Callable[[Record], Any]]] = {"success": [], "block": [], "fail": []}
        self.pending: dict[str, list[int]] = {}
        self.flushing = threading.Lock()
        self._env_workflow: str | None = None
        self.fenced = 0
        self.recent: dict[str, list[tuple[float, str, str]]] = {}
        self.warned: set[str] = set()

    @property
    def store(self) -> Store:
        store = self._store
        if store is None:
            with self.lock:
                if self._store is None:
                    self._store = open_store(self.store_spec)
                    if self.quiet is None:
                        self.quiet = os.environ.get("LEDGER_QUIET", "0") not in ("", "0")
                    _HEARTBEAT.watch(self)
                store = self._store
        return store

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            env = os.environ.get("LEDGER_SECRET")
            self._secret = env.encode() if env else self.store.secret()
        return self._secret

    def warn(self, message: str, *args: Any) -> None:
        if not self.quiet:
            log.warning(message, *args)

    def count(self, id: str, attempts: int, blocked: int) -> None:
        with self.lock:
            pending = self.pending.get(id)
            if pending is None:
                self.pending[id] = [attempts, blocked]
            else:
                pending[0] += attempts
                pending[1] += blocked

    def flush(self, quietly: bool = False) -> None:
        """Write buffered counters; on failure they stay buffered for the next flush.

        One flush at a time, so a reader that flushes first (stats, history) also
        waits for a batch the heartbeat has taken but not yet written."""
        with self.flushing:
            with self.lock:
                pending, self.pending = self.pending, {}
            if pending and self._store is not None:
                self._write_counts(pending, quietly)

    def _write_counts(self, pending: dict[str, list[int]], quietly: bool) -> None:
        try:
            skipped = self._store.add_counts({id: (a, b) for id, (a, b) in pending.items()})
        except LedgerError as e:
            self._keep_pending(pending)
            if not quietly:
                raise
            log.warning("counters not written yet: %s", e)
        else:
            if skipped:
                self._keep_pending({id: pending[id] for id in skipped})

    def _keep_pending(self, pending: dict[str, list[int]]) -> None:
        with self.lock:
            for id, (a, b) in pending.items():
                slot = self.pending.setdefault(id, [0, 0])
                slot[0] += a
                slot[1] += b

    def forget_pending(self) -> None:
        self.pending = {}
        self.lock, self.flushing = threading.Lock(), threading.Lock()

    def env_workflow(self) -> str:
        """$LEDGER_WORKFLOW or "default", read on first use like the other settings."""
        if self._env_workflow is None:
            self._env_workflow = _storable(os.environ.get("LEDGER_WORKFLOW") or "default", "workflow")
        return self._env_workflow

    def record_name(self, tool: Any, name: str | None = None, info: _ToolInfo | None = None) -> str:
        """The name a tool's records are kept under, and its policy set by; the one rule, used
        wherever a tool is named (calling, wrapping, policy, history). The first that applies:
          1. an explicit name: `name` (name=, a wrap_tools dict key, the name a framework
             registered the function under), or the one a guarded wrapper carries;
          2. the name this guard wrapped the function under;
          3. a framework tool's own name (LangChain, Agents SDK, MCP, LlamaIndex, ...);
          4. tool_name(fn): module and qualified name, the same in every process (or a
             ConfigError asking for name=, where no such name is stable).
        `info` is the tool's _ToolInfo where the caller has it already (the hot path does)."""
        if name is not None:
            return _storable(name, "tool name")
        fn, carried = _unwrap(tool)
        if carried is not None:
            return carried
        try:
            known = self.names.get(fn)
        except TypeError:  # an unhashable callable
            known = None
        if known is None and type(fn) is not types.FunctionType:  # a framework tool is no plain function
            known = _framework_name(fn)
        if known is None:
            known = (info or _info(fn)).name
            if type(known) is not str:
                raise known
        return known

    def policy_for(self, name: str, fn: Callable) -> Policy:
        policy = self.policies.get(name)
        if policy is None:
            try:
                policy = self.policies_by_fn.get(fn)
            except TypeError:
                policy = None
        return policy or DEFAULT_POLICY

    def fire(self, event: str, record: Record) -> None:
        for callback in self.callbacks[event]:
            try:
                callback(record)
            except Exception:
                log.exception("ledger on_%s callback %r raised; ignored", event, callback)

    # -- deciding ----------------------------------------------------------

    def settle(self, call: _Call, force: bool = False) -> Iterator[_Wait]:
        """Yield waits until the call either wins a claim (returns a _Run) or is a
        duplicate (returns an Outcome). The decisions are _decide's; this loop does the
        reading, claiming and waiting they ask for."""
        store = self.store
        secret = self.secret  # a missing signing key fails here, before the tool runs, not after it
        record = waited = deadline = handed = None
        delay, lost_races = POLL_FIRST, 0
        share = store.shared_looks and not force
        while True:
            now = store.now()
            if record is None and not force:
                record = _leading_here(store, call, now)
            if record is None and store.legacy and not force:
                record = store.get(call.id) or self.adopt(call)
            look, mine = _share_look(store, call) if record is None and share else (None, False)
            if look is not None and not mine:   # another caller here is looking at this call: wait for it
                yield _Wait(look, LOOK_WAIT, store, call.id)
                record, share = look.record, look.landed
                continue
            if record is None:  # first look, or the record changed: claim it unless one is stored
                run = None

                def claim() -> Record:  # made only where the store may insert it: a hit builds no run
                    nonlocal run
                    run = self.prepare_run(call, None, now)
                    return run.record
                try:
                    record = store.insert_or_get(call.id, claim)
                    if run is not None and record is run.record:
                        self.note_new_call(call, now)
                        return self.start(run, inserted=True)   # before the look ends, so that its waiters find the flight
                finally:
                    if mine:
                        _end_look(store, call, look, record)
                if record is None:  # deleted between a failed insert and the read after it
                    lost_races = _lost_race(lost_races, store, call)
                    continue
            if record.status in _SIGNED and not force and record is not handed and not _verified(secret, record):
                raise _tampered(call, record)  # before any decision this record steers
            here = record.status == Status.RUNNING and _running_here(store, record)
            decision = _decide(call, record, now, waited, deadline, force, here)
            if decision.action == "raise":
                self.count(call.id, 1, 0)
                raise decision.error
            if decision.action == "duplicate":
                if decision.stale:
                    self.warn("%s (call %s) is stale: its worker stopped renewing the lease %.1fs ago and "
                              "%s keeps it blocked; clear it with guard.retry(...) or "
                              "`ledger retry %s` once you know whether it took effect",
                              call.name, call.id, now - record.lease_until,
                              "recover='block'" if call.policy.recover == "block" else "a call ledger-once left "
                              "running", call.id)
                return self.duplicate_outcome(call, record, decision.source)
            if decision.action == "wait":
                waited, deadline = record.epoch, decision.deadline
                flight = _FLIGHTS.get((store.url, call.id))
                if flight is not None and flight.epoch == record.epoch:
                    yield _Wait(flight, decision.timeout, store, call.id)
                    # The record the leader stored, handed over (None: read it). Made and signed
                    # in this process, it never left it: with the same key it needs no check.
                    record = flight.record
                    handed = record if flight.run.core.secret == secret else None
                else:
                    yield _Wait(None, min(delay, decision.timeout), store, call.id)
                    delay, record = min(delay * 1.5, POLL_MAX), None
                continue
            run = self.prepare_run(call, record, now, decision.new_run, decision.new_window)
            run.check = decision.verify
            if store.swap(run.record, record.epoch, record.owner):
                if record.status == Status.RUNNING and not force:
                    self.warn("%s (call %s): took over from a worker whose lease expired %.1fs ago "
                              "(epoch %d -> %d)", call.name, call.id, now - record.lease_until,
                              record.epoch, run.record.epoch)
                return self.start(run)
            lost_races, record = _lost_race(lost_races, store, call), None

    def adopt(self, call: _Call) -> Record | None:
        """The record ledger-once kept for this call, copied under the call's own id; None if none.

        The carried-over record stays (with ledger-once's counts), because ledger-once
        matched calls that this library tells apart (floats equal to 8 places, tuples and
        lists): each of them finds it. The copy counts only what happens from now on.
        Its result is decoded and stored again as this library stores results, and
        signed; its `ttl` counts from its last touch, as ledger-once counted it, on the lease
        clock (a carried-over record's lease_until, see _ledger_once_record)."""
        store, legacy_id = self.store, _ledger_once_id(call)
        old = store.get(legacy_id) if legacy_id is not None else None
        if old is None:
            return None
        if old.owner == LEGACY_OWNER and _shared_name(call.fn):
            raise AmbiguousRecordError(
                f"{call.name}: ledger-once recorded this call under {old.tool!r}, a name it gave every "
                f"function called {call.fn.__name__!r} in that module, so ledger.py cannot tell whether it "
                f"ran this one. If it did, run `ledger migrate --confirm {legacy_id}` (this call is then a "
                f"duplicate); if not, `ledger retry {legacy_id}` (it then runs)")
        record = old.evolve(id=call.id, tool=call.name, workflow=call.workflow, run_key=call.id, attempts=0,
                            executed=0, blocked=0)
        if old.status == Status.SUCCESS:
            value = json.loads(old.result) if old.result is not None else None
            record.result, record.unstored = _encode(call.policy, value)
            record.expires = old.lease_until + call.policy.ttl if call.policy.ttl else None
            record.sig = _sign(self.secret, record)
        store.insert(record)  # a worker that adopted it first stored the same record
        return store.get(call.id)

    def prepare_run(self, call: _Call, prev: Record | None, now: float,
                    new_run: bool = False, new_window: bool = False) -> _Run:
        """The run this process would start by writing its RUNNING record over `prev` (None:
        the call has no record), `now` on the store's lease clock. `new_run`: a new intended
        run (a new current_key()), not a retry of the last one; `new_window`: its ttl window
        ended, so the successful runs `max` counts start again from zero."""
        policy, wall = call.policy, time.time()
        if prev is None or new_run:
            once = policy.max == 1 and policy.ttl is None and prev is None
            run_key = call.id if once else f"{call.id}.{_unique_token()}"
        else:
            run_key = prev.run_key
        record = Record(
            id=call.id, tool=call.name, workflow=call.workflow, caller=call.caller,
            status=_RUNNING, owner=_unique_token(),
            epoch=prev.epoch + 1 if prev else 1, lease_until=now + policy.lease, run_key=run_key,
            runs=0 if prev is None or new_window else prev.runs,
            created=prev.created if prev else wall, updated=wall, started=wall,
            attempts=prev.attempts if prev else 1, executed=prev.executed + 1 if prev else 1,
            blocked=prev.blocked if prev else 0, argsum=call.argsum, args=_preview(call),
            cost=policy.cost)
        return _Run(self, call, record)

    def start(self, run: _Run, inserted: bool = False) -> _Run:
        """A claim won: count the attempt, let in-process duplicates wait on its flight, renew its lease.
        An inserted record counts its own first attempt (prepare_run), so a new call leaves no
        counter to write later; a swap keeps the stored counters, so a claim by swap is counted."""
        if not inserted:
            self.count(run.call.id, 1, 0)
        run.flight = _Flight(run)
        with _FLIGHTS_LOCK:
            _FLIGHTS[(run.store.url, run.call.id)] = run.flight
        run.renewer = _HEARTBEAT.renewer(run.store)
        run.renewer.add(run)
        return run

    def duplicate_outcome(self, call: _Call, record: Record, source: str) -> Outcome:
        """What a duplicate returns: BLOCKED, or (replayed, shared) the recorded result."""
        value = BLOCKED if source == "blocked" else self.replay(call, record)
        self.count(call.id, 1, 1)
        self.fire("block", record)
        return Outcome(value, source, record.run_key, record)

    def replay(self, call: _Call, record: Record) -> Any:
        """The recorded result of a verified SUCCESS record."""
        if record.unstored is not None:
            self.warn("%s returned a %s, which could not be stored, so this duplicate gets BLOCKED "
                      "instead of the result; give the policy a serializer= to store such values",
                      call.name, record.unstored)
            return BLOCKED
        loads = _codec(call.policy.serializer)[1] if call.policy.serializer else _load_result
        try:
            return loads(record.result)
        except Exception as e:
            raise LedgerError(f"{call.name}: the stored result of call {record.id} cannot be decoded "
                              f"({type(e).__name__}: {e}); did the policy's serializer change?") from e

    # -- verifying a run that may have taken effect ------------------------------

    def ask(self, run: _Run) -> Any:
        """The verifier's answer for this run's key and arguments (an awaitable, from an
        async verifier), or the exception it raised."""
        try:
            return run.call.policy.verify(run.key, dict(run.call.bound))
        except Exception as e:
            return e
        except BaseException:
            self.interrupted(run)
            raise

    def interrupted(self, run: _Run) -> None:
        """A run stopped by an interrupt: its record stays RUNNING and turns stale when its
        lease runs out (then the next call verifies it, or takes it over)."""
        with run.lock:
            run.done = True
        self.release(run)

    def reconcile(self, run: _Run, answer: Any) -> Outcome | None:
        """Act on the verifier's answer: Done ends the call as SUCCESS with its value (nothing
        runs), NOT_DONE returns None (the tool runs, same key), anything else (None, an
        error) records UNKNOWN and raises OutcomeUnknown."""
        call = run.call
        if isinstance(answer, Done):
            with run.lock:  # this run did not execute the tool
                run.record = run.record.evolve(executed=run.record.executed - 1)
            outcome = self.succeed(run, answer.value)
            log.info("%s (call %s): verified as done under key %s; not run again", call.name, call.id, run.key)
            return dataclasses.replace(outcome, source="verified")
        if answer is NOT_DONE:
            log.info("%s (call %s): verified as not done under key %s; running it", call.name, call.id, run.key)
            return None
        if inspect.isawaitable(answer):
            if hasattr(answer, "close"):
                answer.close()  # never awaited: no "coroutine was never awaited" warning
            answer = ConfigError("the verifier returned an awaitable for a sync tool; give it a sync verifier")
        why = ("the verifier could not tell" if answer is None else
               f"the verifier raised {type(answer).__name__}: {_error_text_of(answer)}"
               if isinstance(answer, BaseException) else
               f"the verifier returned {_describe(answer)}, not Done(value), NOT_DONE or None")
        self.warn("%s (call %s): %s; recorded UNKNOWN", call.name, call.id, why)
        record = self.ended(run, Status.UNKNOWN, why[:2000])
        raise _unknown_outcome(call, record)

    def unguarded(self, call: _Call, error: StoreError) -> _Unguarded:
        """The store failed before the call was claimed: under fail_open, run it anyway."""
        if not call.policy.fail_open:
            raise error
        self.warn("%s: the ledger store is unreachable (%s); running it unguarded, as its policy's "
                  "fail_open=True allows: a duplicate of this call may run too", call.name, error)
        return _Unguarded(call)

    # -- completing --------------------------------------------------------

    def succeed(self, run: _Run | _Unguarded, value: Any) -> Outcome:
        if run.record is None:
            return Outcome(value, "unguarded", run.call.id)
        call = run.call
        try:
            record = self.success_record(run, value)
        except Exception as e:  # the tool has run: a fault here must not cost its caller the value
            record = self.success_record(run, None, f"result that could not be recorded ({type(e).__name__}: "
                                                    f"{_error_text_of(e)})"[:2000])
        try:
            recorded = self.complete(run, record)
        except Exception as e:
            # A record the store refuses for its content (text it cannot encode, say) is
            # written again without the result, so the call is still recorded as done.
            bare = self.complete_without_result(run, e) if record.result is not None else None
            if bare is None:
                raise CompletionError(
                    f"{call.name} RAN and returned, but its record could not be completed ({e}). Do not "
                    f"assume it failed: its result is in this error's .value. The record stays RUNNING and "
                    f"its lease expires in {call.policy.lease}s", value) from e
            record, recorded = bare
        self.fire("success", record)
        return Outcome(value, "executed", record.run_key, record, fenced=not recorded)

    def success_record(self, run: _Run, value: Any, unstored: str | None = None) -> Record:
        """The signed SUCCESS record of a run that returned `value` (or, given `unstored`,
        of one whose result is not kept, for that reason)."""
        call, now, clock = run.call, time.time(), run.store.now()
        result = None
        if unstored is None:
            result, unstored = _encode(call.policy, value)
            if unstored is not None:
                self.warn("%s returned a %s, which cannot be stored (%s); the call is recorded as done and "
                          "duplicates get BLOCKED; give the policy a serializer= to store such values",
                          call.name, _describe(value), unstored)
        record = run.record.evolve(
            status=_SUCCESS, updated=now, lease_until=clock, duration=now - run.record.started,
            expires=clock + call.policy.ttl if call.policy.ttl else None, runs=run.record.runs + 1,
            result=result, unstored=unstored)
        record.sig = _sign(self.secret, record)
        return record

    def complete_without_result(self, run: _Run, error: Exception) -> tuple[Record, bool] | None:
        """Record a run as done without its result, after the store refused the full
        record: the record and whether it was recorded (False: fenced), or None if the
        store refused this one too."""
        why = f"result the store refused ({type(error).__name__}: {_error_text_of(error)})"[:2000]
        bare = self.success_record(run, None, why)
        self.warn("%s ran, but the store refused its result (%s); it is recorded as done without it, "
                  "so duplicates get BLOCKED", run.call.name, why)
        try:
            recorded = self.complete(run, bare)
        except Exception as e:
            log.error("%s ran, and neither its record nor one without its result could be written: %s",
                      run.call.name, e)
            return None
        return bare, recorded

    def fail(self, run: _Run, error: BaseException) -> None:
        call = run.call
        if not isinstance(error, Exception) and call.policy.recover == "block":
            # Interrupted, not failed: whether it took effect is unknown, so the
            # record stays RUNNING and turns stale when its lease runs out.
            self.interrupted(run)
            return
        text = f"{type(error).__name__}: {_error_text_of(error)}"[:2000]
        if _is_uncertain(error, call.policy.uncertain):
            self.warn("%s (call %s) raised %s, after which whether it took effect is unknown (its policy's "
                      "uncertain=): recorded UNKNOWN, so it is not run again until %s", call.name, call.id,
                      type(error).__name__, "its verify= says" if call.policy.verify else "resolved")
            record = self.ended(run, Status.UNKNOWN, text)
        else:
            record = self.ended(run, Status.FAILED, text)
        self.fire("fail", record)

    def ended(self, run: _Run, status: Status, error: str) -> Record:
        """Record a run that did not succeed as FAILED or UNKNOWN (signed: it steers the next
        call's key and whether it runs); the record, written or not."""
        now = time.time()
        record = run.record.evolve(status=status.value, updated=now, lease_until=run.store.now(),
                                   duration=now - run.record.started, error=error)
        if status in _SIGNED:
            record.sig = _sign(self.secret, record)
        try:
            self.complete(run, record)
        except Exception as e:
            log.error("%s (call %s) ended %s and its record could not be written: %s",
                      run.call.name, run.call.id, status.value, e)
        return record

    def complete(self, run: _Run, record: Record) -> bool:
        """Write the final record with retries; False if another worker fenced this run off."""
        with run.lock:
            run.done = True
        stored = None
        try:
            for delay in COMPLETION_RETRIES + (None,):
                try:
                    won = run.store.swap(record, run.record.epoch, run.record.owner)
                    break
                except StoreError:
                    if delay is None:
                        raise
                    time.sleep(delay)
            if not won:
                with self.lock:
                    self.fenced += 1
                self.warn("%s (call %s): this run's lease had expired and another worker took the call "
                          "over (epoch > %d); its outcome was not recorded, but its caller still gets it",
                          run.call.name, run.call.id, run.record.epoch)
            else:
                stored = record
            return won
        finally:
            self.release(run, stored)

    def release(self, run: _Run, stored: Record | None = None) -> None:
        """Stop renewing the run's lease and wake its in-process duplicates, handing them
        the record it stored (None: they read the store). A run that was fenced off leaves
        the flight of the run that took over alone."""
        run.renewer.discard(run)
        key = (run.store.url, run.call.id)
        with _FLIGHTS_LOCK:
            if _FLIGHTS.get(key) is run.flight:
                del _FLIGHTS[key]
        run.flight.land(stored)

    # -- noticing non-deterministic arguments ------------------------------

    def note_new_call(self, call: _Call, now: float) -> None:
        """Warn when a tool keeps running with arguments that differ only in
        timestamps or UUIDs: those are retries the ledger cannot recognise."""
        if call.key is not None or call.name in self.warned:
            return
        volatile = [name for name, value in call.bound.items()
                    if type(value) not in _NEVER_VOLATILE and _looks_volatile(value)]
        if not volatile:
            return
        volatile.sort()
        stable = _dump({k: v for k, v in call.arguments.items() if k not in volatile})
        recent = [entry for entry in self.recent.get(call.name, ()) if now - entry[0] < 10]
        recent.append((now, stable, call.id))
        self.recent[call.name] = recent[-8:]
        repeats = sum(1 for _, s, id in recent if s == stable and id != call.id)
        if repeats:
            self.warned.add(call.name)
            self.warn("%s ran %d times within 10 s with arguments that differ only in %s; if these are "
                      "retries of one call, pass key='...' (a stable id such as f'email-{order_id}') "
                      "so they count as one", call.name, repeats + 1, ", ".join(volatile))


def _leading_here(store: Store, call: _Call, now: float) -> Record | None:
    """The RUNNING record of this call's live run in this process, if it has one: a duplicate
    decides on it without reading the store. A live lease can only make the decision block,
    wait or raise, never claim, so a record this process holds can steer nothing it should not;
    a lease that has run out (here) or a fenced run sends the caller to the store instead."""
    flight = _FLIGHTS.get((store.url, call.id))
    if flight is None or flight.landed or flight.run.lost:
        return None
    record = flight.run.record
    return record if record.epoch == flight.epoch and record.lease_until > now else None


def _running_here(store: Store, record: Record) -> bool:
    """Whether this thread or task is inside the run that holds `record`."""
    run = _CURRENT_RUN.get()
    while run is not None:
        if run.record is not None and run.record.id == record.id and run.record.epoch == record.epoch and run.core.store.url == store.url:
            return True
        run = run.outer
    return False


def _lost_race(lost: int, store: Store, call: _Call) -> int:
    """Count a claim lost to another worker. Each loss means the record changed,
    so a thousand in a row means the store is broken, not busy."""
    if lost >= 1000:
        raise StoreError(f"{call.name}: {store!r} refused 1000 claims in a row for call {call.id}; "
                         f"run ledger.check_store() against it")
    return lost + 1


_NEVER_VOLATILE = frozenset((int, float, bool, type(None), dict, list))  # tested first: most arguments are these


def _looks_volatile(value: Any) -> bool:
    if not isinstance(value, str):
        return isinstance(value, (_dt.datetime, _dt.time, uuid.UUID))
    if 20 <= len(value) <= 40:
        # Cheap tests first: most strings are neither, and a failed parse raises.
        if len(value.replace("urn:", "").replace("uuid:", "").strip("{}").replace("-", "")) == 32:
            try:
                uuid.UUID(value)
                return True
            except ValueError:
                pass
        if value[:4].isdigit():
            try:
                _dt.datetime.fromisoformat(value)
                return True
            except ValueError:
                return False
    return False


def _validated_names(policy: Policy) -> str:
    return "its arguments" if policy.validate is True else ", ".join(policy.validate)


def _error_text_of(error: BaseException) -> str:
    """An exception's text as every store can keep it: a NUL (which PostgreSQL rejects)
    and a lone surrogate (which no UTF-8 store accepts) are escaped, and an exception
    whose __str__ raises is described rather than allowed to hide the tool's own."""
    try:
        text = str(error)
    except Exception as e:
        text = f"<its text cannot be shown: str() raised {type(e).__name__}>"
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _encode(policy: Policy, value: Any) -> tuple[str | None, str | None]:
    """The stored form of a result, or (None, why it cannot be stored)."""
    try:
        text = _codec(policy.serializer)[0](value) if policy.serializer else _dump_result(value)
    except _Unsupported as e:
        where = "".join(reversed(e.path))
        inner = f" holding a {_describe(e.value)} at {where}" if e.value is not value else ""
        return None, _printable(f"{_describe(value)}{inner}, which would not come back as itself (of the same "
                                f"type and equal)")
    except Exception as e:  # RecursionError, an int too long for str(), a serializer's own error
        return None, _printable(f"{_describe(value)} ({type(e).__name__}: {e})")
    if not isinstance(text, str):
        return None, f"{_describe(value)} (the serializer returned {_describe(text)}, not str)"
    if len(text) > MAX_RESULT_BYTES:
        return None, f"{_describe(value)} of {len(text)} characters, over the {MAX_RESULT_BYTES} limit"
    return text, None


def _printable(text: str) -> str:
    """`text` as every store can hold it: no NUL, no lone surrogate."""
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")[:500]


def _preview(call: _Call) -> str:
    """The arguments as shown to operators; never executed, escaped by every viewer."""
    if call.key is None:
        text = call.arguments_text
    else:
        shown = {}
        for name, value in call.bound.items():
            try:
                shown[name] = canonical(value)
            except _Unsupported:
                shown[name] = "<" + _describe(value) + ">"
        text = _dump({"key": call.key, "arguments": shown})
    text = text.replace("\\u0000", "")  # tags read as plain words: ["datetime", "2026-..."]
    return text if len(text) <= 2000 else text[:1999] + "…"


# ---------------------------------------------------------------------------
# Engine: leases and their heartbeat. Each store has a daemon thread per process
# that renews the lease of every call running on it (so a tool may run far
# longer than its lease), and one more thread flushes buffered counters once a
# second: a slow or stuck store delays neither another store's renewals nor its
# own renewals behind counters. After fork(), the child starts its own.
# ---------------------------------------------------------------------------

FLUSH_INTERVAL = 1.0
RENEWER_LINGER = FLUSH_INTERVAL   # no longer than a renewer's longest sleep, so add() need not wake it
EXIT_FLUSH_WAIT = 5.0   # longest an exiting process waits to write buffered counters


class _Renewer:
    """Renews the leases of one store's running calls, on a thread that exits when none has
    been left for RENEWER_LINGER seconds: calls come in bursts, and starting a thread for
    each call of a burst would cost more than the calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()   # a plain lock: add() takes it on every claim
        self.cond = threading.Condition(self.lock)
        self.runs: dict[int, _Run] = {}
        self.thread: threading.Thread | None = None

    def add(self, run: _Run) -> None:
        with self.lock:
            self.runs[id(run)] = run
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self.thread.start()
            elif run.renew_at < time.monotonic() + FLUSH_INTERVAL:
                self.cond.notify()

    def discard(self, run: _Run) -> None:
        self.runs.pop(id(run), None)

    def _loop(self) -> None:
        idle_since = None
        while True:
            with self.cond:
                # One snapshot decides: discard() runs without the lock, so the last run may
                # end between a look at self.runs and a copy of it.
                runs = list(self.runs.values())
                now = time.monotonic()
                if not runs:
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= RENEWER_LINGER:
                        self.thread = None
                        return
                    self.cond.wait(RENEWER_LINGER - (now - idle_since))  # a run added meanwhile is seen then
                    continue
                idle_since = None
                wake = min(r.renew_at for r in runs)
                if wake > now:
                    # add() wakes this thread only for a renewal due within FLUSH_INTERVAL,
                    # so it never sleeps longer than that.
                    self.cond.wait(min(wake - now, FLUSH_INTERVAL))
                    continue
            for run in runs:
                if run.renew_at <= now:
                    try:
                        run.renew()
                    except Exception:  # renewals must outlive any one fault
                        log.exception("ledger heartbeat: unexpected error; continuing")


class _Heartbeat:
    """This process's renewers (one per store) and its counter flushes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.renewers: dict[str, _Renewer] = {}
        self.cores: weakref.WeakSet[_Core] = weakref.WeakSet()
        self.thread: threading.Thread | None = None
        self.flush_now, self.flushed = threading.Event(), threading.Event()

    def renewer(self, store: Store) -> _Renewer:
        renewer = self.renewers.get(store.url)
        if renewer is None:
            with self.lock:
                renewer = self.renewers.setdefault(store.url, _Renewer(f"ledger-heartbeat {store.url}"))
        return renewer

    def watch(self, core: _Core) -> None:
        with self.lock:
            self.cores.add(core)
            if self.thread is None:
                self.thread = threading.Thread(target=self._flush_loop, name="ledger-counters", daemon=True)
                self.thread.start()

    def _flush_loop(self) -> None:
        while True:
            self.flush_now.wait(FLUSH_INTERVAL)
            asked = self.flush_now.is_set()
            self.flush_now.clear()
            for core in list(self.cores):
                try:
                    core.flush(quietly=True)
                except Exception:  # the thread must outlive any one store's fault
                    log.exception("ledger counters: unexpected error; continuing")
            _TELEMETRY.look_on_call = True   # once a second, look again whether a provider was set
            if asked:
                self.flushed.set()

    def flush_at_exit(self) -> None:
        """Have the counter thread write every buffered counter, waiting for it only so long:
        a store that does not answer must not hold up the exit (and no thread can be
        started at exit)."""
        if self.thread is None:
            return   # no guard has opened a store: nothing is buffered
        self.flushed.clear()
        self.flush_now.set()
        if not self.flushed.wait(EXIT_FLUSH_WAIT):
            log.warning("buffered call counters not written within %.0fs at exit; they are lost (the "
                        "records themselves are complete)", EXIT_FLUSH_WAIT)


_HEARTBEAT = _Heartbeat()


_FORK_HELD: list[threading.Lock] = []


def _before_fork() -> None:
    for store in list(_SQLITE_STORES):
        store._hold_for_fork(_FORK_HELD)


def _after_fork_in_parent() -> None:
    while _FORK_HELD:
        _FORK_HELD.pop().release()


def _after_fork_in_child() -> None:
    global _HEARTBEAT, _FLIGHTS_LOCK
    _after_fork_in_parent()
    for store in list(_SQLITE_STORES):
        store._forget_inherited()
    _unique_token.__init__()
    cores = list(_HEARTBEAT.cores)
    _HEARTBEAT = _Heartbeat()   # the parent's runs and threads are not the child's
    _FLIGHTS.clear()
    _LOOKS.clear()
    _FLIGHTS_LOCK = threading.Lock()   # another of the parent's threads may have held it at fork()
    for core in cores:
        core.forget_pending()
        _HEARTBEAT.watch(core)


def _flush_all(quietly: bool = False, url: str | None = None) -> None:
    """Write the buffered counters of every guard (on the store at `url`), so readers see this process's counts."""
    for core in list(_HEARTBEAT.cores):
        if url is None or (core._store is not None and core._store.url == url):
            core.flush(quietly=quietly)


atexit.register(lambda: _HEARTBEAT.flush_at_exit())
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# Engine: telemetry. Once the application has configured OpenTelemetry (set a
# tracer or meter provider of an SDK), each guarded call is a span and its
# outcome counts in metrics. ledger.py never imports opentelemetry: until the
# application (or a library of its) has, there is nothing to look at; until it
# sets a provider, the first call and then one call a second (when the heartbeat
# says it is due) look at the providers. Any other call, while telemetry is off,
# pays one attribute read.
# ---------------------------------------------------------------------------

_OTEL_COUNTERS = {
    "ledger.attempts": "guarded calls, by how each ended (ledger.source)",
    "ledger.executed": "runs of the tool (ledger.source executed, unguarded or failed)",
    "ledger.blocked": "duplicates that did not run the tool (replayed, shared or blocked)",
    "ledger.failed": "runs in which the tool raised",
    "ledger.fenced": "runs whose outcome was not recorded: another worker had taken the call over",
}
_RAN_SOURCES = ("executed", "unguarded", "failed")
_DUPLICATE_SOURCES = ("replayed", "shared", "blocked")


class _Telemetry:
    """The OpenTelemetry tracer and counters, once a provider is configured."""

    def __init__(self) -> None:
        self.on = False
        self.look_on_call = True   # on, or due to look at the providers on the next call
        self.tracer: Any = None
        self.counters: dict[str, Any] = {}

    def look(self) -> None:
        """Turn on if the application has set a tracer or meter provider (other than the API's
        own no-op and proxy ones). Providers can be set only once, so on stays on."""
        self.look_on_call = False
        trace, metrics = sys.modules.get("opentelemetry.trace"), sys.modules.get("opentelemetry.metrics")
        try:
            providers = ([trace.get_tracer_provider()] if trace else []) + \
                        ([metrics.get_meter_provider()] if metrics else [])
            if any(not type(p).__module__.startswith(("opentelemetry.trace", "opentelemetry.metrics"))
                   for p in providers):
                self._start()
        except Exception:  # telemetry must never fail a call
            log.exception("ledger: OpenTelemetry could not be set up; calls are not traced")

    def _start(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        """Trace and count through the global providers (or those given)."""
        from opentelemetry import metrics, trace  # imported already, by the application
        meter = metrics.get_meter("ledger", __version__, meter_provider=meter_provider)
        self.tracer = trace.get_tracer("ledger", __version__, tracer_provider=tracer_provider)
        self.counters = {name: meter.create_counter(name, unit="{call}", description=text)
                         for name, text in _OTEL_COUNTERS.items()}
        self.on = self.look_on_call = True


_TELEMETRY = _Telemetry()


class _Observed:
    """One guarded call as a span (the tool's own spans are its children), ended with
    what the call did: its source, record id, epoch and whether it was fenced."""

    __slots__ = ("call", "span", "scope", "outcome")

    def __init__(self, call: _Call):
        self.call, self.outcome = call, None

    def __enter__(self) -> _Observed:
        attributes = {"ledger.tool": self.call.name, "ledger.workflow": self.call.workflow,
                      "ledger.record_id": self.call.id}
        if self.call.caller is not None:
            attributes["ledger.caller"] = self.call.caller
        self.scope = _TELEMETRY.tracer.start_as_current_span(f"ledger {self.call.name}", attributes=attributes)
        self.span = self.scope.__enter__()
        return self

    def done(self, outcome: Outcome) -> Outcome:
        self.outcome = outcome
        return outcome

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        outcome, span = self.outcome, self.span
        if outcome is not None:
            source, fenced = outcome.source, outcome.fenced
        else:
            # Everything ledger.py raises on purpose is a LedgerError, and of those only a
            # CompletionError comes after the tool ran; anything else is the tool's own.
            ran = not isinstance(error, LedgerError) or isinstance(error, CompletionError)
            source, fenced = ("failed" if ran else "error"), False
        span.set_attribute("ledger.source", source)
        span.set_attribute("ledger.fenced", fenced)
        if outcome is not None and outcome.record is not None:
            span.set_attribute("ledger.epoch", outcome.record.epoch)
        labels, counters = {"ledger.tool": self.call.name}, _TELEMETRY.counters
        counters["ledger.attempts"].add(1, {**labels, "ledger.source": source})
        for name, counted in (("ledger.executed", source in _RAN_SOURCES), ("ledger.fenced", fenced),
                              ("ledger.blocked", source in _DUPLICATE_SOURCES), ("ledger.failed", source == "failed")):
            if counted:
                counters[name].add(1, labels)
        self.scope.__exit__(kind, error, traceback)


def _observe(call: _Call) -> _Observed | None:
    """The call's span, or None while telemetry is off."""
    if not _TELEMETRY.on:
        _TELEMETRY.look()
        if not _TELEMETRY.on:
            return None
    return _Observed(call)


# ---------------------------------------------------------------------------
# Public Guard. `guard(fn, *args, **kwargs)` prepares the call (binding and
# fingerprinting, so bad arguments fail before anything runs), settles it
# against the store, runs the tool if it won, and records the outcome.
# ---------------------------------------------------------------------------

class Guard:
    """Exactly-once and singleflight for tool calls.

    Guard(store=None, *, workflow=None, caller=None, quiet=None, secret=None)

    store:    a Store, a file path (SQLite), ":memory:", or a URL; default
              $LEDGER_DB or ./ledger.db, opened on first use.
    workflow: the default scope of fingerprints (else $LEDGER_WORKFLOW or "default").
    caller:   a tag recorded with each call (who made it); not fingerprinted.
    quiet:    silence warnings (also LEDGER_QUIET=1).
    secret:   the HMAC key for stored results (also LEDGER_SECRET).
    """

    def __init__(self, store: Store | str | os.PathLike | None = None, *, workflow: str | None = None,
                 caller: str | None = None, quiet: bool | None = None, secret: str | bytes | None = None):
        self._core = _Core(store, quiet, secret)
        self._default_workflow = None if workflow is None else _storable(workflow, "workflow")
        self._default_caller = None if caller is None else _storable(caller, "caller")
        self._scope: tuple[str | None, str | None] = (None, None)

    def __repr__(self) -> str:
        store = self._core._store or self._core.store_spec or os.environ.get("LEDGER_DB") or "ledger.db"
        return f"<Guard store={store!r} workflow={self._workflow()!r}>"

    @property
    def store(self) -> Store:
        """The store, opened on first use."""
        return self._core.store

    # -- scoping -----------------------------------------------------------

    def workflow(self, id: str) -> Guard:
        """Fingerprint calls in workflow `id`: from now on in this thread or task (as a
        statement), until the block ends (as a `with` block), and always through the
        scoped guard it returns."""
        return self._scoped(_storable(str(id), "workflow"), self._scope[1])._set_here(self)

    def as_caller(self, name: str) -> Guard:
        """Record calls as made by `name`; a statement, a `with` block and a scoped guard,
        as `workflow`."""
        return self._scoped(self._scope[0], _storable(str(name), "caller"))._set_here(self)

    def _scoped(self, workflow: str | None, caller: str | None) -> Guard:
        scoped = object.__new__(Guard)
        scoped._core = self._core
        scoped._default_workflow, scoped._default_caller = self._default_workflow, self._default_caller
        scoped._scope = (workflow, caller)
        return scoped

    def _set_here(self, made_from: Guard) -> Guard:
        """Apply this scope to the current context (a contextvar, so only this thread or task
        and the tasks it starts see it), remembering what it replaced: for a chain such as
        guard.workflow(w).as_caller(c), what the chain's first statement replaced."""
        workflow, caller = self._scope
        statement = _STATEMENT.get()
        chained = statement is not None and statement[0] is made_from
        before = statement[1] if chained else (_WORKFLOW.get(), _CALLER.get())
        _WORKFLOW.set(workflow or _WORKFLOW.get())
        _CALLER.set(caller or _CALLER.get())
        _STATEMENT.set((self, before))
        return self

    def __enter__(self) -> Guard:
        statement = _STATEMENT.get()
        if statement is not None and statement[0] is self:
            before = statement[1]  # `with guard.workflow(x):` ends what the call just set
            _STATEMENT.set(None)
        else:
            before = (_WORKFLOW.get(), _CALLER.get())
            workflow, caller = self._scope
            _WORKFLOW.set(workflow or before[0])
            _CALLER.set(caller or before[1])
        _SCOPE_TOKENS.set(_SCOPE_TOKENS.get() + (before,))
        return self

    def __exit__(self, *exc: Any) -> None:
        stack = _SCOPE_TOKENS.get()
        workflow, caller = stack[-1]
        _SCOPE_TOKENS.set(stack[:-1])
        _WORKFLOW.set(workflow)
        _CALLER.set(caller)

    def _workflow(self) -> str:
        return self._scope[0] or _WORKFLOW.get() or self._default_workflow or self._core.env_workflow()

    def _caller(self) -> str | None:
        return self._scope[1] or _CALLER.get() or self._default_caller

    # -- calling -----------------------------------------------------------

    def __call__(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` unless this call already ran; an async fn gives an awaitable.

        A duplicate returns BLOCKED, or with replay=True the recorded result.
        key= (or idempotency_key=) names the call instead of its arguments, unless `fn` has a
        parameter of that name: then it is the tool's, and guard.keyed passes the guard's key.
        """
        return self._call(self._prepare(fn, args, kwargs))

    def keyed(self, key: str, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """`guard(fn, *args, **kwargs)` with the call named by `key` instead of its arguments.
        Every keyword reaches `fn`, also one called key or idempotency_key."""
        return self._call(self._prepare(fn, args, kwargs, key if key is not None else ""))

    def _call(self, call: _Call) -> Any:
        if call.policy.unlimited:
            return call.fn(*call.args, **call.kwargs)
        if call.info.is_async:
            return _value_of(self._run_async(call))
        return self._run(call).value

    def execute(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Outcome:
        """Like calling the guard, but returns an Outcome: the value and where it came from
        (executed, replayed, shared, blocked, unlimited, unguarded, verified). An async fn gives an
        awaitable."""
        call = self._prepare(fn, args, kwargs)
        if call.policy.unlimited:
            if call.info.is_async:
                return _outcome_of(call.fn(*call.args, **call.kwargs))
            return Outcome(call.fn(*call.args, **call.kwargs), "unlimited")
        return self._run_async(call) if call.info.is_async else self._run(call)

    def force(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run the call now whatever the ledger says, and record it as its latest run."""
        call = self._prepare(self._resolve(fn), args, kwargs)
        if call.info.is_async:
            return _value_of(self._run_async(call, force=True))
        return self._run(call, force=True).value

    def _run(self, call: _Call, force: bool = False) -> Outcome:
        seen = _observe(call) if _TELEMETRY.look_on_call else None
        if seen is None:
            return self._outcome(call, force)
        with seen:
            return seen.done(self._outcome(call, force))

    async def _run_async(self, call: _Call, force: bool = False) -> Outcome:
        seen = _observe(call) if _TELEMETRY.look_on_call else None
        if seen is None:
            return await self._outcome_async(call, force)
        with seen:
            return seen.done(await self._outcome_async(call, force))

    def _outcome(self, call: _Call, force: bool) -> Outcome:
        try:
            step = _drive(self._core.settle(call, force))
        except StoreError as e:
            step = self._core.unguarded(call, e)
        if isinstance(step, Outcome):
            return step
        if step.check:
            verified = self._core.reconcile(step, self._core.ask(step))
            if verified is not None:
                return verified
        with step:
            value = call.fn(*call.args, **call.kwargs)
            if hasattr(type(value), "__await__") or isinstance(value, _LAZY_TYPES):
                _refuse_deferred(call, value)
        return self._core.succeed(step, value)

    async def _outcome_async(self, call: _Call, force: bool) -> Outcome:
        try:
            step = await _drive_async(self._core.settle(call, force))
        except StoreError as e:
            step = self._core.unguarded(call, e)
        if isinstance(step, Outcome):
            return step
        if step.check:
            verified = self._core.reconcile(step, await _answer(self._core, step, self._core.ask(step)))
            if verified is not None:
                return verified
        with step:
            value = await call.fn(*call.args, **call.kwargs)
        return self._core.succeed(step, value)

    def _prepare(self, fn: Callable, args: tuple, kwargs: dict, key: str | None = None) -> _Call:
        fn, name = _unwrap(fn)
        while isinstance(fn, functools.partial):
            args, kwargs = fn.args + args, {**fn.keywords, **kwargs}
            fn = fn.func
        if not callable(fn):
            raise ConfigError(f"guard needs a callable tool, got {_describe(fn)}")
        info = _info(fn)
        call = _Call()
        call.fn, call.info = fn, info
        call.name = name or self._core.record_name(fn, info=info)
        call.key = key if key is not None else _key_from(call.name, info, kwargs)
        call.args, call.kwargs = args, kwargs
        call.policy = policy = self._core.policy_for(call.name, fn)
        if policy.unlimited:
            return call
        call.workflow, call.caller = self._workflow(), self._caller()
        call.bound = info.bind(args, kwargs)
        if info.injected:
            call.bound = _identity_arguments(call.bound, info.injected, call.name)
        if call.key is None:
            call.arguments = _canonical_arguments(call.bound)
            call.arguments_text = _arguments_text(call.bound, call.arguments)
            call.argsum = None
            call.id = _fingerprint_text(call.name, call.workflow, call.arguments_text)
        else:
            if not isinstance(call.key, str) or not call.key:
                raise FingerprintError(f"{call.name}: key must be a non-empty str, not {call.key!r}")
            call.arguments = call.arguments_text = None
            call.argsum = _argsum(call.bound, policy.validate) if policy.validate else None
            call.id = fingerprint(call.name, call.workflow, {_TAG + "key": call.key})
        return call

    # -- wrapping ----------------------------------------------------------

    def once(self, fn: Callable | None = None, /, *, name: str | None = None, blocked_return: Any = _UNSET,
             **policy: Any) -> Any:
        """Decorator: `@guard.once` or `@guard.once(replay=True, ttl=60, name="crm.lookup")`.

        Stacks with a framework's decorator in either order: above one that returns a tool
        object (LangChain @tool, Agents SDK @function_tool) it returns that tool guarded;
        above one that registers the function and returns it (MCP @server.tool(), Pydantic AI
        @agent.tool) it guards the registered tool in place too. blocked_return: as for wrap_tools."""
        def decorate(fn: Callable) -> Any:
            options = Policy.of(**policy) if policy else None   # an unknown option fails before wrapping
            guarded = self._wrap_tool(fn, name, blocked_return, "guard.once")
            if options is not None:  # by the guarded tool, so under the name its records have
                self._set_policy(guarded, options)
            return guarded
        return decorate(fn) if fn is not None else decorate

    def wrap_tools(self, tools: Any, *, blocked_return: Any = _UNSET) -> Any:
        """Guard a whole toolset and hand back the same kind of thing, so the framework and
        the model see no difference.

        tools: a dict {name: tool} (keys are the names records are kept under) or a list or
        tuple of tools, where a tool is a plain function (sync or async, e.g. a LangGraph
        node), a LangChain or LangGraph tool (BaseTool), an OpenAI Agents SDK FunctionTool or
        an MCP tool; or a single framework tool; or an MCP server (mcp's FastMCP / MCPServer,
        standalone fastmcp's FastMCP), whose registered tools are guarded in place. A function
        an MCP server registered (@server.tool() returns it) is guarded in the server too.
        Framework tools keep their name (also the name of their records), description and
        argument schema. Arguments a framework injects are passed on; per-invocation ones (a
        run's config, a tool call id, state, callbacks) are not fingerprinted, and what in them
        identifies the caller (a run's user context, an injected user_id) is (see _INJECTED,
        ledger.Ignore, ledger.Identity). Anything else is a ConfigError naming its type.
        blocked_return: what a blocked duplicate returns. Default: BLOCKED from a plain
        function; through a framework tool, a message the model can read (BLOCKED_MESSAGE;
        for MCP a text result, marked isError where the tool declares an output schema).
        """
        if isinstance(tools, Mapping):
            guarded = {name: self._wrap_tool(tool, name, blocked_return) for name, tool in tools.items()}
            return guarded if type(tools) is dict else type(tools)(guarded)
        if isinstance(tools, (list, tuple)):
            guarded = type(tools)(self._wrap_tool(tool, None, blocked_return) for tool in tools)
            _refuse_shared_names(tools, guarded)
            return guarded
        if _adapter_for(tools) is not None:
            return self._wrap_tool(tools, None, blocked_return)
        raise NotAToolError(f"wrap_tools takes a dict or a list of tools, a framework tool or an MCP server, "
                            f"not {_describe(tools)}")

    def _wrap_tool(self, tool: Any, name: str | None, blocked_return: Any, caller: str = "wrap_tools") -> Any:
        adapt = _adapter_for(tool)
        if adapt is not None:
            return adapt(self, tool, name or _framework_name(tool), blocked_return)
        if not _is_plain_callable(tool):
            raise NotAToolError(
                f"{caller}: {name + ': ' if name else ''}a {type(tool).__module__}.{type(tool).__qualname__} "
                f"is not a function or a framework object ledger knows ({_known_framework_classes()}). "
                f"Guard the function the tool calls, or pass a function that calls it")
        registrations = [(owner, guard_in_place) for owner, guard_in_place, _ in _registrations(tool)
                         if guard_in_place is not None]
        name = name or next((owner.name for owner, _ in registrations), None)
        for registered, guard_in_place in registrations:
            guard_in_place(self, registered, name, blocked_return)
        return self._wrap(tool, name, blocked_return)

    def _wrap(self, fn: Callable, name: str | None, blocked_return: Any) -> Callable:
        inner = _unwrap(fn)[0]
        name = self._core.record_name(fn, name)
        self._core.tools.setdefault(name, inner)
        try:
            self._core.names.setdefault(inner, name)
        except TypeError:
            pass
        guard = self
        if _is_async(inner):
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                value = await guard._call_named(inner, name, args, kwargs)
                if value is not BLOCKED:
                    return value
                return _blocked_default(wrapper) if blocked_return is _UNSET else blocked_return
        else:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                value = guard._call_named(inner, name, args, kwargs)
                if value is not BLOCKED:
                    return value
                return _blocked_default(wrapper) if blocked_return is _UNSET else blocked_return
        functools.update_wrapper(wrapper, inner)
        wrapper.__ledger__ = (inner, name)
        return wrapper

    def _call_named(self, fn: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        return self(_Named(fn, name), *args, **kwargs)

    # -- policies and callbacks ----------------------------------------------

    def policy(self, fn_or_name: Callable | str, /, **options: Any) -> Guard:
        """Set how calls of one tool (a function, its wrapped form, or its name) are treated.
        The options are Policy's fields, declared and documented there (help(ledger.Policy));
        an unknown one is a ConfigError. Returns the guard, so settings chain."""
        self._set_policy(fn_or_name, Policy.of(**options))
        return self

    def _set_policy(self, fn_or_name: Callable | str, policy: Policy) -> None:
        if isinstance(fn_or_name, str):
            self._core.policies[fn_or_name] = policy
            return
        self._core.policies[self._core.record_name(fn_or_name)] = policy
        try:
            self._core.policies_by_fn[_unwrap(fn_or_name)[0]] = policy
        except TypeError:
            pass

    def on_success(self, callback: Callable[[Record], Any]) -> Guard:
        """Call `callback(record)` after each recorded run. Returns the guard, so settings chain."""
        self._core.callbacks["success"].append(callback)
        return self

    def on_block(self, callback: Callable[[Record], Any]) -> Guard:
        """Call `callback(record)` for each duplicate (blocked, replayed or shared). Returns the guard."""
        self._core.callbacks["block"].append(callback)
        return self

    def on_fail(self, callback: Callable[[Record], Any]) -> Guard:
        """Call `callback(record)` after each run whose tool raised. Returns the guard."""
        self._core.callbacks["fail"].append(callback)
        return self

    def quiet(self) -> Guard:
        """Silence warnings (as Guard(quiet=True) or LEDGER_QUIET=1). Returns the guard."""
        self._core.quiet = True
        return self

    def persist(self, path: str | os.PathLike = "ledger.db") -> Guard:
        """Keep records in the SQLite file `path` (or a store URL) from now on, as Guard(path)
        does. Returns the guard. Refused while one of its calls is running."""
        core = self._core
        renewers = list(_HEARTBEAT.renewers.values())
        if any(run.core is core for renewer in renewers for run in list(renewer.runs.values())):
            raise ConfigError("persist() while a guarded call is running would record its outcome in "
                              "another database; call it before the agent starts, or use Guard(path)")
        core.flush()
        with core.lock:
            old, core._store, core.store_spec = core._store, None, path
        if old is not None:
            old.close()
        return self

    # -- operating -----------------------------------------------------------

    def retry(self, fn: Callable | str, /, *args: Any, force: bool = False, **kwargs: Any) -> bool:
        """Let this call run again on its next attempt (for a call a stale lease or
        recover='block' left blocked, or a deliberate re-run of one that succeeded).
        True if there was a record to release. A call whose lease is live is running
        now: releasing it would let a second run overlap it, so that raises
        LeaseLiveError unless force=True. (`force` is retry's own; for a tool with an
        argument of that name, use retry_id with the record's id.)"""
        call = self._prepare(self._resolve(fn), args, kwargs)
        legacy_id = _ledger_once_id(call) if self.store.legacy else None
        # ledger-once's record of the call is released too, or the call would match it again.
        released = legacy_id is not None and self.retry_id(legacy_id, force=force)
        return self.retry_id(call.id, force=force) or released

    def retry_id(self, id: str, *, force: bool = False) -> bool:
        """`retry` by record id, as `ledger retry ID` does.

        A crash recovery (a stale RUNNING record) keeps the call's current_key(), so a
        downstream that saw the lost run deduplicates the new one; releasing a SUCCESS
        is a deliberate re-run, which gets a fresh key."""
        store = self.store
        while True:
            record = store.get(id)
            if record is None or record.status == Status.FAILED:
                return False
            clock = store.now()   # the lease clock, which a step of this worker's wall clock does not move
            if record.status == Status.RUNNING and record.lease_until > clock and not force:
                raise LeaseLiveError(
                    f"call {id} ({record.tool}) is running now: worker {record.owner} holds its lease for "
                    f"another {record.lease_until - clock:.1f}s and renews it while it runs. Releasing it would "
                    f"let a second run overlap this one; wait for it, or force the release if that worker "
                    f"is known to be gone (guard.retry(..., force=True), `ledger retry --force ID`)")
            run_key = f"{id}.{_unique_token()}" if record.status == Status.SUCCESS else record.run_key
            released = record.evolve(status=Status.FAILED.value, owner="retry", epoch=record.epoch + 1,
                                      updated=time.time(), run_key=run_key,
                                      error="released for retry by an operator")
            if store.swap(released, record.epoch, record.owner):
                return True

    def resolve(self, id: str, *, done: bool, result: Any = None) -> bool:
        """Settle a call whose outcome is UNKNOWN, as `ledger resolve ID` does, once you know
        whether its run took effect: done=True records it as SUCCESS with `result` (what
        duplicates then replay), done=False as FAILED, so its next call runs again with the
        same current_key(). True if this settled it; False if it was not UNKNOWN (no such
        record, or settled already: by a verifier, another resolve, a run)."""
        if not isinstance(done, bool):
            raise ConfigError(f"resolve: done must be True or False, not {done!r}")
        if not done and result is not None:
            raise ConfigError("resolve: result= is what a call that took effect returned; pass it with done=True")
        store = self.store
        while True:
            record = store.get(id)
            if record is None or record.status != Status.UNKNOWN:
                return False
            if store.swap(self._settled(record, done, result), record.epoch, record.owner):
                return True

    def _settled(self, record: Record, done: bool, result: Any) -> Record:
        """The record that settles an UNKNOWN one: the next epoch, owned by no worker."""
        now, clock = time.time(), self.store.now()
        settled = record.evolve(owner="resolve", epoch=record.epoch + 1, updated=now, lease_until=clock)
        if not done:
            settled.status, settled.sig = Status.FAILED.value, None
            settled.error = f"resolved as not done by an operator (was: {record.error})"[:2000]
            return settled
        policy = self._core.policies.get(record.tool, DEFAULT_POLICY)
        settled.status, settled.runs, settled.error = Status.SUCCESS.value, record.runs + 1, None
        settled.result, settled.unstored = _encode(policy, result)
        settled.expires = clock + policy.ttl if policy.ttl else None
        settled.sig = _sign(self._core.secret, settled)
        return settled

    def reset(self, wf: str | None = None) -> int:
        """Delete every record (of workflow `wf`); how many were deleted."""
        self._core.flush()
        return self.store.clear(wf)

    def prune(self, older_than: float | _dt.timedelta, *, status: str | Iterable[str] | None = None,
              wf: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Delete the records of finished calls (SUCCESS and FAILED, never RUNNING ones) that
        finished more than `older_than` seconds ago, and of ttl'd calls whose window has ended,
        whatever their age; only those in `status` and workflow `wf`, if given. A pruned call
        is forgotten: called again, it runs again. Returns {"removed": n, "dry_run": bool,
        "counts": [{"status", "tool", "count"}, ...]}; with dry_run=True, what it would remove."""
        statuses = _prune_statuses(status)
        age = older_than.total_seconds() if isinstance(older_than, _dt.timedelta) else older_than
        if isinstance(age, bool) or not isinstance(age, (int, float)) or not age >= 0:
            raise ConfigError(f"prune: older_than must be seconds >= 0 or a timedelta, not {older_than!r}")
        # Age is wall time since the call finished (`updated`); ttl windows end on the lease clock.
        counts = self.store.prune(time.time() - age, self.store.now(), statuses, workflow=wf, dry_run=dry_run)
        rows = [{"status": st, "tool": tool, "count": n} for (st, tool), n in sorted(counts.items())]
        return {"removed": sum(counts.values()), "dry_run": dry_run, "counts": rows}

    def history(self, tool: Callable | str | None = None, wf: str | None = None) -> list[dict[str, Any]]:
        """Every record (of one tool, one workflow) as a dict, oldest first."""
        _flush_all(url=self.store.url)
        return [_HistoryRow(r.as_dict()) for r in self.store.records(workflow=wf, tool=self._tool_name(tool))]

    def stats(self, wf: str | None = None) -> dict[str, Any]:
        """Totals: actions (records), attempts, executed, blocked, failed, unknown, running, stale,
        duplicate_rate (blocked / attempts), saved_usd and saved_seconds (what duplicates
        avoided), fenced (this process)."""
        _flush_all(url=self.store.url)
        return {**_totals(self.store.records(workflow=wf), self.store.now()), "fenced": self._core.fenced}

    def log(self, wf: str | None = None, file: Any = None) -> str:
        """A per-tool summary, written to stderr (or `file`) and returned."""
        _flush_all(url=self.store.url)
        lines = [_summary_line(tool, rows) for tool, rows in _by_tool(self.store.records(workflow=wf)).items()]
        text = "\n".join(lines) if lines else "(no calls recorded)"
        print(text, file=file or sys.stderr)
        return text

    def check(self) -> bool:
        """Self-test of this guard's store: the store contract (check_store), then the state
        machine end to end (a run, a replayed duplicate, a failure and its re-run), on scratch
        records of a workflow of its own, removed afterwards. True or raises."""
        store, workflow = self.store, f"ledger-check-{secrets.token_hex(6)}"
        check_store(store)
        probe = Guard(store, workflow=workflow, quiet=True, secret=self._core.secret)
        calls: list[int] = []

        @probe.once(name="ledger.check", replay=True)
        def tool(n: int) -> int:
            calls.append(n)
            if n < 0:
                raise ValueError(n)
            return n * 2

        try:
            results = [probe(tool, 21), probe(tool, n=21)]
            for _ in range(2):
                with contextlib.suppress(ValueError):
                    probe(tool, -1)
        finally:
            probe._core.flush(quietly=True)
            store.clear(workflow)
        if results != [42, 42] or calls != [21, -1, -1]:
            raise LedgerError(f"self-check failed on {store!r}: results {results}, runs {calls}")
        return True

    def close(self) -> None:
        """Flush counters and close the store (every thread's connection to it)."""
        self._core.flush()
        if self._core._store is not None:
            self._core._store.close()

    def _resolve(self, fn: Callable | str) -> Callable:
        """A tool given by name: the function this guard wrapped under that name."""
        if not isinstance(fn, str):
            return fn
        if fn not in self._core.tools:
            raise ConfigError(f"no tool named {fn!r} was wrapped by this guard; pass the function itself")
        return _Named(self._core.tools[fn], fn)

    def _tool_name(self, tool: Callable | str | None) -> str | None:
        return tool if tool is None or isinstance(tool, str) else self._core.record_name(tool)


# Results whose body runs only while they are iterated, after the call was recorded.
_LAZY_TYPES = (types.GeneratorType, types.AsyncGeneratorType)


def _refuse_deferred(call: _Call, value: Any) -> None:
    """A sync tool returned work that has not run yet: an awaitable (an async tool behind
    a plain decorator) or a generator.

    Refused rather than followed: the call would be recorded before its work ran, its
    failures never, and a duplicate, which cannot know what the first run returned,
    would hand its caller a plain value (BLOCKED, a replay) where it awaits or iterates
    one. The work is stopped before its body runs: a coroutine or generator is closed, a
    future cancelled. Raised inside the run, so the call is recorded FAILED and its next
    call is refused the same way."""
    if isinstance(value, _LAZY_TYPES):
        if isinstance(value, types.GeneratorType):
            value.close()
        raise DeferredToolError(
            f"{call.name} returned {_describe(value)}, whose body runs only while it is iterated, after the "
            f"guard recorded the call, so its work and failures would go unrecorded; it was closed before "
            f"running. Return the items themselves (`return list(...)`), or guard the function that does "
            f"the work")
    if inspect.iscoroutine(value):
        value.close()
    elif callable(getattr(value, "cancel", None)):
        value.cancel()
    raise DeferredToolError(
        f"{call.name} is a plain function but returned {_describe(value)}, so the guard cannot tell when or "
        f"whether its work finishes; it was refused before running (a coroutine is closed, a future "
        f"cancelled). Declare the wrapper `async def` (an async tool behind a sync decorator is the usual "
        f"cause), so that the guard awaits the tool and records its real outcome")


async def _answer(core: _Core, run: _Run, answer: Any) -> Any:
    """An async verifier's answer, or the exception it raised."""
    if not inspect.isawaitable(answer):
        return answer
    try:
        return await answer
    except Exception as e:
        return e
    except BaseException:
        core.interrupted(run)
        raise


async def _value_of(outcome: Any) -> Any:
    return (await outcome).value


async def _outcome_of(awaitable: Any) -> Outcome:
    return Outcome(await awaitable, "unlimited")


def _prune_statuses(status: str | Iterable[str] | None) -> tuple[str, ...]:
    wanted = PRUNABLE if status is None else (status,) if isinstance(status, str) else tuple(status)
    if not wanted or any(s not in PRUNABLE for s in wanted):
        raise ConfigError(f"prune: status must be one or more of {', '.join(PRUNABLE)} (a RUNNING call is "
                          f"never pruned), not {status!r}")
    return tuple(sorted(set(wanted)))


def _refuse_shared_names(tools: Iterable[Any], guarded: Iterable[Any]) -> None:
    """Two different tools of one list under one name would share records (two wrappers made
    with functools.wraps around one function, two framework tools with one name)."""
    first: dict[str, Any] = {}
    for tool, wrapped in zip(tools, guarded):
        marker = getattr(wrapped, "__ledger__", None)
        name = marker[1] if type(marker) is tuple else getattr(wrapped, "name", None)
        if isinstance(name, str) and first.setdefault(name, tool) is not tool:
            raise ConfigError(f"wrap_tools: two different tools are both named {name!r}, so they would share "
                              f"records; pass a dict with a name of its own for each")


class _HistoryRow(dict):
    """A record as a dict. row["wf"] and row["touched"], ledger-once's names, read
    "workflow" and "updated" (without being keys of their own)."""

    _LEDGER_ONCE_NAMES = {"wf": "workflow", "touched": "updated"}

    def __missing__(self, key: str) -> Any:
        if key in self._LEDGER_ONCE_NAMES:
            return self[self._LEDGER_ONCE_NAMES[key]]
        raise KeyError(key)


def _by_tool(records: Iterable[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.tool, []).append(record)
    return groups


def _totals(records: list[Record], now: float | None = None) -> dict[str, Any]:
    """The figures of `Guard.stats`, for any list of records (one tool's, say)."""
    now = now or time.time()
    attempts, blocked = sum(r.attempts for r in records), sum(r.blocked for r in records)
    return {
        "actions": len(records),
        "attempts": attempts,
        "executed": sum(r.executed for r in records),
        "blocked": blocked,
        "failed": sum(r.status == Status.FAILED for r in records),
        "unknown": sum(r.status == Status.UNKNOWN for r in records),
        "running": sum(r.status == Status.RUNNING and not r.stale(now) for r in records),
        "stale": sum(r.stale(now) for r in records),
        "duplicate_rate": round(blocked / attempts, 4) if attempts else 0.0,
        "saved_usd": round(sum(r.blocked * (r.cost or 0) for r in records), 6),
        "saved_seconds": round(sum(r.blocked * (r.duration or 0) for r in records), 6),
    }


def _summary_line(tool: str, rows: list[Record]) -> str:
    """One line of guard.log(); tool names and errors are untrusted, so no control character of theirs."""
    failed = [r for r in rows if r.status in (Status.FAILED, Status.UNKNOWN)]
    mark = "✗" if failed else "✓"
    tool = _clean(tool)
    line = (f"{mark} {tool:<24} attempts {sum(r.attempts for r in rows):<4} "
            f"executed {sum(r.executed for r in rows):<4} blocked {sum(r.blocked for r in rows)}")
    return line + (f"  -> {_clean(failed[-1].error)}" if failed else "")


guard = Guard()


# ---------------------------------------------------------------------------
# Framework adapters. Each takes (guard, tool, name, blocked_return) and returns a
# guarded copy of the framework's own tool object (the MCP server adapter guards
# the server in place); all of them guard the framework's innermost call of the
# user's code through Guard._wrap. Frameworks are never imported: a tool's class
# can only be one of theirs if their module is already loaded.
# ---------------------------------------------------------------------------

class _Named:
    """A tool under an explicit name (from wrap_tools or once(name=))."""

    __slots__ = ("fn", "name")

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name


def _unwrap(fn: Any) -> tuple[Callable, str | None]:
    if type(fn) is _Named:
        return fn.fn, fn.name
    marker = getattr(fn, "__ledger__", None)
    if type(marker) is tuple:
        return marker
    return fn, None


def _adapt_langchain(guard: Guard, tool: Any, name: str, blocked_return: Any) -> Any:
    """StructuredTool / Tool: guard func and coroutine. Any other BaseTool: guard _run (and
    _arun if it has its own), which is what BaseTool.run and arun call. A blocked duplicate
    is BLOCKED_MESSAGE, as (content, artifact) for a content_and_artifact tool."""
    if blocked_return is _UNSET:
        blocked_return = _langchain_blocked(tool)
    fields = type(tool).model_fields
    if "func" in fields or "coroutine" in fields:
        return tool.model_copy(update={attr: guard._wrap(getattr(tool, attr), name, blocked_return)
                                       for attr in ("func", "coroutine") if getattr(tool, attr, None)})
    return _guard_own_run_methods(guard, tool, sys.modules["langchain_core.tools"].BaseTool, name, blocked_return)


def _guard_own_run_methods(guard: Guard, tool: Any, base: type, name: str, blocked_return: Any) -> Any:
    """A copy of a pydantic tool object (LangChain's or CrewAI's BaseTool) with the _run and
    _arun its class defines over `base` guarded: what the framework's run and arun call."""
    guarded = tool.model_copy()
    for attr in ("_run", "_arun"):
        if getattr(type(tool), attr) is not getattr(base, attr):
            object.__setattr__(guarded, attr, guard._wrap(getattr(tool, attr), name, blocked_return))
    return guarded


def _langchain_blocked(tool: Any) -> Any:
    """A LangChain tool's blocked duplicate: BLOCKED_MESSAGE, as (content, artifact) where the
    tool returns that pair."""
    return (BLOCKED_MESSAGE, None) if getattr(tool, "response_format", None) == "content_and_artifact" \
        else BLOCKED_MESSAGE


def _adapt_function_tool(guard: Guard, tool: Any, name: str, blocked_return: Any) -> Any:
    """OpenAI Agents SDK FunctionTool: guard on_invoke_tool(context, json_arguments), with the
    parsed arguments (and what the run context says of the caller) as the call's identity. The
    SDK's invoker turns a tool's exception into a message for the model; the guard goes inside
    it (its _invoke_tool_impl, where present), so a tool that raised stays retryable."""
    invoker = tool.on_invoke_tool
    impl = getattr(invoker, "_invoke_tool_impl", None) or invoker

    async def invoke(context: Any, text: Any, /, **arguments: Any) -> Any:
        return await impl(context, text)

    invoke.__annotations__ = {"context": _agents_context_rule(impl), "text": Ignore}
    guarded = guard._wrap(invoke, name, BLOCKED_MESSAGE if blocked_return is _UNSET else blocked_return)

    async def on_invoke_tool(context: Any, text: str) -> Any:
        try:
            arguments = json.loads(text or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):  # the SDK reports malformed arguments itself
            return await impl(context, text)
        return await guarded(context, text, **arguments)

    functools.update_wrapper(on_invoke_tool, impl)  # keeps the SDK's markers on its invoker
    if impl is not invoker:
        invoker = copy.copy(invoker)
        invoker._invoke_tool_impl = on_invoke_tool
        return dataclasses.replace(tool, on_invoke_tool=invoker)
    return dataclasses.replace(tool, on_invoke_tool=on_invoke_tool)


def _agents_context_rule(impl: Callable) -> Any:
    """How the run context counts toward a FunctionTool call's identity, as an annotation: as
    the first parameter of the user's function says (a RunContextWrapper: its .context; see
    _INJECTED, Ignore, Identity). The SDK marks its invoker with the user's function, which
    may take no context (then the context does not count); an invoker written by hand is the
    user's function and always gets the context, whose .context counts unless annotated."""
    original = getattr(impl, "__agents_function_tool_wrapped_callable__", None)
    fn = original or impl
    try:
        first = next(iter(inspect.signature(fn).parameters), None)
    except (TypeError, ValueError):
        first = None
    injected = _injected_parameters(fn)
    extract = injected[first] if first in injected else (None if original is not None else _context_of)
    return Ignore if extract is None else Annotated[Any, Identity(extract)]


def _mcp_blocked(tool: Any) -> Any:
    """An MCP tool's blocked duplicate: BLOCKED_MESSAGE, as the tool's own text result where
    its output is text; otherwise as a text result marked isError, the one result MCP does not
    check against the tool's output schema (a duplicate has no output of its own to check)."""
    schema = getattr(tool, "output_schema", None)
    wrapped = schema is not None and (schema.get("x-fastmcp-wrap-result")
                                      or getattr(getattr(tool, "fn_metadata", None), "wrap_output", False))
    if schema is None or (wrapped and schema["properties"]["result"].get("type") == "string"):
        return BLOCKED_MESSAGE
    types = importlib.import_module("mcp.types")  # mcp is loaded: the tool is one of its servers'
    return types.CallToolResult(content=[types.TextContent(type="text", text=BLOCKED_MESSAGE)], is_error=True)


def _adapt_mcp_tool(guard: Guard, tool: Any, name: str, blocked_return: Any) -> Any:
    """A registered MCP tool (mcp's or standalone fastmcp's): guard fn, which the tool runs with
    the validated arguments and the request context (a Context, so passed on)."""
    blocked = _mcp_blocked(tool) if blocked_return is _UNSET else blocked_return
    return tool.model_copy(update={"fn": guard._wrap(tool.fn, name, blocked)})


def _guard_mcp_tool_in_place(guard: Guard, tool: Any, name: str | None, blocked_return: Any) -> None:
    """A function @server.tool() registered and returned: guard the server's tool in place."""
    if getattr(tool.fn, "__ledger__", None) is None:
        tool.fn = guard._wrap(tool.fn, name or tool.name, _mcp_blocked(tool) if blocked_return is _UNSET
                              else blocked_return)


def _mcp_registry(server: Any) -> dict:
    """The dict of an MCP server's registered tools. Neither SDK offers a public way to replace
    a registered tool, so this reads a private attribute: mcp 1.x and 2.x keep the tool
    manager's _tools (name -> Tool); standalone fastmcp its local provider's _components
    ("tool:name@version" -> FunctionTool, beside resources and prompts)."""
    manager = getattr(server, "_tool_manager", None)
    if manager is not None:
        return manager._tools
    return server.local_provider._components


def _adapt_mcp_server(guard: Guard, server: Any, name: str | None, blocked_return: Any) -> Any:
    """An MCP server: guard every tool registered so far, in place; the server comes back."""
    registry = _mcp_registry(server)
    for key, tool in list(registry.items()):
        if _adapter_for(tool) is _adapt_mcp_tool:
            registry[key] = _adapt_mcp_tool(guard, tool, tool.name, blocked_return)
    return server


def _readable(blocked_return: Any) -> Any:
    """What a framework tool's blocked duplicate returns: BLOCKED_MESSAGE unless chosen."""
    return BLOCKED_MESSAGE if blocked_return is _UNSET else blocked_return


def _blocked_message(tool: Any) -> str:
    """The blocked default of a framework whose tools return text or any JSON value."""
    return BLOCKED_MESSAGE


def _adapt_pydantic_ai_tool(guard: Guard, tool: Any, name: str, blocked_return: Any) -> Any:
    """Pydantic AI Tool: a copy, guarded as below."""
    guarded = copy.copy(tool)
    _guard_pydantic_ai_tool_in_place(guard, guarded, name, blocked_return)
    return guarded


def _guard_pydantic_ai_tool_in_place(guard: Guard, tool: Any, name: str | None, blocked_return: Any) -> None:
    """Pydantic AI Tool (also one @agent.tool or @toolset.tool registered and returned): guard
    its function, which the tool's function schema calls with the RunContext (if it takes
    one) and the validated arguments. The schema holds the function it calls, so it gets a
    copy with the guarded one."""
    if getattr(tool.function, "__ledger__", None) is None:
        tool.function = guard._wrap(tool.function, name or tool.name, _readable(blocked_return))
        tool.function_schema = dataclasses.replace(tool.function_schema, function=tool.function)


def _adapt_pydantic_ai_toolset(guard: Guard, toolset: Any, name: str | None, blocked_return: Any) -> Any:
    """Pydantic AI FunctionToolset: a copy whose tools (its public `tools` dict) are guarded."""
    guarded = copy.copy(toolset)
    guarded.tools = {key: _adapt_pydantic_ai_tool(guard, tool, tool.name, blocked_return)
                     for key, tool in toolset.tools.items()}
    return guarded


def _adapt_llama_index_tool(guard: Guard, tool: Any, name: str, blocked_return: Any) -> Any:
    """LlamaIndex FunctionTool: a new FunctionTool over the guarded user function(s), with the
    same metadata (name, description, schema), callbacks and partial parameters. The callbacks
    have no public getter; `_callback` and `_async_callback` are read to carry them over."""
    blocked_return = _readable(blocked_return)
    bridges = ("sync_to_async.", "async_to_sync.")  # what LlamaIndex adds for the kind not given
    given = {kind: fn for kind, fn in (("fn", tool.fn), ("async_fn", tool.async_fn))
             if not getattr(fn, "__qualname__", "").startswith(bridges)}
    return type(tool)(**{kind: guard._wrap(fn, name, blocked_return) for kind, fn in given.items()},
                      metadata=tool.metadata, callback=tool._callback, async_callback=tool._async_callback,
                      partial_params=tool.partial_params)


def _adapt_llama_index_spec(guard: Guard, spec: Any, name: str | None, blocked_return: Any) -> Any:
    """LlamaIndex ToolSpec: a copy whose spec functions are guarded, so its to_tool_list() and
    to_tool_list_async() build guarded tools under the same names."""
    blocked_return = _readable(blocked_return)
    guarded = copy.copy(spec)
    for entry in spec.spec_functions:
        for fn_name in (entry,) if isinstance(entry, str) else entry:
            setattr(guarded, fn_name, guard._wrap(getattr(spec, fn_name), entry if isinstance(entry, str)
                                                  else entry[0], blocked_return))
    return guarded


def _adapt_smolagents_tool(guard: Guard, tool: Any, name: str, blocked_return: Any) -> Any:
    """smolagents Tool: guard forward, which Tool.__call__ calls with the arguments. The forward
    of a @tool tool is a function whose signature starts with `self` (for exporting its
    source); the user's function it wraps is the one the arguments bind to."""
    blocked_return = _readable(blocked_return)
    guarded = copy.copy(tool)
    forward = tool.forward
    if not inspect.ismethod(forward) and next(iter(inspect.signature(forward).parameters), None) == "self":
        forward = forward.__wrapped__
    guarded.forward = guard._wrap(forward, name, blocked_return)
    return guarded


def _adapt_autogen_tool(guard: Guard, tool: Any, name: str, blocked_return: Any) -> Any:
    """AutoGen FunctionTool: guard the function run() calls (`_func`: FunctionTool has no public
    way to swap it; the schema, built from its signature at construction, is kept). run()
    hands a sync function to loop.run_in_executor, which leaves context variables (a
    guard.workflow scope) behind; so a sync function is handed over as an async one that runs
    it in a thread with the caller's context, as asyncio.to_thread does."""
    guarded = copy.copy(tool)
    fn = guard._wrap(tool._func, name, _readable(blocked_return))
    if not _is_async(fn):
        in_thread = fn

        async def fn(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(in_thread, *args, **kwargs)

        functools.update_wrapper(fn, in_thread)
    guarded._func = fn
    return guarded


def _adapt_autogen_workbench(guard: Guard, workbench: Any, name: str | None, blocked_return: Any) -> Any:
    """AutoGen StaticWorkbench: a new one over its tools, guarded, with the same overrides of
    their names and descriptions (`_tools` and `_tool_overrides`: it has no public getters)."""
    return type(workbench)([guard._wrap_tool(tool, None, blocked_return) for tool in workbench._tools],
                           tool_overrides=workbench._tool_overrides)


def _adapt_adk_tool(guard: Guard, tool: Any, name: str, blocked_return: Any) -> Any:
    """Google ADK FunctionTool: guard its public `func`, which run_async calls with the
    arguments and the ToolContext; the declaration, built at construction, is kept."""
    blocked_return = _readable(blocked_return)
    guarded = copy.copy(tool)
    guarded.func = guard._wrap(tool.func, name, blocked_return)
    return guarded


def _adapt_crewai_tool(guard: Guard, tool: Any, name: str, blocked_return: Any) -> Any:
    """CrewAI Tool (from @tool): guard func. Any other BaseTool: guard _run (and _arun if it
    has its own), which run, arun and to_structured_tool call."""
    blocked_return = _readable(blocked_return)
    if "func" in type(tool).model_fields:
        return tool.model_copy(update={"func": guard._wrap(tool.func, name, blocked_return)})
    return _guard_own_run_methods(guard, tool, sys.modules["crewai.tools.base_tool"].BaseTool, name, blocked_return)


# (module, class name, adapter): framework objects wrap_tools and once take.
_ADAPTERS: tuple[tuple[str, str, Callable[..., Any]], ...] = (
    ("langchain_core.tools", "BaseTool", _adapt_langchain),
    ("agents.tool", "FunctionTool", _adapt_function_tool),
    ("mcp.server.mcpserver.tools.base", "Tool", _adapt_mcp_tool),
    ("mcp.server.fastmcp.tools.base", "Tool", _adapt_mcp_tool),
    ("fastmcp.tools.function_tool", "FunctionTool", _adapt_mcp_tool),
    ("mcp.server.mcpserver.server", "MCPServer", _adapt_mcp_server),
    ("mcp.server.fastmcp.server", "FastMCP", _adapt_mcp_server),
    ("pydantic_ai.tools", "Tool", _adapt_pydantic_ai_tool),
    ("pydantic_ai.toolsets.function", "FunctionToolset", _adapt_pydantic_ai_toolset),
    ("llama_index.core.tools.function_tool", "FunctionTool", _adapt_llama_index_tool),
    ("llama_index.core.tools.tool_spec.base", "BaseToolSpec", _adapt_llama_index_spec),
    ("smolagents.tools", "Tool", _adapt_smolagents_tool),
    ("autogen_core.tools._function_tool", "FunctionTool", _adapt_autogen_tool),
    ("autogen_core.tools._static_workbench", "StaticWorkbench", _adapt_autogen_workbench),
    ("google.adk.tools.function_tool", "FunctionTool", _adapt_adk_tool),
    ("crewai.tools.base_tool", "BaseTool", _adapt_crewai_tool),
    ("fastmcp.server.server", "FastMCP", _adapt_mcp_server),
)

# (module, class name, guard in place, blocked default): framework tool objects that hold a
# function in one of their attributes. Where a framework decorator registers the function
# and hands it back unchanged (MCP's @server.tool(), Pydantic AI's @agent.tool and
# @toolset.tool), guarding the function alone would leave the registered tool unguarded:
# `guard in place` guards it (None: the decorator returns the tool object, which wrap_tools
# and once take themselves). Where @guard.once sits below the
# decorator, the tool holds the guard's own wrapper, whose blocked duplicate then returns
# `blocked default(tool)`, looked up on the first one.
_REGISTRATIONS: tuple[tuple[str, str, Callable[..., None] | None, Callable[[Any], Any]], ...] = (
    ("mcp.server.mcpserver.tools.base", "Tool", _guard_mcp_tool_in_place, _mcp_blocked),
    ("mcp.server.fastmcp.tools.base", "Tool", _guard_mcp_tool_in_place, _mcp_blocked),
    ("fastmcp.tools.function_tool", "FunctionTool", _guard_mcp_tool_in_place, _mcp_blocked),
    ("langchain_core.tools", "BaseTool", None, _langchain_blocked),
    ("pydantic_ai.tools", "Tool", _guard_pydantic_ai_tool_in_place, _blocked_message),
    ("llama_index.core.tools.function_tool", "FunctionTool", None, _blocked_message),
    ("autogen_core.tools._function_tool", "FunctionTool", None, _blocked_message),
    ("google.adk.tools.function_tool", "FunctionTool", None, _blocked_message),
    ("crewai.tools.base_tool", "BaseTool", None, _blocked_message),
)


def _known_framework_classes() -> str:
    return ", ".join(dict.fromkeys(f"{module.partition('.')[0]} {cls_name}" for module, cls_name, _ in _ADAPTERS))


def _adapter_for(tool: Any) -> Callable[..., Any] | None:
    for module, cls_name, adapt in _ADAPTERS:
        cls = getattr(sys.modules.get(module), cls_name, None)
        if cls is not None and isinstance(tool, cls):
            return adapt
    return None


def _registrations(fn: Any) -> list[tuple[Any, Callable[..., None] | None, Callable[[Any], Any]]]:
    """(tool object, guard in place, blocked default) for each framework tool holding `fn`
    (see _REGISTRATIONS). Found through the garbage collector's referrers (a scan of the heap,
    only when such a framework is loaded, once per wrap or per guarded function): the tool
    holds `fn` as one of its attributes (in its __dict__, as a pydantic model does; or inline,
    as a dataclass may). No framework offers a lookup from a function to its tool."""
    kinds = [(cls, guard_in_place, blocked) for module, cls_name, guard_in_place, blocked in _REGISTRATIONS
             if (cls := getattr(sys.modules.get(module), cls_name, None)) is not None]
    if not kinds:
        return []
    found = []
    for holder in gc.get_referrers(fn):
        # a pydantic model refers to fn from its attribute dict; a dataclass (Pydantic AI's
        # Tool) may refer to it itself, its attributes kept inline
        owners = gc.get_referrers(holder) if type(holder) is dict else [holder]
        for owner in owners:
            attributes = getattr(owner, "__dict__", None) or {}
            if (owner is holder or attributes is holder) and any(value is fn for value in attributes.values()):
                found += [(owner, guard_in_place, blocked) for cls, guard_in_place, blocked in kinds
                          if isinstance(owner, cls)][:1]
    return found


def _blocked_default(wrapper: Callable) -> Any:
    """What a guarded function's blocked duplicate returns when no blocked_return was given:
    BLOCKED, or, where a framework tool holds the function (@guard.once below its decorator),
    what that framework's tools return. Looked up on the first blocked duplicate, then kept."""
    value = wrapper.__dict__.get("__ledger_blocked__", _UNSET)
    if value is _UNSET:
        value = next((blocked(owner) for owner, _, blocked in _registrations(wrapper)), BLOCKED)
        wrapper.__ledger_blocked__ = value
    return value


def _framework_name(tool: Any) -> str | None:
    """The name a framework tool is known by, which is also the name of its records."""
    adapt = _adapter_for(tool)
    if adapt is None or adapt is _adapt_mcp_server:
        return None
    metadata = getattr(tool, "metadata", None)  # LlamaIndex keeps a tool's name in its metadata
    return getattr(tool, "name", None) or getattr(metadata, "name", None)


def _is_plain_callable(fn: Any) -> bool:
    """A function, method, builtin or partial (possibly guarded already), or a callable object
    of the user's own class; not an object of an installed package ledger has no adapter for,
    whose call would bypass the framework's own tool machinery."""
    if inspect.isroutine(fn) or isinstance(fn, functools.partial) or type(fn) is _Named:
        return True
    if not callable(fn):
        return False
    module = sys.modules.get((fn if isinstance(fn, type) else type(fn)).__module__)
    path = getattr(module, "__file__", None) or ""
    return not any(path.startswith(root) for root in _library_roots())


@functools.cache
def _library_roots() -> tuple[str, ...]:
    """Where installed packages and the standard library live."""
    paths = sysconfig.get_paths()
    return tuple({os.path.join(paths[key], "") for key in ("stdlib", "platstdlib", "purelib", "platlib")}
                 | {os.path.join(p, "") for p in site.getsitepackages()})


# ---------------------------------------------------------------------------
# Stores: memory and SQLite, the two backends this file holds. MemoryStore is a
# dict behind a lock, for tests and one process. SQLiteStore is one file in WAL
# mode shared by every process on the machine: each operation is one short
# transaction on a per-thread connection, a fork()ed child opens its own, and
# the lease clock is the machine's boot clock (where it has one), which no
# wall-clock step moves.
# ---------------------------------------------------------------------------

class MemoryStore(Store):
    """Records in a dict, for tests and single-process use. Thread-safe."""

    def __init__(self) -> None:
        self._rows: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)
        self.url = f":memory:{id(self):x}"
        self._base = time.time() - time.monotonic()   # one process: its monotonic clock, shown near wall time

    def now(self) -> float:
        return time.monotonic() + self._base

    def get(self, id: str) -> Record | None:
        return self._rows.get(id)

    def insert(self, record: Record) -> bool:
        with self._lock:
            if record.id in self._rows:
                return False
            self._rows[record.id] = record
            return True

    def insert_or_get(self, id: str, claim: Callable[[], Record]) -> Record | None:
        with self._lock:   # as every write: clear and prune iterate the rows under it
            stored = self._rows.get(id)
            if stored is None:
                stored = self._rows[id] = claim()
            return stored

    def swap(self, record: Record, epoch: int, owner: str) -> bool:
        with self._lock:
            old = self._rows.get(record.id)
            if old is None or old.epoch != epoch or old.owner != owner:
                return False
            if record.attempts != old.attempts or record.blocked != old.blocked:  # the stored counters stay
                record = record.evolve(attempts=old.attempts, blocked=old.blocked)
            self._rows[record.id] = record
            return True

    def delete(self, id: str, epoch: int | None = None) -> bool:
        with self._lock:
            old = self._rows.get(id)
            if old is None or (epoch is not None and old.epoch != epoch):
                return False
            del self._rows[id]
            return True

    def add_counts(self, counts: Mapping[str, tuple[int, int]]) -> None:
        with self._lock:
            for id, (attempts, blocked) in counts.items():
                old = self._rows.get(id)
                if old is not None:
                    self._rows[id] = old.evolve(attempts=old.attempts + attempts, blocked=old.blocked + blocked)

    def records(self, workflow: str | None = None, tool: str | None = None) -> list[Record]:
        with self._lock:
            rows = list(self._rows.values())
        return sorted((r for r in rows if (workflow is None or r.workflow == workflow)
                       and (tool is None or r.tool == tool)), key=lambda r: r.created)

    def clear(self, workflow: str | None = None) -> int:
        with self._lock:
            doomed = [k for k, r in self._rows.items() if workflow is None or r.workflow == workflow]
            for k in doomed:
                del self._rows[k]
            return len(doomed)

    def prune(self, before: float, now: float, statuses: tuple[str, ...] = PRUNABLE, workflow: str | None = None,
              dry_run: bool = False, batch: int | None = None) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            doomed = [r for r in self._rows.values() if _prunable(r, before, now, statuses, workflow)]
            for r in doomed if not dry_run else ():
                del self._rows[r.id]
        for r in doomed:
            _tally(counts, r.status, r.tool)
        return counts

    def secret(self) -> bytes:
        return self._secret


_Mem = MemoryStore  # ledger-once's name for the in-memory store, which its README's tests import


# 2: the indexes prune selects by. 3: leases and ttl windows are on the store's clock
# (SQLite keeps its base in a table `clock`; server tables are unchanged, but are marked
# 3 so that no worker that still judges leases by its own wall clock joins them).
SCHEMA_VERSION = 3
_SQL_COLUMNS = ", ".join(RECORD_FIELDS)
# A record's id is a hash of its tool and workflow, so a swap never changes these
# three; leaving them out of the UPDATE spares SQLite rewriting the primary key
# and the workflow index on every completion.
_SQL_SWAP_FIELDS = tuple(f for f in STATE_FIELDS if f not in ("id", "tool", "workflow"))
_SQL_STATE = ", ".join(f"{f} = ?" for f in _SQL_SWAP_FIELDS)
_sql_swap_values = operator.attrgetter(*_SQL_SWAP_FIELDS)
_SQL_GET = f"SELECT {_SQL_COLUMNS} FROM records WHERE id = ?"
_SQL_INSERT = f"INSERT OR IGNORE INTO records ({_SQL_COLUMNS}) VALUES ({', '.join('?' * len(RECORD_FIELDS))})"
_SQL_SWAP = f"UPDATE records SET {_SQL_STATE} WHERE id = ? AND epoch = ? AND owner = ?"
# prune selects through two partial indexes that hold only finished records, so a
# claim (a RUNNING insert) and a lease renewal add no index entry.
_SQL_PRUNABLE = "status IN (" + ", ".join(f"'{s}'" for s in PRUNABLE) + ")"
_SQL_PRUNE_INDEXES = (("finished", f"(updated) WHERE {_SQL_PRUNABLE}"),
                      ("expiring", f"(expires) WHERE {_SQL_PRUNABLE} AND expires IS NOT NULL"))


def _sql_prune_passes(before: float, now: float, statuses: tuple[str, ...], workflow: str | None,
                      mark: str) -> list[tuple[str, list]]:
    """The WHERE clauses (and parameters) of prune's two passes in SQL: the ttl'd records
    whose window ended, then the rest that finished before `before`. Each repeats its
    index's condition word for word, which is what lets the planner use that index."""
    rest = f" AND status IN ({', '.join([mark] * len(statuses))})"
    params = list(statuses)
    if workflow is not None:
        rest, params = rest + f" AND workflow = {mark}", params + [workflow]
    return [(f"{_SQL_PRUNABLE} AND expires IS NOT NULL AND expires <= {mark}{rest}", [now, *params]),
            (f"{_SQL_PRUNABLE} AND updated < {mark} AND (expires IS NULL OR expires > {mark}){rest}",
             [before, now, *params])]


class _Connection:
    """One thread's connection to a SQLite ledger. `lock` is held while a statement
    runs, so that close() and fork() can wait for it and then close the connection;
    its thread opens a new one on its next statement."""

    __slots__ = ("lock", "conn", "claim_first", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None
        self.claim_first = False   # this thread's last look found no record: see insert_or_get


# SQLite must not be used across fork(): a connection open in the parent, and
# SQLite's per-process bookkeeping of the locks it holds on a file, would make the
# child's own connections take no real locks, so another process could delete the
# WAL under it. So no ledger connection is open at the moment of a fork: the
# before-fork hook waits for running statements and closes every connection.
_SQLITE_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
_INHERITED: list[sqlite3.Connection] = []   # kept, never closed, in a child: see _after_fork_in_child
_rowcount = operator.attrgetter("rowcount")
_SQLITE_BUSY_DELAYS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05, 0.1)  # SQLite's own


class SQLiteStore(Store):
    """Records in one SQLite file (WAL), shared by every thread and process on a machine.

    `durable=True` syncs every commit to disk (survives power loss); the default
    (synchronous=NORMAL) survives a crash of any process. `create=False` opens
    only an existing ledger database (as the read-only commands do). `timeout` is
    how long one statement waits for another process's write lock.
    """

    def __init__(self, path: str | os.PathLike = "ledger.db", *, durable: bool = False, timeout: float = 10.0,
                 create: bool = True):
        self.path = os.fspath(path)
        self.url = "sqlite:///" + os.path.abspath(self.path)
        self.durable = durable
        self.timeout = timeout
        self.create = create
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()   # every thread's
        self._connections_lock = threading.Lock()
        self._base: float | None = None   # see now()
        _SQLITE_STORES.add(self)
        self._run(_SQL_GET, ("",), _fetch_one)   # open now: a bad path fails at once

    def _connection(self) -> _Connection:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = _Connection()
            with self._connections_lock:
                self._connections.add(slot)
        return slot

    def _open(self) -> sqlite3.Connection:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise StoreError(f"cannot open ledger database {self.path!r}: directory {folder!r} does not exist; "
                             f"create it or point LEDGER_DB elsewhere")
        if not self.create and not os.path.isfile(self.path):
            raise StoreError(f"no ledger database at {self.path}")
        if self.create:
            _create_private_file(self.path)
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            self._migrate(conn)  # first, so that a file that is no ledger is left as it was
            self.legacy = _carry_over_ledger_once(conn, self.path, self.create, self.now)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=" + ("FULL" if self.durable else "NORMAL"))
            conn.execute("PRAGMA busy_timeout = 0")   # _run waits for other processes' locks itself
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open ledger database {self.path!r}: {e}. "
                             f"{_sqlite_advice(self.path, e)}") from None
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path!r} was written by a newer ledger.py (schema {version}); upgrade ledger.py")
        if version == 0 and not self.create:
            raise StoreError(_not_a_ledger(conn, self.path))
        if version < SCHEMA_VERSION:
            with _immediate(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]   # another process may have done it
                if version == 0:
                    columns = ", ".join(f"{f} {_sqlite_type(f)}" for f in RECORD_FIELDS)
                    conn.execute(f"CREATE TABLE IF NOT EXISTS records ({columns}, PRIMARY KEY (id)) WITHOUT ROWID")
                    conn.execute("CREATE INDEX IF NOT EXISTS records_workflow ON records (workflow)")
                # Each step is idempotent, so one pass upgrades a file of any older schema.
                for name, definition in _SQL_PRUNE_INDEXES:
                    conn.execute(f"CREATE INDEX IF NOT EXISTS records_{name} ON records {definition}")
                conn.execute("CREATE TABLE IF NOT EXISTS clock (boot TEXT NOT NULL, base REAL NOT NULL, "
                             "skew REAL NOT NULL)")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._base = self._clock_base(conn)

    # The lease clock (see now()) is the machine's CLOCK_BOOTTIME, which every process
    # on it shares and no wall-clock step moves, plus a base kept in the file for the
    # current boot. A new boot (a new /proc/sys/kernel/random/boot_id) gets a base that
    # continues the old clock by the wall time that passed, and every call still
    # RUNNING from the old boot is expired at once: its process is gone. A file's
    # first base makes the clock read wall time, so schema-1 records keep their meaning.

    def _clock_base(self, conn: sqlite3.Connection) -> float | None:
        boot = _boot_id()
        if boot is None:
            return None   # no boot id or CLOCK_BOOTTIME here: now() is the wall clock
        row = conn.execute("SELECT boot, base, skew FROM clock").fetchone()
        if row is not None and row[0] == boot:
            return row[1]
        with _immediate(conn):
            row = conn.execute("SELECT boot, base, skew FROM clock").fetchone()
            if row is not None and row[0] == boot:
                return row[1]
            skew = row[2] if row is not None else 0.0   # the old clock's lead over wall time
            wall, up = time.time(), time.clock_gettime(_BOOTTIME)
            base = wall + skew - up
            conn.execute("DELETE FROM clock")
            conn.execute("INSERT INTO clock (boot, base, skew) VALUES (?, ?, ?)", (boot, base, skew))
            if row is not None:
                now = up + base
                conn.execute("UPDATE records SET lease_until = ? WHERE status = ? AND lease_until > ?",
                             (now, Status.RUNNING.value, now))
        return base

    def now(self) -> float:
        """The lease clock: seconds since boot plus this file's base (or wall time where there is no boot id)."""
        base = self._base
        return time.time() if base is None else time.clock_gettime(_BOOTTIME) + base

    def _run(self, sql: str, params: Iterable = (), fetch: Callable[[sqlite3.Cursor], Any] = _rowcount,
             many: bool = False, patient: bool = True) -> Any:
        """Run one statement on this thread's connection (opened if need be) and
        fetch its result while the connection is still sure to be open.

        While another process holds the write lock it tries again for up to `timeout`
        seconds, sleeping without the connection's lock, so that close() and fork()
        never wait for more than one attempt; with `patient=False` it returns None
        instead of trying again."""
        slot, delays = self._connection(), iter(_SQLITE_BUSY_DELAYS)
        deadline = None
        while True:
            with slot.lock:
                try:
                    conn = slot.conn
                    if conn is None:
                        conn = slot.conn = self._open()
                    if many:
                        with conn:
                            conn.execute("BEGIN IMMEDIATE")
                            return fetch(conn.executemany(sql, params))
                    return fetch(conn.execute(sql, params))
                except sqlite3.Error as e:
                    if getattr(e, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                        raise StoreError(f"ledger database {self.path!r}: {e}. {_sqlite_advice(self.path, e)}") from e
                    if not patient:
                        return None
                    now = time.monotonic()
                    deadline = deadline or now + self.timeout
                    if now >= deadline:
                        raise StoreError(f"ledger database {self.path!r}: {e} (another process held its write "
                                         f"lock for {self.timeout:g}s). {_sqlite_advice(self.path, e)}") from e
            time.sleep(min(next(delays, _SQLITE_BUSY_DELAYS[-1]), max(deadline - now, 0.0)))

    def get(self, id: str) -> Record | None:
        row = self._run(_SQL_GET, (id,), _fetch_one)
        return Record(*row) if row else None

    def insert(self, record: Record) -> bool:
        return self._run(_SQL_INSERT, _record_values(record)) == 1

    def insert_or_get(self, id: str, claim: Callable[[], Record]) -> Record | None:
        # A new call needs its INSERT and UPDATE; a read before the INSERT is a third
        # statement. A duplicate needs only the read; an INSERT tried first would take the
        # write lock that every process's claims queue for. So each thread tries first
        # what its last look needed: the claim after a look that found no record, the
        # read after one that found a record. Either order gives the same answer. A claim
        # tried first does not wait for another process's write lock: the read that
        # follows may answer without it.
        slot, record = self._connection(), None
        if slot.claim_first:
            record = claim()
            if self._run(_SQL_INSERT, _record_values(record), patient=False) == 1:
                return record
        stored = self.get(id)
        slot.claim_first = stored is None
        if stored is None:
            record = claim() if record is None else record
            if self.insert(record):
                return record
            stored = self.get(id)
        return stored

    def swap(self, record: Record, epoch: int, owner: str) -> bool:
        return self._run(_SQL_SWAP, _sql_swap_values(record) + (record.id, epoch, owner)) == 1

    def delete(self, id: str, epoch: int | None = None) -> bool:
        if epoch is None:
            return self._run("DELETE FROM records WHERE id = ?", (id,)) == 1
        return self._run("DELETE FROM records WHERE id = ? AND epoch = ?", (id, epoch)) == 1

    def add_counts(self, counts: Mapping[str, tuple[int, int]]) -> None:
        self._run("UPDATE records SET attempts = attempts + ?, blocked = blocked + ? WHERE id = ?",
                  [(a, b, id) for id, (a, b) in counts.items()], many=True)

    def records(self, workflow: str | None = None, tool: str | None = None) -> list[Record]:
        sql, params = f"SELECT {_SQL_COLUMNS} FROM records WHERE 1", []
        if workflow is not None:
            sql, params = sql + " AND workflow = ?", params + [workflow]
        if tool is not None:
            sql, params = sql + " AND tool = ?", params + [tool]
        return [Record(*row) for row in self._run(sql + " ORDER BY created", params, _fetch_all)]

    def clear(self, workflow: str | None = None) -> int:
        if workflow is None:
            return self._run("DELETE FROM records")
        return self._run("DELETE FROM records WHERE workflow = ?", (workflow,))

    def prune(self, before: float, now: float, statuses: tuple[str, ...] = PRUNABLE, workflow: str | None = None,
              dry_run: bool = False, batch: int | None = None) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for where, params in _sql_prune_passes(before, now, statuses, workflow, "?"):
            if dry_run:
                for status, tool, n in self._run(f"SELECT status, tool, COUNT(*) FROM records WHERE {where} "
                                                 f"GROUP BY status, tool", params, _fetch_all):
                    _tally(counts, status, tool, n)
                continue
            while self._prune_batch(where, params, batch or PRUNE_BATCH, counts) == (batch or PRUNE_BATCH):
                pass
        return counts

    def _prune_batch(self, where: str, params: list, batch: int, counts: dict[tuple[str, str], int]) -> int:
        """Delete up to `batch` matching records in one statement (so one short write
        transaction, which re-checks the rule as it deletes); how many."""
        rows = self._run(f"DELETE FROM records WHERE id IN (SELECT id FROM records WHERE {where} LIMIT {int(batch)}) "
                         f"RETURNING status, tool", params, _fetch_all)
        for status, tool in rows:
            _tally(counts, status, tool)
        return len(rows)

    def secret(self) -> bytes:
        return _key_file(self.path + ".key")

    def close(self) -> None:
        """Close every thread's connection (each reopens on its next statement)."""
        with self._connections_lock:
            for slot in list(self._connections):
                with slot.lock:
                    _close_connection(slot)

    # -- fork: see _SQLITE_STORES --------------------------------------------

    def _hold_for_fork(self, held: list[threading.Lock]) -> None:
        """Wait (boundedly) for this store's running statements and close its connections,
        holding their locks (and the lock on new ones) until the fork is done."""
        self._connections_lock.acquire()
        held.append(self._connections_lock)
        for slot in list(self._connections):
            # A statement waits at most `timeout` for a write lock, then fails.
            if slot.lock.acquire(timeout=self.timeout + 1.0):
                held.append(slot.lock)
                _close_connection(slot)
            else:
                log.warning("fork(): a statement on %s is still running after %.0fs; the child leaves "
                            "that connection alone", self.path, self.timeout + 1.0)

    def _forget_inherited(self) -> None:
        """In a forked child: connections still open (see _hold_for_fork) belong to the parent."""
        _INHERITED.extend(slot.conn for slot in self._connections if slot.conn is not None)
        self._local = threading.local()
        self._connections = weakref.WeakSet()
        self._connections_lock = threading.Lock()


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction, taken at once (so two processes never both read, then write)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


@functools.cache
def _boot_id() -> str | None:
    """This boot's id (Linux), or None where there is none or no CLOCK_BOOTTIME."""
    if _BOOTTIME is None:
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _fetch_one(cursor: sqlite3.Cursor) -> Any:
    return cursor.fetchone()


def _fetch_all(cursor: sqlite3.Cursor) -> list:
    return cursor.fetchall()


def _close_connection(slot: _Connection) -> None:
    conn, slot.conn = slot.conn, None
    if conn is not None:
        try:
            conn.close()
        except sqlite3.Error as e:
            log.warning("closing a ledger database connection: %s", e)


def _create_private_file(path: str) -> None:
    """Create an absent database file readable by its owner only (it holds every argument
    and result); SQLite gives its -wal and -shm files the database's mode. An existing
    file is left as it is."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        pass  # sqlite3.connect meets the same cause and reports it with advice


# What to do about an SQLite error, by its primary result code. Moving a database aside
# is advised only where it is the cure, and always with its price.
_FRESH_LEDGER = ("a new, empty ledger forgets every past call, so each of them runs again when next "
                 "called; keep the old file for inspection")
_SQLITE_ADVICE = {
    "SQLITE_READONLY": "The file or its folder is read-only for this process: make both writable (SQLite "
                       "also writes -wal and -shm files beside it), or open it with a user who may write",
    "SQLITE_PERM": "Permission denied: make the file and its folder readable and writable for this user",
    "SQLITE_CANTOPEN": "It cannot be opened: check that the path is a file (not a folder) and that the file and "
                       "its folder are readable and writable for this user",
    "SQLITE_IOERR": "The disk failed to read or write (full, removed, or a network filesystem, which SQLite "
                    "locking does not support): free space or move LEDGER_DB to a local disk, then try again",
    "SQLITE_FULL": "The disk is full: free space, then try again",
    "SQLITE_BUSY": "Another process holds a lock on it for longer than the timeout: find the process (a "
                   "long transaction, a stuck tool holding it open) or raise SQLiteStore(timeout=...)",
    "SQLITE_LOCKED": "It is locked by another connection in this process: close it, then try again",
    "SQLITE_NOTADB": f"The file is not an SQLite database: point LEDGER_DB at the ledger, or, if this file "
                     f"is a damaged ledger, move it aside to have a new one created ({_FRESH_LEDGER})",
    "SQLITE_CORRUPT": f"The database is damaged: try `sqlite3 {{path}} .recover`, restore a backup, or, as a last "
                      f"resort, move it aside to have a new one created ({_FRESH_LEDGER})",
}


def _sqlite_advice(path: str, error: sqlite3.Error) -> str:
    primary = "_".join((getattr(error, "sqlite_errorname", None) or "").split("_")[:2])  # SQLITE_IOERR_WRITE
    if primary in ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM"):
        # SQLite reports a read-only filesystem and a permission as "cannot open" too; tell them apart.
        for where in (path, os.path.dirname(os.path.abspath(path))):
            if os.path.exists(where) and not os.access(where, os.W_OK):
                return _unwritable_advice(where)
    return _SQLITE_ADVICE.get(primary, "Check the file, its folder and the disk it is on").format(path=path)


def _unwritable_advice(where: str) -> str:
    beside = "SQLite writes the database and its -wal and -shm files beside it"
    if os.statvfs(where).f_flag & os.ST_RDONLY:
        return (f"{where!r} is on a read-only filesystem ({beside}): remount it read-write, or point LEDGER_DB "
                f"at a writable disk")
    st = os.stat(where)
    return (f"{where!r} is not writable by this user (uid {os.geteuid()}; it belongs to uid {st.st_uid}, mode "
            f"{st.st_mode & 0o777:o}); {beside}: give this user write permission on the file and its folder, "
            f"or run as the user who owns them")


def _sqlite_type(field: str) -> str:
    kind = Record.__dataclass_fields__[field].type
    if "int" in kind:
        return "INTEGER"
    if "float" in kind:
        return "REAL"
    return "TEXT"


def _key_file(path: str) -> bytes:
    """Read the signing key beside the database, creating it (mode 0600) if absent."""
    for _ in range(50):
        try:
            with open(path, "rb") as f:
                key = f.read()
                mode = os.fstat(f.fileno()).st_mode
            if len(key) >= 32:
                if mode & 0o077:
                    log.warning("the signing key %s can be read by other users (mode %o): whoever reads it can "
                                "forge records; chmod 600 it", path, mode & 0o777)
                return key
        except FileNotFoundError:
            _create_key_file(path)
            continue
        except OSError as e:
            raise StoreError(f"cannot read the signing key {path!r}: {e}; "
                             f"fix its permissions or set LEDGER_SECRET") from None
        time.sleep(0.01)
    raise StoreError(f"the signing key {path!r} is too short; delete it to have a new one made, "
                     f"or set LEDGER_SECRET")


def _create_key_file(path: str) -> None:
    """Write a new key to a temporary file and link it into place, so that no reader
    ever sees a half-written key; on any failure (a full disk) nothing is left behind."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_hex(32).encode())
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: read theirs
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise StoreError(f"cannot create the signing key {path!r}: {e}. Free space on that disk or make the "
                         f"folder writable, or set LEDGER_SECRET (the same value on every worker)") from None


# ---------------------------------------------------------------------------
# ledger-once databases. A SQLite file ledger-once wrote is carried over in
# place: its calls keep blocking, under its names, until each is found by the
# call that made it (_Core.adopt) or an operator confirms or retries it.
# ---------------------------------------------------------------------------

# ledger-once (the package ledger.py replaces; its module is also `ledger` and its
# file also ./ledger.db) keeps calls in a table `ledger`, each under
# sha256(JSON of tool, normalized arguments or key=, workflow)[:32] with the tool
# named fn.__module__ + "." + fn.__name__. Its key= calls keep only that hash, so
# no record id of ours can be computed from its rows. The first guard to open such
# a file therefore copies its done and running calls into `records` under
# "lo:" + their id (its failed calls may run again, so they are left out), and a
# call that finds no record of its own looks for the one ledger-once would have
# given it and copies that under its own id (_Core.adopt).

LEGACY_PREFIX = "lo:"
LEGACY_OWNER = "ledger-once"                       # a carried-over record no operator has vouched for
LEGACY_CONFIRMED = "ledger-once:confirmed"         # `ledger migrate --confirm ID`: it is this function's
_LEDGER_ONCE_COLUMNS = ("id", "tool", "args", "wf", "created", "touched", "since", "status",
                        "attempts", "runs", "blocked", "result", "error")


def _holds_ledger_once(conn: sqlite3.Connection) -> bool:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
    return columns.issuperset(_LEDGER_ONCE_COLUMNS)


_SQL_LEDGER_ONCE_IMPORTED = "SELECT 1 FROM sqlite_master WHERE name = 'ledger_once_import'"


def _ledger_once_imported(conn: sqlite3.Connection) -> bool:
    return conn.execute(_SQL_LEDGER_ONCE_IMPORTED).fetchone() is not None


def _not_a_ledger(conn: sqlite3.Connection, path: str) -> str:
    if _holds_ledger_once(conn):
        return _migrate_hint(path)
    return f"{path} is not a ledger database (it has no ledger schema)"


def _migrate_hint(path: str) -> str:
    return (f"{path} holds calls recorded by ledger-once that ledger.py has not carried over yet; "
            f"run `ledger migrate {path}` (any guard opening the file does the same)")


def _carry_over_ledger_once(conn: sqlite3.Connection, path: str, create: bool,
                            clock: Callable[[], float]) -> bool:
    """Copy ledger-once's calls into `records`, once per file; whether the file holds any.

    Done in the open, inside one write transaction, so no tool runs before the
    records are there and two processes opening the file at once import them once.
    A read-only open (create=False) refuses instead, naming `ledger migrate`.
    `clock` is the store's lease clock (see SQLiteStore.now)."""
    if _holds_ledger_once(conn) and not _ledger_once_imported(conn):
        if not create:
            raise StoreError(_migrate_hint(path))
        conn.execute("BEGIN IMMEDIATE")
        try:
            count = 0
            if not _ledger_once_imported(conn):
                now = time.time()
                # Versions before 0.1.3 had no caller column.
                caller = "caller" if "caller" in {r[1] for r in conn.execute("PRAGMA table_info(ledger)")} else "NULL"
                rows = conn.execute(f"SELECT {', '.join(_LEDGER_ONCE_COLUMNS)}, {caller} FROM ledger "
                                    f"WHERE status IN ('success', 'running')").fetchall()
                records = [_ledger_once_record(row, now, clock()) for row in rows]
                conn.executemany(_SQL_INSERT, [_record_values(r) for r in records])
                conn.execute("CREATE TABLE ledger_once_import (imported REAL, calls INTEGER)")
                conn.execute("INSERT INTO ledger_once_import VALUES (?, ?)", (now, len(records)))
                count = len(records)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if count:
            log.warning("%s: carried over %d done or running calls recorded by ledger-once (its table "
                        "`ledger` is left as it was); they stay done", path, count)
    hit = conn.execute("SELECT 1 FROM records WHERE id >= ? AND id < ? LIMIT 1", (LEGACY_PREFIX, "lo;"))
    return hit.fetchone() is not None


def _ledger_once_record(row: tuple, now: float, clock: float) -> Record:
    """One ledger-once row as a record of ours, under its own id ("lo:" + ledger-once's).

    `now` is the wall clock and `clock` the store's lease clock, read together: ledger-once's
    wall times are kept as they are, and moved onto the lease clock for `lease_until`.
    A running call stays RUNNING with its lease already expired, and is never taken
    over on its own (see _Core.settle): ledger.py cannot know whether it took effect.
    A done call's `lease_until` is its last touch, where its ttl window starts (see _Core.adopt)."""
    id, tool, args, wf, created, touched, since, status, attempts, runs, blocked, result, error, caller = row
    created_at = _iso_seconds(created) or now
    updated_at = _iso_seconds(touched) or created_at
    running, runs = status == "running", runs or 0
    on_clock = clock - now
    if running:
        lease_until = min((_iso_seconds(since) or updated_at) + on_clock, clock)
    else:
        lease_until = updated_at + on_clock
    return Record(
        id=LEGACY_PREFIX + id, tool=tool, workflow=wf, caller=caller,
        status=(Status.RUNNING if running else Status.SUCCESS).value, owner=LEGACY_OWNER, epoch=1,
        lease_until=lease_until,
        run_key=LEGACY_PREFIX + id, runs=runs if running else max(runs, 1), created=created_at,
        updated=updated_at, started=_iso_seconds(since), attempts=attempts or 0, executed=runs + running,
        blocked=blocked or 0, result=result, error=error, args=args)


def _iso_seconds(text: str | None) -> float | None:
    if not text:
        return None
    moment = _dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def _ledger_once_id(call: _Call) -> str | None:
    """The id ledger-once gave this call (prefixed), or None if it could not have recorded it."""
    fn, kwargs, key = call.fn, call.kwargs, call.key
    if key is None and "key" in call.info.name_set and "key" in kwargs:  # ledger-once took key= from every tool
        kwargs = dict(kwargs)
        key = kwargs.pop("key")
    try:
        tool = fn.__module__ + "." + fn.__name__
        if key is not None:
            payload = {"t": tool, "k": key, "w": call.workflow}
        else:
            payload = {"t": tool, "a": _ledger_once_norm(_ledger_once_bind(call.info, call.args, kwargs)),
                       "w": call.workflow}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    except Exception:  # no name, or arguments its JSON could not hold: it never recorded such a call
        return None
    return LEGACY_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:32]


def _ledger_once_bind(info: _ToolInfo, args: tuple, kwargs: dict) -> dict:
    """Arguments by name with defaults, as ledger-once bound them, falling back as it did."""
    try:
        if info.signature is None:
            raise TypeError
        bound = info.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    except TypeError:
        return {**kwargs, "_": list(args)} if args else dict(kwargs)


def _ledger_once_norm(value: Any) -> Any:
    """ledger-once's normal form: sorted dicts, lists for tuples, floats to 8 places, str() for the rest."""
    if isinstance(value, dict):
        return {k: _ledger_once_norm(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_ledger_once_norm(v) for v in value]
    if isinstance(value, float):
        return round(value, 8)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _shared_name(fn: Callable) -> bool:
    """Whether ledger-once's name for fn (module.__name__) also names other functions:
    methods, nested functions and lambdas."""
    name = getattr(fn, "__name__", "")
    return getattr(fn, "__qualname__", name) != name or name.startswith("<")


# ---------------------------------------------------------------------------
# Command line: `python ledger.py COMMAND` (and the `ledger` console script).
# Reports go to stdout, since there they are the program's output; diagnostics
# go to stderr. Every command but `demo` opens only an existing database, and
# only `clear`, `prune`, `retry`, `resolve` and `check` (on scratch records of its own) write to it.
# Exit codes: 0 ok, 1 a check failed or a confirmation was declined, 2 usage error.
# ---------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEMO_LEASE = 1.0
_STATE_STYLE = {Status.RUNNING.value: "blue", STALE: "yellow", Status.SUCCESS.value: "green",
                Status.FAILED.value: "red", Status.UNKNOWN.value: "magenta"}
# Tool arguments, errors and names are untrusted: no control character of theirs reaches the terminal.
_CONTROL = {**dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)], "\ufffd"), **dict.fromkeys(map(ord, "\t\n\r"), " ")}
_CSV_CONTROL = {**_CONTROL, ord("\n"): "\n"}
_C1_ESCAPES = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}  # JSON escapes of what JSON leaves raw


def main(argv: list[str] | None = None) -> int:
    """The `ledger` command. Returns its exit code: 0 ok, 1 a check failed, 2 usage error."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse exits 2 on a usage error and 0 after --help
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`ledger show | head`); stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (LedgerError, OSError) as e:
        print(f"ledger: {_clean(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _parser() -> Any:
    import argparse
    db = argparse.ArgumentParser(add_help=False)
    # SUPPRESS lets --db go before or after the command without one erasing the other.
    db.add_argument("--db", default=argparse.SUPPRESS, metavar="PATH_OR_URL",
                    help="the ledger database, a SQLite path or URL (default: $LEDGER_DB or ./ledger.db)")
    wf = argparse.ArgumentParser(add_help=False)
    wf.add_argument("--wf", metavar="WORKFLOW", help="only the records of this workflow")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of text")
    # ledger-once's commands took the database as their first argument: `ledger show ledger.db`.
    path = argparse.ArgumentParser(add_help=False)
    path.add_argument("database", nargs="?", metavar="DATABASE", help="the ledger database, as --db")

    parser = argparse.ArgumentParser(prog="ledger", parents=[db],
                                     description="Exactly-once and singleflight for AI-agent tool calls: "
                                                 "inspect and operate a ledger.")
    parser.add_argument("--version", action="version", version=f"ledger.py {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[Any], int], help: str, *parents: Any) -> Any:
        p = sub.add_parser(name, parents=[db, *parents], help=help, description=help)
        p.set_defaults(run=run)
        return p

    command("demo", _cmd_demo, "show retries blocked, parallel lookups shared and a crash recovered, on a "
            "temporary database (or --db PATH, kept)")
    p = command("show", _cmd_show, "the calls in the ledger, as a table", wf, as_json, path)
    p.add_argument("--tool", help="only the calls of this tool")
    p.add_argument("--status", type=str.upper, choices=STATES, help="only the calls in this state")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="only the N most recent calls")
    p = command("tail", _cmd_tail, "follow new activity as it happens, until Ctrl-C", wf, as_json, path)
    p.add_argument("--last", type=int, default=10, metavar="N", help="first show the N latest calls (default 10)")
    p.add_argument("--interval", type=_positive_float, default=0.5, metavar="SECONDS",
                   help="how often to look (default 0.5)")
    command("stats", _cmd_stats, "totals and the duplicate rate", wf, as_json, path)
    command("savings", _cmd_savings, "runs avoided, money and time saved, per tool", wf, as_json, path)
    p = command("clear", _cmd_clear, "delete the records (of one workflow); asks first", wf, path)
    p.add_argument("--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    p = command("prune", _cmd_prune, "delete the records of calls that finished before a time, and of "
                "ttl'd calls whose window ended (never a running call's); a pruned call runs again if called "
                "again", wf, as_json, path)
    p.add_argument("--older-than", required=True, type=_duration, metavar="DURATION",
                   help="finished more than this long ago: 30d, 12h, 90m, 45s, 2w or seconds")
    p.add_argument("--status", type=str.upper, choices=PRUNABLE, action="append",
                   help="only the calls in this state (repeat for both; default both)")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    p = command("retry", _cmd_retry, "let one call run again: for a call left blocked by recover='block' "
                "or a stale lease (same key), or a succeeded one (a new key)")
    p.add_argument("id", metavar="ID", help="the record's id, or a unique prefix of it (see `ledger show`)")
    p.add_argument("--force", action="store_true", help="release it even while its worker holds a live lease "
                   "(only when that worker is known to be gone: otherwise two runs overlap)")
    p = command("resolve", _cmd_resolve, "settle a call whose outcome is UNKNOWN, once you have checked "
                "(by its key) whether it took effect: --done (duplicates get --result) or --not-done (it runs "
                "again, same key)")
    p.add_argument("id", metavar="ID", help="the record's id, or a unique prefix of it (see `ledger show`)")
    answer = p.add_mutually_exclusive_group(required=True)
    answer.add_argument("--done", action="store_true", help="it took effect: record it as SUCCESS")
    answer.add_argument("--not-done", action="store_true", help="it did not: its next call runs again")
    p.add_argument("--result", type=json.loads, default=None, metavar="JSON",
                   help="with --done: what the call returned, as JSON (what duplicates replay; default null)")
    p = command("export", _cmd_export, "every record, as JSON lines or CSV", wf, path)
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="default: jsonl")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    command("check", _cmd_check, "check the database against the store contract, on scratch records "
            "of its own (existing records are not touched)", as_json)
    p = command("migrate", _cmd_migrate, "carry over the calls ledger-once recorded in a SQLite file (a guard "
                "opening the file does it too), and report them", path)
    p.add_argument("--confirm", metavar="ID", help="vouch that the carried-over record ID (or a unique prefix) "
                   "is the call of the function now asking for it (see AmbiguousRecordError)")
    p = command("serve", _cmd_serve, "a live dashboard in the browser (read-only)", wf, path)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                   "only)")
    p.add_argument("--port", type=_port, default=4242, help="default 4242; 0 picks a free port")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' or plain seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:].lower() in _DURATION_UNITS else (text, "s")
    value = float(number) * _DURATION_UNITS[unit.lower()]
    if not 0 <= value < math.inf:
        raise ValueError(text)
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


# -- shared by the commands ---------------------------------------------------

class _Paint:
    """ANSI colours: only on a terminal, never with NO_COLOR set or TERM=dumb."""

    CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35"}

    def __init__(self, stream: Any):
        isatty = getattr(stream, "isatty", None)
        self.on = (bool(isatty and isatty()) and not os.environ.get("NO_COLOR")
                   and os.environ.get("TERM") != "dumb")

    def __call__(self, style: str | None, text: str) -> str:
        if not (self.on and style and text):
            return text
        return f"\x1b[{self.CODES[style]}m{text}\x1b[0m"


def _width() -> int:
    import shutil
    return max(shutil.get_terminal_size((80, 24)).columns, 40)


def _clean(value: Any) -> str:
    return "" if value is None else str(value).translate(_CONTROL)


def _fit(text: str, width: int, keep_end: bool = False) -> str:
    """`text` cut to `width` characters, marking the cut with an ellipsis."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    return "…" + text[len(text) - width + 1:] if keep_end else text[:width - 1] + "…"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def _money(x: float) -> str:
    return f"${x:,.2f}" if x >= 0.01 or x == 0 else f"${x:.2g}"


def _percent(fraction: float) -> str:
    return f"{fraction:.0%}"


def _clock(t: float) -> str:
    """A time of day on this machine's clock."""
    return time.strftime("%H:%M:%S", time.localtime(t))


def _when(t: float) -> str:
    """A date and time on this machine's clock."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _bar(fraction: float, width: int, track: bool = True) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    if not filled and fraction > 0:
        return "▏"
    return "█" * filled + ("░" * (width - filled) if track else "")


def _table(headers: list[str], rows: list[list[str]], paint: _Paint, *, right: Iterable[int] = (),
           keep_end: Iterable[int] = (), narrow: Iterable[int] = (),
           styles: list[list[str | None]] | None = None) -> list[str]:
    """Rows under headers in columns, the last one taking what the terminal's width leaves;
    the `narrow` columns give up width first when a row would not fit."""
    right, keep_end, narrow = set(right), set(keep_end), set(narrow)
    width = _width()
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    room = width - 2 * (len(headers) - 1) - 12  # the last column keeps at least 12 characters
    while narrow and sum(widths[:-1]) > room:
        i = max(narrow, key=lambda i: widths[i])
        if widths[i] <= max(len(headers[i]), 8):
            break
        widths[i] -= 1
    widths[-1] = max(12, min(widths[-1], width - sum(widths[:-1]) - 2 * (len(headers) - 1)))

    def line(cells: list[str], cell_styles: list[str | None]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            text = _fit(cell, widths[i], keep_end=i in keep_end)
            if i < len(cells) - 1:
                text = text.rjust(widths[i]) if i in right else text.ljust(widths[i])
            parts.append(paint(cell_styles[i], text))
        return "  ".join(parts).rstrip()

    lines = [line(headers, ["bold"] * len(headers))]
    for n, row in enumerate(rows):
        lines.append(line(row, styles[n] if styles else [None] * len(row)))
    return lines


def _db_spec(args: Any) -> str:
    return (getattr(args, "db", None) or getattr(args, "database", None) or os.environ.get("LEDGER_DB")
            or "ledger.db")


@contextlib.contextmanager
def _opened(args: Any) -> Iterator[Guard]:
    """A guard on the existing database named by --db; never creates one."""
    guard = Guard(open_store(_db_spec(args), create=False), quiet=True)
    try:
        yield guard
    finally:
        guard.close()


def _snapshot(guard: Guard, wf: str | None = None, tool: str | None = None) -> list[Record]:
    return [Record(**row) for row in guard.history(tool, wf)]


def _state(record: Record, now: float) -> str:
    return STALE if record.stale(now) else record.status


def _record_json(record: Record, now: float) -> dict[str, Any]:
    return {**record.as_dict(), "state": _state(record, now)}


def _json_text(value: Any, indent: int | None = None) -> str:
    """JSON for stdout, lossless and safe on a terminal: JSON escapes C0 controls, and
    the C1 controls it leaves raw (some terminals obey them) are escaped here."""
    return json.dumps(value, indent=indent, ensure_ascii=False).translate(_C1_ESCAPES)


def _print_json(value: Any) -> int:
    print(_json_text(value, indent=2))
    return EXIT_OK


def _scope(wf: str | None) -> str:
    return f"workflow {wf!r}" if wf else "all workflows"


# -- show, stats, savings -------------------------------------------------------

def _cmd_show(args: Any) -> int:
    with _opened(args) as guard:
        records = _snapshot(guard, args.wf, args.tool)
        now = guard.store.now()
    if args.status:
        records = [r for r in records if _state(r, now) == args.status]
    if args.limit:
        records = records[-args.limit:]
    if args.json:
        return _print_json([_record_json(r, now) for r in records])
    if not records:
        print(f"no calls match ({_scope(args.wf)})" if args.tool or args.status
              else f"no calls recorded ({_scope(args.wf)})")
        return EXIT_OK
    paint = _Paint(sys.stdout)
    with_workflow = len({r.workflow for r in records}) > 1
    with_caller = any(r.caller for r in records)
    headers = ["ID", "STATUS", "TOOL"] + ["WORKFLOW"] * with_workflow + ["CALLER"] * with_caller + \
              ["RAN", "BLK", "TIME", "ARGS / ERROR"]
    rows, styles = [], []
    for r in records:
        state = _state(r, now)
        detail = r.error if r.status in (Status.FAILED, Status.UNKNOWN) else r.args
        rows.append([r.id[:8], state, _clean(r.tool)] + [_clean(r.workflow)] * with_workflow
                    + [_clean(r.caller or "-")] * with_caller
                    + [str(r.executed), str(r.blocked), _seconds(r.duration), _clean(detail)])
        styles.append(["dim", _STATE_STYLE[state]] + [None] * (len(headers) - 3)
                      + ["red" if r.status in (Status.FAILED, Status.UNKNOWN) else None])
    numbers = range(len(headers) - 4, len(headers) - 1)
    print("\n".join(_table(headers, rows, paint, right=numbers, keep_end=[2], narrow=range(2, len(headers) - 4),
                           styles=styles)))
    return EXIT_OK


def _cmd_stats(args: Any) -> int:
    with _opened(args) as guard:
        stats, url = guard.stats(args.wf), guard.store.url
    if args.json:
        return _print_json(stats)
    paint = _Paint(sys.stdout)
    bar = _bar(stats["duplicate_rate"], min(32, _width() - 48))
    print(f"{paint('bold', 'ledger')} {_fit(url, _width() - 30, keep_end=True)}  ({_scope(args.wf)})")
    print(f"records     {stats['actions']:<6} running {stats['running']}   "
          f"{paint('yellow' if stats['stale'] else None, 'stale %d' % stats['stale'])}   "
          f"{paint('red' if stats['failed'] else None, 'failed %d' % stats['failed'])}")
    print(f"calls       {stats['attempts']:<6} ran {stats['executed']}   blocked {stats['blocked']}")
    print(f"duplicates  {paint('green', bar)} {_percent(stats['duplicate_rate'])} of calls did not run again")
    print(f"saved       {_money(stats['saved_usd'])} and {_seconds(stats['saved_seconds'])} of tool time")
    return EXIT_OK


def _cmd_savings(args: Any) -> int:
    with _opened(args) as guard:
        records, now = _snapshot(guard, args.wf), guard.store.now()
    if args.json:
        return _print_json({"totals": _totals(records, now),
                            "tools": {tool: _totals(rows, now) for tool, rows in _by_tool(records).items()}})
    print("\n".join(_savings_report(records, _Paint(sys.stdout))))
    return EXIT_OK


def _savings_report(records: list[Record], paint: _Paint) -> list[str]:
    """Runs avoided, money and time saved, per tool, with a bar chart."""
    total = _totals(records)
    lines = [f"{paint('bold', 'Savings')}: {total['blocked']} of {total['attempts']} calls were duplicates "
             f"and did not run ({_percent(total['duplicate_rate'])})",
             f"saved {paint('green', _money(total['saved_usd']))} and "
             f"{paint('green', _seconds(total['saved_seconds']))} of tool time"]
    if not records:
        return lines
    tools = {tool: (_totals(rows), any(r.cost is not None for r in rows)) for tool, rows in _by_tool(records).items()}
    metric, label = next(((m, l) for m, l in (("saved_usd", "money saved"), ("saved_seconds", "time saved"))
                          if total[m] > 0), ("blocked", "runs avoided"))
    top = max(t[metric] for t, _ in tools.values()) or 1
    order = sorted(tools.items(), key=lambda item: (-item[1][0][metric], -item[1][0]["blocked"], item[0]))
    rows = [[_clean(tool), str(t["blocked"]), _money(t["saved_usd"]) if priced else "-",
             _seconds(t["saved_seconds"]), ""] for tool, (t, priced) in order]
    table = _table(["TOOL", "AVOIDED", "MONEY", "TIME", ""], rows, paint, right=(1, 2, 3), keep_end=[0],
                   narrow=[0])
    bar_width = max(8, min(32, _width() - len(table[1]) - 2))  # rows carry no colour codes
    lines += [""] + table[:1]
    for (tool, (t, _)), row in zip(order, table[1:]):
        lines.append((row + "  " + paint("green", _bar(t[metric] / top, bar_width, track=False))).rstrip())
    lines.append(paint("dim", f"bars: {label}"))
    if not any(priced for _, priced in tools.values()):
        lines.append(paint("dim", "set cost= in a tool's policy to count money saved, "
                                  "e.g. guard.policy(\"web_search\", cost=0.02)"))
    return lines


# -- clear, retry, export, check ------------------------------------------------

def _cmd_clear(args: Any) -> int:
    with _opened(args) as guard:
        count = len(_snapshot(guard, args.wf))
        if not count:
            print(f"nothing to clear ({_scope(args.wf)})")
            return EXIT_OK
        if not args.yes:
            if sys.stdin is None or not sys.stdin.isatty():
                raise LedgerError(f"refusing to delete {count} records ({_scope(args.wf)}) unasked: stdin is "
                                  f"not a terminal; pass --yes to clear without confirmation")
            sys.stderr.write(f"Delete {count} records ({_scope(args.wf)}) from {guard.store.url}? [y/N] ")
            sys.stderr.flush()
            if sys.stdin.readline().strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=sys.stderr)
                return EXIT_FAILED
        deleted = guard.reset(args.wf)
    print(f"deleted {deleted} records ({_scope(args.wf)})")
    return EXIT_OK


def _cmd_prune(args: Any) -> int:
    with _opened(args) as guard:
        report = guard.prune(args.older_than, status=args.status, wf=args.wf, dry_run=args.dry_run)
        url = guard.store.url
    if args.json:
        return _print_json(report)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {report['removed']:,} records ({_scope(args.wf)}) from {_clean(url)}")
    if report["counts"]:
        rows = [[row["status"], f"{row['count']:,}", _clean(row["tool"])] for row in report["counts"]]
        for line in _table(["status", "records", "tool"], rows, _Paint(sys.stdout), right=[1]):
            print("  " + line)
    return EXIT_OK


def _cmd_retry(args: Any) -> int:
    with _opened(args) as guard:
        record = _find_record(guard, args.id)
        state = _state(record, guard.store.now())
        if guard.retry_id(record.id, force=args.force):
            print(f"released {record.id} ({_clean(record.tool)}, was {state}): its next call runs again")
        else:
            print(f"{record.id} ({_clean(record.tool)}) is FAILED already, nothing to release: "
                  f"its next call runs again")
    return EXIT_OK


def _cmd_resolve(args: Any) -> int:
    if args.not_done and args.result is not None:
        raise ConfigError("--result goes with --done: it is what the call that took effect returned")
    with _opened(args) as guard:
        record = _find_record(guard, args.id)
        if not guard.resolve(record.id, done=args.done, result=args.result):
            record, now = guard.store.get(record.id), guard.store.now()
            print(f"{args.id} is not UNKNOWN (it is {_state(record, now) if record else 'gone'}): nothing to "
                  f"resolve", file=sys.stderr)
            return EXIT_FAILED
    outcome = "SUCCESS: duplicates get its result" if args.done else "FAILED: its next call runs again, same key"
    print(f"resolved {record.id} ({_clean(record.tool)}) as {outcome}")
    return EXIT_OK


def _find_record(guard: Guard, prefix: str) -> Record:
    record = guard.store.get(prefix)
    if record is not None:
        return record
    if len(prefix) < 4:
        raise LedgerError(f"give at least 4 characters of the record id, not {prefix!r} (see `ledger show`)")
    matches = [r for r in _snapshot(guard) if r.id.startswith(prefix)]
    if not matches:
        raise LedgerError(f"no record with id {prefix!r}; `ledger show` lists them")
    if len(matches) > 1:
        raise LedgerError(f"{len(matches)} records have ids starting with {prefix!r}; give more characters")
    return matches[0]


def _cmd_export(args: Any) -> int:
    import csv
    with _opened(args) as guard:
        rows = guard.history(wf=args.wf)
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.format == "csv":  # an empty cell is a missing value
            writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
        else:
            for row in rows:
                out.write(_json_text(row) + "\n")
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"wrote {len(rows)} records to {args.output}", file=sys.stderr)
    return EXIT_OK


# A spreadsheet runs a cell that starts with one of these as a formula; a leading
# apostrophe makes it text (and is shown by no spreadsheet). Numbers stay numbers. A
# leading tab or CR, the other classic trigger, has become a space by then.
_FORMULA_STARTS = ("=", "+", "-", "@")


def _csv_cell(value: Any) -> Any:
    """A CSV cell safe to open in a spreadsheet or print on a terminal: text starting
    like a formula gets a leading apostrophe, and control characters (other than a
    newline, which CSV quotes) become U+FFFD; use jsonl for a lossless export."""
    if not isinstance(value, str):
        return value
    text = value.translate(_CSV_CONTROL)
    return "'" + text if text.lstrip(" ").startswith(_FORMULA_STARTS) else text


def _cmd_check(args: Any) -> int:
    with _opened(args) as guard:
        store = guard.store
        try:
            check_store(store)
            failure = None
        except (AssertionError, StoreError) as e:
            failure = str(e)
    if args.json:
        _print_json({"ok": failure is None, "store": store.url, "failure": failure})
    elif failure:
        print(f"{_Paint(sys.stdout)('red', 'FAILED')} {store.url}: {_clean(failure)}")
    else:
        print(f"{_Paint(sys.stdout)('green', 'ok')} {store.url} keeps the store contract")
        print("   (checked on scratch records of its own; existing records untouched)")
    return EXIT_OK if failure is None else EXIT_FAILED


def _cmd_migrate(args: Any) -> int:
    spec = _db_spec(args)
    if "://" in spec or spec == ":memory:" or not os.path.isfile(spec):
        raise LedgerError(f"no SQLite file at {spec}: ledger-once kept its calls in one (by default ./ledger.db)")
    store = SQLiteStore(spec)  # opening it carries the calls over
    try:
        if store._run(_SQL_LEDGER_ONCE_IMPORTED, (), _fetch_one) is None:
            print(f"{spec} holds no table of ledger-once's; nothing to carry over")
            return EXIT_OK
        if args.confirm:
            return _confirm_legacy(store, args.confirm)
        imported, calls = store._run("SELECT imported, calls FROM ledger_once_import", (), _fetch_one)
        kept = sum(r.id.startswith(LEGACY_PREFIX) for r in store.records())
        when = _dt.datetime.fromtimestamp(imported).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{calls} calls recorded by ledger-once were carried over on {when} (done ones stay done, "
              f"running ones stay blocked until `ledger retry ID`, failed ones may run again)")
        print(f"{kept} of them are in the ledger under ids starting with {LEGACY_PREFIX}; a call with the same "
              f"function, arguments (or key=) and workflow finds its record there")
    finally:
        store.close()
    return EXIT_OK


def _confirm_legacy(store: SQLiteStore, prefix: str) -> int:
    guard = Guard(store, quiet=True)
    record = _find_record(guard, prefix if prefix.startswith(LEGACY_PREFIX) else LEGACY_PREFIX + prefix)
    if record.owner != LEGACY_OWNER:
        raise LedgerError(f"{record.id} is not a carried-over record awaiting confirmation")
    if not store.swap(record.evolve(owner=LEGACY_CONFIRMED), record.epoch, record.owner):
        raise LedgerError(f"{record.id} changed while confirming it; run the command again")
    print(f"confirmed {record.id} ({_clean(record.tool)}): the next call that matches it is a duplicate")
    return EXIT_OK


# -- tail -------------------------------------------------------------------------

_EVENTS = {Status.RUNNING.value: "started", STALE: "stale", Status.SUCCESS.value: "ran",
           Status.FAILED.value: "failed", Status.UNKNOWN.value: "unknown"}


def _cmd_tail(args: Any) -> int:
    paint = _Paint(sys.stdout)
    with _opened(args) as guard:
        print(f"following {guard.store.url} ({_scope(args.wf)}); Ctrl-C to stop", file=sys.stderr)
        seen: dict[str, tuple] = {}
        first = True
        try:
            while True:
                now = guard.store.now()
                events, removed = _changes(seen, _snapshot(guard, args.wf), now)
                if first:  # of what was there before, only the latest few
                    events, removed, first = events[-args.last:] if args.last > 0 else [], 0, False
                for event, record, detail in events:
                    if args.json:
                        print(_json_text({"event": event, "detail": detail, "record": _record_json(record, now)}))
                    else:
                        print(_tail_line(event, record, detail, paint))
                if removed:
                    print(json.dumps({"event": "removed", "count": removed}) if args.json
                          else f"{time.strftime('%H:%M:%S')}  {removed} records removed")
                sys.stdout.flush()
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return EXIT_OK


def _changes(seen: dict[str, tuple], records: list[Record], now: float) -> tuple[list, int]:
    """What happened since `seen` (which is updated): (event, record, detail) oldest first, and
    how many records went away."""
    events = []
    current = {}
    for r in records:
        state = _state(r, now)
        mark = current[r.id] = (state, r.epoch, r.executed, r.blocked)
        old = seen.get(r.id)
        if old is None or old[:3] != mark[:3]:
            events.append((_EVENTS[state], r, _tail_detail(state, r, now)))
        if old is not None and r.blocked > old[3]:
            events.append(("blocked", r, f"+{r.blocked - old[3]} duplicate(s), {r.blocked} in all"))
    removed = len(seen.keys() - current.keys())
    seen.clear()
    seen.update(current)
    events.sort(key=lambda e: e[1].updated)
    return events, removed


def _tail_detail(state: str, r: Record, now: float) -> str:
    if state in (Status.FAILED, Status.UNKNOWN):
        return _clean(r.error)
    if state == Status.SUCCESS:
        return f"in {_seconds(r.duration)}  {_clean(r.args)}"
    if state == STALE:
        return f"lease ran out {_seconds(now - r.lease_until)} ago  {_clean(r.args)}"
    return f"by {_clean(r.caller)}  {_clean(r.args)}" if r.caller else _clean(r.args)


def _tail_line(event: str, r: Record, detail: str, paint: _Paint) -> str:
    style = {"ran": "green", "failed": "red", "stale": "yellow", "started": "blue", "blocked": "dim",
             "unknown": "magenta"}[event]
    head = (f"{_clock(r.updated)}  {paint(style, event.ljust(7))}  "
            f"{_fit(_clean(r.tool), 20, keep_end=True):<20}  {_fit(_clean(r.workflow), 12):<12}  ")
    return head + _fit(detail, max(16, _width() - 55))


# -- serve ------------------------------------------------------------------------

def _cmd_serve(args: Any) -> int:
    # The dashboard's server and page live in ledger_dashboard.py: this file holds no HTML,
    # CSS or JavaScript, and a user who never serves a dashboard need not copy it.
    return _companion("ledger_dashboard", "the dashboard (ledger serve)").serve(args)


# -- demo ---------------------------------------------------------------------------

def _cmd_demo(args: Any) -> int:
    import tempfile
    began = time.perf_counter()
    paint = _Paint(sys.stdout)
    with tempfile.TemporaryDirectory(prefix="ledger-demo-") as folder:
        path = getattr(args, "db", None) or os.path.join(folder, "demo.db")
        workflow = time.strftime("demo-%H%M%S")
        demo = Guard(path, workflow=workflow, quiet=True)
        try:
            where = f"the ledger {path}" if getattr(args, "db", None) else "a temporary ledger"
            print(f"{paint('bold', 'ledger.py demo')}: three things an agent's tools need, on {where}")
            _demo_payment(demo, paint)
            _demo_shared_lookup(demo, paint)
            _demo_crash(demo, path, workflow, paint)
            print()
            print("\n".join(_savings_report(_snapshot(demo, workflow), paint)))
        finally:
            demo.close()
    print(paint("dim", f"\ndemo finished in {time.perf_counter() - began:.1f}s. To look around afterwards, keep "
                       f"its ledger:\n  python ledger.py demo --db demo.db && python ledger.py serve --db demo.db"))
    return EXIT_OK


def _heading(paint: _Paint, number: int, text: str) -> None:
    print(f"\n{paint('bold', f'{number}. {text}')}")


def _demo_payment(demo: Guard, paint: _Paint) -> None:
    charged: list[float] = []

    def charge_card(order_id: int, amount: float) -> dict:
        charged.append(amount)
        return {"order_id": order_id, "charged": amount}

    pay = demo.wrap_tools({"charge_card": charge_card})["charge_card"]
    _heading(paint, 1, "Retries of a payment are blocked")
    print("   The agent's HTTP call timed out, so it sent the same payment three times:")
    print("   charge_card(order_id=1042, amount=99.0)")
    for attempt in (1, 2, 3):
        value = pay(order_id=1042, amount=99.0)
        shown = (paint("yellow", "BLOCKED: it already ran, the card is not charged again") if value is BLOCKED
                 else paint("green", f"ran: charged ${value['charged']:.2f}"))
        print(f"   attempt {attempt}  {shown}")
    times = "once" if len(charged) == 1 else f"{len(charged)} times"
    print(f"   -> the card was charged {times} for 3 attempts")


def _demo_shared_lookup(demo: Guard, paint: _Paint) -> None:
    runs: list[str] = []

    def web_search(query: str) -> list[str]:
        runs.append(query)
        time.sleep(0.4)  # a slow, paid lookup
        return [f"{query}: fare {n}" for n in (412, 437, 451)]

    demo.policy("web_search", replay=True, ttl=300, cost=0.05)
    search = demo.wrap_tools({"web_search": web_search})["web_search"]
    agents = 8
    results: list[Any] = [None] * agents
    barrier = threading.Barrier(agents)

    def agent(n: int) -> None:
        barrier.wait()
        with demo.as_caller(f"agent-{n + 1}"):
            results[n] = search(query="flights PAR-NYC Dec 1")

    _heading(paint, 2, "Parallel agents' identical lookups run once")
    print(f"   {agents} agents call web_search(query=\"flights PAR-NYC Dec 1\") at the same moment;")
    print("   its policy is replay=True, ttl=300, cost=0.05 ($ per run).")
    threads = [threading.Thread(target=agent, args=(n,)) for n in range(agents)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    served = sum(1 for r in results if r is not None and r == results[0])
    times = "once" if len(runs) == 1 else f"{len(runs)} times"
    print(f"   -> web_search ran {times}, in {elapsed:.1f}s; "
          f"{paint('green', f'{served} of {agents} agents')} got its {len(results[0] or [])} results")


def _demo_crash(demo: Guard, path: str, workflow: str, paint: _Paint) -> None:
    import subprocess
    keys: list[str] = []

    def send_invoice(order_id: int) -> str:
        keys.append(current_key())
        return f"invoice for order {order_id} sent"

    demo.policy("send_invoice", lease=DEMO_LEASE)
    invoice = demo.wrap_tools({"send_invoice": send_invoice})["send_invoice"]
    _heading(paint, 3, "A crashed worker's call is taken over")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ledger; "
            "ledger._demo_doomed_worker(sys.argv[2], sys.argv[3])")
    worker = subprocess.Popen([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), path,
                               workflow], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        key = worker.stdout.readline().strip()
        if not key:
            raise LedgerError("the demo's worker process exited before it started its call")
        print(f"   worker {worker.pid} runs send_invoice(order_id=1042), idempotency key {key[:8]}…")
        worker.kill()
        worker.wait()
        print(f"   kill -9 {worker.pid}: the worker dies mid-call; its record still says RUNNING")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        worker.stdin.close()
        worker.stdout.close()
    first = invoice(order_id=1042)
    record = _snapshot(demo, workflow, "send_invoice")[0]
    print(f"   retry at once      {paint('yellow', repr(first))}: the worker may be alive, its lease runs "
          f"{max(0.0, record.lease_until - demo.store.now()):.1f}s more")
    while not record.stale(demo.store.now()):
        time.sleep(max(0.02, record.lease_until - demo.store.now()))
        record = _snapshot(demo, workflow, "send_invoice")[0]
    second = invoice(order_id=1042)
    same = "the same key" if keys and keys[0] == key else "a NEW key"
    print(f"   retry after lease  {paint('green', 'ran: ' + repr(second))}")
    print(f"   -> taken over under {same}, {(keys or ['?'])[0][:8]}…, so the mail API can")
    print("      drop a send that the dead worker might have made before it died")


def _demo_doomed_worker(path: str, workflow: str) -> None:
    """The demo's worker process: claims send_invoice, tells its key, then hangs until killed."""
    worker = Guard(path, workflow=workflow, quiet=True)
    worker.policy("send_invoice", lease=DEMO_LEASE)

    def send_invoice(order_id: int) -> str:
        print(current_key(), flush=True)
        sys.stdin.read()  # the demo kills this process here; if the demo itself died, EOF ends it
        os._exit(1)

    worker.wrap_tools({"send_invoice": send_invoice})["send_invoice"](order_id=1042)


if __name__ == "__main__":
    sys.exit(main())
