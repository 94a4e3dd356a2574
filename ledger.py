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
``redis://...``, with ``LEDGER_SECRET`` set). Inside a running
tool, ``current_key()`` is a stable idempotency key to hand to the downstream
API, which is what makes a crash between the side effect and the record
harmless.

The file reads top to bottom in the order a call flows through it:
normalize -> fingerprint -> records and states -> stores -> engine ->
public Guard -> command line.
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
import typing
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Annotated, Any

__all__ = [
    "guard", "Guard", "Store", "MemoryStore", "SQLiteStore", "PostgresStore", "RedisStore", "Record", "Status",
    "Policy", "Outcome", "BLOCKED", "BLOCKED_MESSAGE", "Ignore", "Identity", "current_key", "check_store", "main",
    "LedgerError", "FingerprintError", "KeyReuseError", "IntegrityError",
    "StoreError", "CompletionError", "WaitTimeout", "LeaderFailed", "ConfigError",
]
__version__ = "0.1.0"

log = logging.getLogger("ledger")


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


class KeyReuseError(LedgerError):
    """The same idempotency key came back with different validated arguments."""


class IntegrityError(LedgerError):
    """A stored record failed HMAC verification; it is neither replayed nor re-run."""


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


# ---------------------------------------------------------------------------
# Normalize: turn argument values into a canonical JSON structure, so that
# equal calls encode to equal bytes in every process. Special values become
# ["\x00tag", payload] lists; user strings that start with "\x00" are escaped
# with a second one, so no user value can imitate a tag.
#
# Floats are rounded to 10 significant digits (format(x, ".10g")); a float
# that is then integral becomes an int (99.0 == 99, -0.0 == 0); NaN and the
# infinities get tags. Use Decimal or integer cents where 10 digits are not enough.
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
            # here instead of calling canonical() is a third of a fingerprint's cost.
            t = type(item)
            out.append(item if t is int or (t is str and item[:1] != _TAG) else canonical(item))
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
            out[k if k[:1] != _TAG else _TAG + k] = v if t is int or (t is str and v[:1] != _TAG) else canonical(v)
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
    decimal.Decimal: lambda v: [_TAG + "decimal", str(v.normalize()) if v.is_finite() else str(v)],
    _dt.datetime: _datetime,
    _dt.date: lambda v: [_TAG + "date", v.isoformat()],
    _dt.time: lambda v: [_TAG + "time", v.isoformat()],
    _dt.timedelta: lambda v: [_TAG + "timedelta", _float(v.total_seconds())],
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
    if hasattr(value, "model_dump") and not isinstance(value, type):
        return _typed("model", value, value.model_dump())
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
# script was run as resolved to its import name, and lambdas and closures told
# apart by where they are defined and what they capture.
# ---------------------------------------------------------------------------

class _ToolInfo:
    """What the guard needs to know about a callable, computed once per callable."""

    __slots__ = ("name", "is_async", "takes_key", "names", "name_set", "defaults", "signature", "simple",
                 "var_keyword", "injected")

    def __init__(self, fn: Callable):
        self.name = tool_name(fn)
        self.is_async = _is_async(fn)
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            self.signature = None
        params = list(self.signature.parameters.values()) if self.signature else []
        self.takes_key = any(p.name == "key" for p in params)
        self.names = tuple(p.name for p in params)
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
    """A function's module as it would be imported, also when it ran as a script."""
    if module != "__main__":
        return module or "?"
    main_mod = sys.modules.get("__main__")
    spec = getattr(main_mod, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    path = getattr(main_mod, "__file__", None)
    return pathlib.Path(path).stem if path else "__main__"


def tool_name(fn: Callable) -> str:
    """The stable name records of `fn` are kept under."""
    if isinstance(fn, functools.partial):
        return tool_name(fn.func)
    target = getattr(fn, "__func__", fn)
    qualname = getattr(target, "__qualname__", None)
    if qualname is None:
        target = type(fn)
        qualname = target.__qualname__
    name = _module_name(getattr(target, "__module__", None)) + "." + qualname
    code = getattr(target, "__code__", None)
    if code is None or "<" not in qualname:
        return name
    return name + "#" + _definition_digest(target, code)


def _definition_digest(fn: Callable, code: Any) -> str:
    """Tells apart lambdas and nested functions that share a qualname."""
    parts: list[Any] = [code.co_firstlineno if "<lambda>" in fn.__qualname__ else 0]
    if "<lambda>" in fn.__qualname__:
        parts += [code.co_code.hex(), list(code.co_names),
                  [repr(c) for c in code.co_consts if isinstance(c, (str, int, float, bytes, type(None)))]]
    for cell in fn.__closure__ or ():
        try:
            parts.append(canonical(cell.cell_contents))
        except (_Unsupported, ValueError):
            parts.append(None)
    return hashlib.sha256(_dump(parts).encode()).hexdigest()[:10]


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
        where = name + "".join(reversed(e.path))
        raise FingerprintError(
            f"argument {where!r} is a {_describe(e.value)}, which has no stable fingerprint. "
            f"Pass key='...' (a stable id for this call, e.g. key=f'refund-{{order_id}}') "
            f"so the arguments are not fingerprinted, or pass a plain value (str, number, dict, list, "
            f"dataclass, pydantic model) instead") from None


def fingerprint(tool: str, workflow: str, arguments: Any) -> str:
    """sha256 of the canonical (tool, workflow, arguments) triple, 32 hex digits."""
    return _fingerprint_text(tool, workflow, _dump(arguments))


def _fingerprint_text(tool: str, workflow: str, arguments_text: str) -> str:
    """`fingerprint` from the arguments already dumped, which a new call's record keeps too."""
    quote = json.encoder.encode_basestring_ascii  # what _dump does to a str, without the encoder's setup
    triple = "[" + quote(tool) + "," + quote(workflow) + "," + arguments_text + "]"  # == _dump([tool, ...])
    return hashlib.sha256(triple.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------
# Records and states. A record is one call's row in the ledger:
#
#     (none) --claim--> RUNNING --complete--> SUCCESS
#                          |  \--raise-----> FAILED --next call--> RUNNING
#                          \--lease expired--> RUNNING (epoch + 1, new owner)
#
# Every transition is one compare-and-set on (epoch, owner), so two workers
# never both win, and a leader whose lease was taken over (a lower epoch)
# cannot overwrite the new leader's record.
# ---------------------------------------------------------------------------

class Status(enum.StrEnum):
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"


@dataclasses.dataclass(slots=True)
class Record:
    """One call in the ledger. Treat as immutable: use `evolve` for changes."""

    id: str
    tool: str
    workflow: str
    caller: str | None
    status: str
    owner: str
    epoch: int
    lease_until: float
    run_key: str
    runs: int = 0
    created: float = 0.0
    updated: float = 0.0
    started: float | None = None
    duration: float | None = None
    expires: float | None = None
    attempts: int = 0
    executed: int = 0
    blocked: int = 0
    result: str | None = None
    sig: str | None = None
    unstored: str | None = None
    error: str | None = None
    argsum: str | None = None
    args: str | None = None
    cost: float | None = None

    def evolve(self, **changes: Any) -> Record:
        record = Record(*_record_values(self))
        for name, value in changes.items():
            setattr(record, name, value)
        return record

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(RECORD_FIELDS, _record_values(self)))

    def stale(self, now: float | None = None) -> bool:
        """RUNNING whose lease ran out: its owner died or was paused."""
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


@dataclasses.dataclass(frozen=True)
class Policy:
    """How calls of one tool are treated.

    unlimited: run every call, keep no record (read-only tools).
    replay:    duplicates get the recorded result, waiting for a running call
               (singleflight); otherwise they get BLOCKED at once.
    max:       how many successful runs a call may have (one at a time).
    ttl:       seconds after a success when the call may run again.
    lease:     seconds a running call is presumed alive without a heartbeat.
    recover:   "retry" lets the next call take over an expired lease;
               "block" keeps it blocked until an operator retries it.
    validate:  True, or argument names: with key=, the same key with other
               values of those arguments raises KeyReuseError.
    cost:      what one run costs, for the savings report.
    serializer: an object or pair with dumps(value) -> str and loads(str).
    wait:      longest time in seconds a duplicate waits for a running call.
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

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise ConfigError(f"policy {what}")
        need(isinstance(self.max, int) and not isinstance(self.max, bool) and self.max >= 1,
             f"max must be a whole number >= 1, not {self.max!r}")
        need(self.ttl is None or (isinstance(self.ttl, (int, float)) and self.ttl > 0),
             f"ttl must be seconds > 0 or None, not {self.ttl!r}")
        need(isinstance(self.lease, (int, float)) and self.lease > 0, f"lease must be seconds > 0, not {self.lease!r}")
        need(self.recover in RECOVER_MODES, f"recover must be one of {RECOVER_MODES}, not {self.recover!r}")
        need(self.wait is None or (isinstance(self.wait, (int, float)) and self.wait >= 0),
             f"wait must be seconds >= 0 or None, not {self.wait!r}")
        need(self.cost is None or isinstance(self.cost, (int, float)), f"cost must be a number, not {self.cost!r}")
        if isinstance(self.validate, (list, tuple, set, frozenset)):
            object.__setattr__(self, "validate", tuple(sorted(self.validate)))
        need(isinstance(self.validate, (bool, tuple)), f"validate must be True or argument names, not {self.validate!r}")
        if self.serializer is not None:
            _codec(self.serializer)


DEFAULT_POLICY = Policy()
MAX_RESULT_BYTES = 1 << 20


def _codec(serializer: Any) -> tuple[Callable[[Any], str], Callable[[str], Any]]:
    if isinstance(serializer, (tuple, list)) and len(serializer) == 2 and all(map(callable, serializer)):
        return serializer[0], serializer[1]
    if callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None)):
        return serializer.dumps, serializer.loads
    raise ConfigError(f"serializer must have dumps and loads, or be a (dumps, loads) pair, not {serializer!r}")


_RESULT_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _json_dumps(value: Any) -> str:
    return _RESULT_ENCODER.encode(value)  # as json.dumps(value, ...) without building an encoder per call


def _sign(secret: bytes, r: Record) -> str:
    message = "\x00".join((r.id, str(r.epoch), r.run_key, r.result or "", r.unstored or ""))
    mac = _keyed_hmac(secret).copy()
    mac.update(message.encode())
    return mac.hexdigest()


@functools.lru_cache(maxsize=16)
def _keyed_hmac(secret: bytes) -> hmac.HMAC:
    """An HMAC with the key already set up; copying it is cheaper than setting up the key per record."""
    return hmac.new(secret, digestmod=hashlib.sha256)


@dataclasses.dataclass(slots=True)
class Outcome:
    """What a guarded call did. `source` is one of: executed, replayed, shared,
    blocked, unlimited."""

    value: Any
    source: str
    key: str | None = None
    record: Record | None = None

    @property
    def ran(self) -> bool:
        return self.source in ("executed", "unlimited")


# ---------------------------------------------------------------------------
# Stores. A store keeps records and offers a handful of atomic operations; all
# logic lives in the engine, so a backend is a thin translation of these
# methods into its own atomic primitives. `check_store` verifies one.
# ---------------------------------------------------------------------------

class Store:
    """The interface every backend implements. Each method is atomic.

    get(id)                   the record, or None
    insert(record)            add it if no record has its id; True if added
    swap(record, epoch, owner) replace the stored record's state fields with
                              record's iff the stored epoch and owner match;
                              the counters attempts and blocked are kept
    delete(id, epoch=None)    remove it (only at that epoch, if given)
    add_counts({id: (attempts, blocked)})  increment counters of existing records
    records(workflow=None, tool=None)      a list, oldest first
    clear(workflow=None)      delete records (of one workflow); how many
    wait(id, timeout)         sleep up to timeout, waking early if id may have
                              changed (an optimisation; sleeping is correct)
    secret()                  the HMAC key when none is configured
    close()
    """

    url = "store"

    def get(self, id: str) -> Record | None:
        raise NotImplementedError

    def insert(self, record: Record) -> bool:
        raise NotImplementedError

    def swap(self, record: Record, epoch: int, owner: str) -> bool:
        raise NotImplementedError

    def delete(self, id: str, epoch: int | None = None) -> bool:
        raise NotImplementedError

    def add_counts(self, counts: Mapping[str, tuple[int, int]]) -> None:
        raise NotImplementedError

    def records(self, workflow: str | None = None, tool: str | None = None) -> list[Record]:
        raise NotImplementedError

    def clear(self, workflow: str | None = None) -> int:
        raise NotImplementedError

    def wait(self, id: str, timeout: float) -> None:
        time.sleep(timeout)

    def secret(self) -> bytes:
        raise ConfigError(
            f"{type(self).__name__} has no place for a signing key: set LEDGER_SECRET "
            f"(the same value on every worker) or pass Guard(secret=...)")

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class MemoryStore(Store):
    """Records in a dict, for tests and single-process use. Thread-safe."""

    def __init__(self) -> None:
        self._rows: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)
        self.url = f":memory:{id(self):x}"

    def get(self, id: str) -> Record | None:
        return self._rows.get(id)

    def insert(self, record: Record) -> bool:
        with self._lock:
            if record.id in self._rows:
                return False
            self._rows[record.id] = record
            return True

    def swap(self, record: Record, epoch: int, owner: str) -> bool:
        with self._lock:
            old = self._rows.get(record.id)
            if old is None or old.epoch != epoch or old.owner != owner:
                return False
            self._rows[record.id] = record.evolve(attempts=old.attempts, blocked=old.blocked)
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

    def secret(self) -> bytes:
        return self._secret


SCHEMA_VERSION = 1
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


class SQLiteStore(Store):
    """Records in one SQLite file (WAL), shared by every thread and process on a machine.

    `durable=True` syncs every commit to disk (survives power loss); the default
    (synchronous=NORMAL) survives a crash of any process. `create=False` opens
    only an existing ledger database (as the read-only commands do).
    """

    def __init__(self, path: str | os.PathLike = "ledger.db", *, durable: bool = False, timeout: float = 10.0,
                 create: bool = True):
        self.path = os.fspath(path)
        self.url = "sqlite:///" + os.path.abspath(self.path)
        self.durable = durable
        self.timeout = timeout
        self.create = create
        self._local = threading.local()
        self._pid = os.getpid()
        self._conn()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._pid == os.getpid():
            return conn
        if self._pid != os.getpid():
            # A connection must not cross fork(); the child abandons the parent's.
            self._local = threading.local()
            self._pid = os.getpid()
        conn = self._local.conn = self._open()
        return conn

    def _open(self) -> sqlite3.Connection:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise StoreError(f"cannot open ledger database {self.path!r}: directory {folder!r} does not exist; "
                             f"create it or point LEDGER_DB elsewhere")
        if not self.create and not os.path.isfile(self.path):
            raise StoreError(f"no ledger database at {self.path}")
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            self._migrate(conn)  # first, so that a file that is no ledger is left as it was
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=" + ("FULL" if self.durable else "NORMAL"))
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open ledger database {self.path!r}: {e}. If the file is not a ledger "
                             f"database or is corrupt, move it aside and a new one is created") from None
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path!r} was written by a newer ledger.py (schema {version}); upgrade ledger.py")
        if version == SCHEMA_VERSION:
            return
        if not self.create:
            raise StoreError(f"{self.path} is not a ledger database (it has no ledger schema)")
        columns = ", ".join(f"{f} {_sqlite_type(f)}" for f in RECORD_FIELDS)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"CREATE TABLE IF NOT EXISTS records ({columns}, PRIMARY KEY (id)) WITHOUT ROWID")
            conn.execute("CREATE INDEX IF NOT EXISTS records_workflow ON records (workflow)")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _run(self, sql: str, params: Iterable = ()) -> sqlite3.Cursor:
        try:
            return self._conn().execute(sql, params)
        except sqlite3.Error as e:
            raise StoreError(f"ledger database {self.path!r}: {e}") from e

    def get(self, id: str) -> Record | None:
        row = self._run(_SQL_GET, (id,)).fetchone()
        return Record(*row) if row else None

    def insert(self, record: Record) -> bool:
        return self._run(_SQL_INSERT, _record_values(record)).rowcount == 1

    def swap(self, record: Record, epoch: int, owner: str) -> bool:
        return self._run(_SQL_SWAP, _sql_swap_values(record) + (record.id, epoch, owner)).rowcount == 1

    def delete(self, id: str, epoch: int | None = None) -> bool:
        if epoch is None:
            return self._run("DELETE FROM records WHERE id = ?", (id,)).rowcount == 1
        return self._run("DELETE FROM records WHERE id = ? AND epoch = ?", (id, epoch)).rowcount == 1

    def add_counts(self, counts: Mapping[str, tuple[int, int]]) -> None:
        conn = self._conn()
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("UPDATE records SET attempts = attempts + ?, blocked = blocked + ? WHERE id = ?",
                                 [(a, b, id) for id, (a, b) in counts.items()])
        except sqlite3.Error as e:
            raise StoreError(f"ledger database {self.path!r}: {e}") from e

    def records(self, workflow: str | None = None, tool: str | None = None) -> list[Record]:
        sql, params = f"SELECT {_SQL_COLUMNS} FROM records WHERE 1", []
        if workflow is not None:
            sql, params = sql + " AND workflow = ?", params + [workflow]
        if tool is not None:
            sql, params = sql + " AND tool = ?", params + [tool]
        return [Record(*row) for row in self._run(sql + " ORDER BY created", params)]

    def clear(self, workflow: str | None = None) -> int:
        if workflow is None:
            return self._run("DELETE FROM records").rowcount
        return self._run("DELETE FROM records WHERE workflow = ?", (workflow,)).rowcount

    def secret(self) -> bytes:
        return _key_file(self.path + ".key")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._pid == os.getpid():
            conn.close()
        self._local = threading.local()


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
            if len(key) >= 32:
                return key
        except FileNotFoundError:
            tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_hex(32).encode())
            try:
                os.link(tmp, path)  # atomic: no reader ever sees a half-written key
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            continue
        except OSError as e:
            raise StoreError(f"cannot read the signing key {path!r}: {e}; "
                             f"fix its permissions or set LEDGER_SECRET") from None
        time.sleep(0.01)
    raise StoreError(f"the signing key {path!r} is too short; delete it to have a new one made, "
                     f"or set LEDGER_SECRET")


def _require(module: str, package: str, what: str) -> Any:
    """Import an optional driver, or say in one line what installs it (the driver itself: a
    user who copied ledger.py has no extras to install)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the {module} package: pip install '{package}'") from None


class _Dropped(StoreError):
    """The connection broke during an operation, which may or may not have taken effect."""


class _ServerStore(Store):
    """What the stores on a database server share. Driver errors become StoreError.
    An operation whose connection broke is tried once more on a new connection; a
    claim (insert) or transition (swap) is first read back, so that one which took
    effect before the break is neither lost nor applied twice. Counters are not
    retried: a failed add_counts stays buffered in the engine for its next flush.

    Subclasses implement _get, _insert, _swap, _delete, _records, _clear, add_counts
    and _listen(deliver, stopped), which relays "record left RUNNING" messages.
    """

    where = "?"

    def __init__(self) -> None:
        self._wakeups = _Wakeups(self._listen, f"ledger-wakeups {self.where}")

    def get(self, id: str) -> Record | None:
        return self._again(self._get, id)

    def insert(self, record: Record) -> bool:
        try:
            return self._insert(record)
        except _Dropped:
            stored = self._get(record.id)
            if stored is None:
                return self._insert(record)
            return (stored.epoch, stored.owner) == (record.epoch, record.owner)

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

    def wait(self, id: str, timeout: float) -> None:
        self._wakeups.wait(id, timeout)

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


class _Wakeups:
    """Wakes this process's waiters when the server says a record left RUNNING.

    One daemon thread per store and process listens, started by the first wait;
    a message missed (while it connects, or reconnects after a break) only costs
    a waiter its timeout, after which the engine reads the record again.
    """

    def __init__(self, listen: Callable[[Callable[[str], None], Callable[[], bool]], None], name: str):
        self.listen, self.name = listen, name
        self.waiting: dict[str, list[threading.Event]] = {}
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.closed = False

    def wait(self, id: str, timeout: float) -> None:
        if self.pid != os.getpid():
            self._start()
        event = threading.Event()
        with self.lock:
            self.waiting.setdefault(id, []).append(event)
        try:
            event.wait(timeout)
        finally:
            with self.lock:
                events = self.waiting.get(id, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self.waiting.pop(id, None)

    def deliver(self, id: str) -> None:
        with self.lock:
            for event in self.waiting.get(id, ()):
                event.set()

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


def _reason(error: BaseException, secret: str | None) -> str:
    """A driver's error message on one line, without the password."""
    text = " ".join(str(error).split()).rstrip(".") or type(error).__name__
    return text.replace(secret, "***") if secret else text


def _without_query_parameter(url: str, name: str) -> tuple[str, str | None]:
    """`url` without the query parameter `name` (which the driver would reject), and its value."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in query if k == name]
    if not values:
        return url, None
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != name])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), values[-1]


_PG_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,30}"   # so that "schema.table" fits a NOTIFY channel name
_PG_TYPES = {"INTEGER": "bigint", "REAL": "double precision", "TEXT": "text"}
_PG_DEFAULTS = {"connect_timeout": "10", "application_name": "ledger.py",
                "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3"}
_PG_IDLE_CONNECTIONS = 8
_PG_SCHEMA_COMMENT = "ledger.py records, schema "


class PostgresStore(_ServerStore):
    """Records in one PostgreSQL table, shared by every worker that reaches the server.

    Each operation is one autocommitted statement (a claim is one INSERT ... ON
    CONFLICT DO NOTHING, a transition one conditional UPDATE), on a small pool of
    connections per process; a child process after fork() opens its own. The table
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
        self._params = {**_PG_DEFAULTS, **params}
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
        self._give(conn)
        return result

    # -- schema ------------------------------------------------------------

    def _statements(self) -> None:
        t, columns = self._quoted, ", ".join(RECORD_FIELDS)
        swap = (f"UPDATE {t} SET {', '.join(f'{f} = %s' for f in STATE_FIELDS)} "
                f"WHERE id = %s AND epoch = %s AND owner = %s")
        self._sql = {
            "get": f"SELECT {columns} FROM {t} WHERE id = %s",
            "insert": f"INSERT INTO {t} ({columns}) VALUES ({', '.join(['%s'] * len(RECORD_FIELDS))}) "
                      f"ON CONFLICT (id) DO NOTHING",
            "swap": swap,
            # A record leaving RUNNING wakes waiters in other processes, in the same statement.
            "finish": f"WITH done AS ({swap} RETURNING id) SELECT pg_notify(%s, id) FROM done",
            "delete": f"DELETE FROM {t} WHERE id = %s",
            "delete_at": f"DELETE FROM {t} WHERE id = %s AND epoch = %s",
            # Rows are locked in id order, so two concurrent flushes cannot deadlock.
            "add_counts": f"WITH v AS (SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS v(id, a, b)), "
                          f"locked AS MATERIALIZED (SELECT t.id FROM {t} t JOIN v ON t.id = v.id "
                          f"ORDER BY t.id FOR UPDATE OF t) "
                          f"UPDATE {t} t SET attempts = t.attempts + v.a, blocked = t.blocked + v.b "
                          f"FROM v JOIN locked ON locked.id = v.id WHERE t.id = v.id",
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
        if version is None:
            self._create()
            version = self._schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(f"table {self.table} in PostgreSQL at {self.where} was written by a newer "
                             f"ledger.py (schema {version}); upgrade ledger.py")

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

    def _swap(self, record: Record, epoch: int, owner: str) -> bool:
        values = [getattr(record, f) for f in STATE_FIELDS] + [record.id, epoch, owner]
        if record.status == Status.RUNNING:
            return self._run(self._sql["swap"], values) == 1
        return len(self._run(self._sql["finish"], values + [self.table], rows=True)) == 1

    def _delete(self, id: str, epoch: int | None) -> bool:
        if epoch is None:
            return self._run(self._sql["delete"], (id,)) == 1
        return self._run(self._sql["delete_at"], (id, epoch)) == 1

    def add_counts(self, counts: Mapping[str, tuple[int, int]]) -> None:
        ids = sorted(counts)
        self._run(self._sql["add_counts"], (ids, [counts[i][0] for i in ids], [counts[i][1] for i in ids]))

    def _records(self, workflow: str | None, tool: str | None) -> list[Record]:
        where = [(name, value) for name, value in (("workflow", workflow), ("tool", tool)) if value is not None]
        sql = self._sql["records"] + "".join((" WHERE " if i == 0 else " AND ") + f"{name} = %s"
                                             for i, (name, _) in enumerate(where))
        return [Record(*row) for row in self._run(sql + " ORDER BY created", [v for _, v in where], rows=True)]

    def _clear(self, workflow: str | None) -> int:
        if workflow is None:
            return self._run(self._sql["clear"])
        return self._run(self._sql["clear"] + " WHERE workflow = %s", (workflow,))

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


# Each Redis operation is one Lua script, atomic on the server. A record is a
# hash under PREFIX r:ID (a field per Record field; None is an absent field);
# PREFIX w:WORKFLOW is a sorted set of a workflow's ids by creation time, and
# PREFIX workflows the set of workflow names. Keys a script derives (rather
# than receives) make these scripts unfit for Redis Cluster.

_REDIS_INSERT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
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

_REDIS_SWAP = """
local current = redis.call('HMGET', KEYS[1], 'epoch', 'owner')
if current[1] ~= ARGV[1] or current[2] ~= ARGV[2] then return 0 end
local nils = tonumber(ARGV[6])
if nils > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 7, 6 + nils)) end
redis.call('HSET', KEYS[1], unpack(ARGV, 7 + nils))
if ARGV[3] == '' then redis.call('PERSIST', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""

_REDIS_DELETE = """
local found = redis.call('HMGET', KEYS[1], 'epoch', 'workflow')
if not found[1] or (ARGV[1] ~= '' and found[1] ~= ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[2] .. found[2], ARGV[3])
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
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return {removed, #ids}
"""

_REDIS_SCHEMA = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

REDIS_EXPIRY_GRACE = 60.0   # seconds a ttl'd record outlives its expiry on the server
_REDIS_BATCH = 500
_REDIS_KINDS = {"INTEGER": int, "REAL": float, "TEXT": str}


class RedisStore(_ServerStore):
    """Records in Redis (6.2 or later, not Cluster), shared by every worker that reaches it.

    Each operation is one Lua script, so claims and transitions are atomic on the
    server. A record with a ttl expires on the server REDIS_EXPIRY_GRACE seconds
    after its ttl ran out. Waiters in other processes are woken by pub/sub. The
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
            ("add_counts", _REDIS_ADD_COUNTS), ("clear", _REDIS_CLEAR), ("schema", _REDIS_SCHEMA))}
        self._fields = {f: _REDIS_KINDS[_sqlite_type(f)] for f in RECORD_FIELDS}
        super().__init__()
        self._migrate()

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
        version = int(self._script("schema", [self.prefix + "schema"], [SCHEMA_VERSION]))
        if version > SCHEMA_VERSION:
            raise StoreError(f"Redis at {self.where}, prefix {self.prefix!r} was written by a newer ledger.py "
                             f"(schema {version}); upgrade ledger.py")

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

    @staticmethod
    def _expiry(record: Record) -> str:
        if record.expires is None:
            return ""
        return str(max(1, int((record.expires - time.time() + REDIS_EXPIRY_GRACE) * 1000)))

    # -- the Store interface ---------------------------------------------------

    def _get(self, id: str) -> Record | None:
        return self._decode(self._call(self._client.hgetall, self._key(id)))

    def _insert(self, record: Record) -> bool:
        pairs = [x for f in RECORD_FIELDS if getattr(record, f) is not None
                 for x in (f, self._encode(getattr(record, f)))]
        keys = [self._key(record.id), self.prefix + "w:" + record.workflow, self.prefix + "workflows"]
        args = [record.id, repr(float(record.created)), record.workflow, self._expiry(record),
                self.prefix + "r:"] + pairs
        return self._script("insert", keys, args) == 1

    def _swap(self, record: Record, epoch: int, owner: str) -> bool:
        nils = [f for f in STATE_FIELDS if getattr(record, f) is None]
        pairs = [x for f in STATE_FIELDS if getattr(record, f) is not None
                 for x in (f, self._encode(getattr(record, f)))]
        channel = self.prefix + "done" if record.status != Status.RUNNING else ""
        args = [str(epoch), owner, self._expiry(record), channel, record.id, len(nils)] + nils + pairs
        return self._script("swap", [self._key(record.id)], args) == 1

    def _delete(self, id: str, epoch: int | None) -> bool:
        args = ["" if epoch is None else str(epoch), self.prefix + "w:", id]
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
                count, seen = self._script("clear", [self.prefix + "w:" + name, self.prefix + "workflows"],
                                           [self.prefix + "r:", name, _REDIS_BATCH])
                removed += count
                if seen < _REDIS_BATCH:
                    break
        return removed

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


def open_store(spec: str | os.PathLike | Store | None, *, create: bool = True) -> Store:
    """A store from a Store, a file path, ":memory:" or a URL. `create=False` refuses
    to make a new SQLite file where there is none."""
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
        return PostgresStore(dsn, table=table or "ledger")
    if scheme in ("redis", "rediss"):
        url, prefix = _without_query_parameter(spec, "prefix")
        return RedisStore(url, prefix=prefix if prefix is not None else "ledger:")
    raise ConfigError(f"unknown store URL scheme {scheme + '://'!r}: use a file path, ':memory:', sqlite:///path, "
                      f"postgresql://user@host/db or redis://host:6379/0")


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
            store.add_counts({second.id: (1, 1)})

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
    finally:
        store.clear(workflow=scope)


# ---------------------------------------------------------------------------
# Engine: leases and their heartbeat. One daemon thread per process renews the
# lease of every running call (so a tool may run far longer than its lease)
# and flushes buffered counters once a second.
# ---------------------------------------------------------------------------

FLUSH_INTERVAL = 1.0
POLL_FIRST, POLL_MAX = 0.001, 0.02
COMPLETION_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8)


class _Heartbeat:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.runs: dict[int, _Run] = {}
        self.cores: weakref.WeakSet[_Core] = weakref.WeakSet()
        self.thread: threading.Thread | None = None
        # Held while the heartbeat is inside a store: fork() waits for it, because a
        # child forked while this thread holds a driver's internal lock (SQLite's
        # mutexes) would deadlock on its first database call.
        self.io = threading.Lock()

    # add and discard run on every new call, so they take the lock only when the
    # thread must be started or woken early; the loop reads a snapshot of runs.
    def add(self, run: _Run) -> None:
        self.runs[id(run)] = run
        thread = self.thread
        if thread is None or not thread.is_alive() or run.renew_at < time.time() + FLUSH_INTERVAL:
            with self.cond:
                self._ensure_thread()
                self.cond.notify()

    def discard(self, run: _Run) -> None:
        self.runs.pop(id(run), None)

    def watch(self, core: _Core) -> None:
        with self.cond:
            self.cores.add(core)
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="ledger-heartbeat", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        next_flush = time.time() + FLUSH_INTERVAL
        while True:
            with self.cond:
                now = time.time()
                runs = list(self.runs.values())
                wake = min([next_flush] + [r.renew_at for r in runs])
                if wake > now:
                    self.cond.wait(wake - now)
                    continue
                due = [r for r in runs if r.renew_at <= now]
                cores = list(self.cores) if now >= next_flush else []
            try:
                with self.io:
                    for run in due:
                        run.renew()
                    for core in cores:
                        core.flush(quietly=True)
            except Exception:  # the heartbeat must outlive any one store's fault
                log.exception("ledger heartbeat: unexpected error; continuing")
            if cores:
                next_flush = time.time() + FLUSH_INTERVAL


_HEARTBEAT = _Heartbeat()


class _Flight:
    """Wakes in-process duplicates the moment the leader's record is written, and
    hands them that record, so none of them has to read it back from the store.

    Each waiting thread blocks on a lock of its own and each event loop gets one
    callback, so a hundred duplicates wake without contending for a shared lock.
    """

    __slots__ = ("epoch", "lock", "sleepers", "futures", "landed", "record")

    def __init__(self, epoch: int):
        self.epoch = epoch
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


_FLIGHTS: dict[tuple[str, str], _Flight] = {}


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
                await asyncio.sleep(wait.timeout)
            wait = next(steps)
    except StopIteration as stop:
        return stop.value


def _after_fork_in_child() -> None:
    global _HEARTBEAT
    _unique_token.__init__()
    cores = list(_HEARTBEAT.cores)
    _HEARTBEAT = _Heartbeat()
    _FLIGHTS.clear()
    for core in cores:
        core.forget_pending()
        _HEARTBEAT.cores.add(core)


def _flush_all(quietly: bool = False) -> None:
    """Write every guard's buffered counters, so readers see this process's counts."""
    for core in list(_HEARTBEAT.cores):
        core.flush(quietly=quietly)


atexit.register(_flush_all, quietly=True)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _HEARTBEAT.io.acquire(),
                        after_in_parent=lambda: _HEARTBEAT.io.release(),
                        after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# Engine: the state machine. `_settle` reads the record and decides: run (it
# won the claim), return a duplicate's outcome, or wait and look again. It is
# a generator so the sync and async paths share every decision and differ
# only in how they wait.
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


_CURRENT_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("ledger_current_key", default=None)
_WORKFLOW: contextvars.ContextVar[str | None] = contextvars.ContextVar("ledger_workflow", default=None)
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("ledger_caller", default=None)
# `with guard.workflow(...)` blocks open in this context, innermost last; kept in
# the context so one scope object may be entered by many threads and tasks at once.
_SCOPE_TOKENS: contextvars.ContextVar[tuple] = contextvars.ContextVar("ledger_scope_tokens", default=())
_NO_DEFAULT = object()


def current_key(default: Any = _NO_DEFAULT) -> str:
    """The idempotency key of the guarded call running now.

    Stable across a retry after a crash or a failure of the same call, and
    different for each intended run (after `ttl`, or under `max`): pass it to
    the downstream API (an Idempotency-Key header) so that a call re-run after
    a crash between the side effect and the record is deduplicated there.
    Outside a guarded call it raises LedgerError, or returns `default` if given.
    """
    key = _CURRENT_KEY.get()
    if key is None:
        if default is _NO_DEFAULT:
            raise LedgerError("current_key() is only set inside a guarded tool call; "
                              "call the tool through guard(...) or pass current_key(default=None)")
        return default
    return key


class _Call:
    """One prepared call: everything decided before the store is touched."""

    __slots__ = ("fn", "args", "kwargs", "info", "name", "workflow", "caller", "policy",
                 "key", "id", "bound", "arguments", "arguments_text", "argsum")


class _Run:
    """A claimed call that this process is running."""

    __slots__ = ("core", "call", "record", "lock", "done", "lost", "renew_at", "token", "__weakref__")

    def __init__(self, core: _Core, call: _Call, record: Record):
        self.core, self.call, self.record = core, call, record
        self.lock = threading.Lock()
        self.done = self.lost = False
        self.renew_at = record.started + call.policy.lease / 3

    def __enter__(self) -> _Run:
        """The tool runs inside this block: current_key() is set, and if it raises, the
        run is recorded as failed (the exception itself goes on to the caller)."""
        self.token = _CURRENT_KEY.set(self.record.run_key)
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        _CURRENT_KEY.reset(self.token)
        if error is not None:
            self.core.fail(self, error)

    def renew(self) -> None:
        """Push the lease deadline forward; notice if another worker took the call over."""
        with self.lock:
            if self.done or self.lost:
                return
            now = time.time()
            renewed = self.record.evolve(lease_until=now + self.call.policy.lease, updated=now)
            try:
                won = self.core.store.swap(renewed, self.record.epoch, self.record.owner)
            except Exception as e:
                log.warning("lease of %s could not be renewed: %s", self.call.name, e)
                self.renew_at = now + min(1.0, self.call.policy.lease / 10)
                return
            if won:
                self.record = renewed
                self.renew_at = now + self.call.policy.lease / 3
            else:
                self.lost = True
                self.core.warn("%s (call %s): lease lost while running; another worker took it over",
                               self.call.name, self.call.id)
        if self.lost:
            _HEARTBEAT.discard(self)


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
            self._store.add_counts({id: (a, b) for id, (a, b) in pending.items()})
        except LedgerError as e:
            with self.lock:
                for id, (a, b) in pending.items():
                    slot = self.pending.setdefault(id, [0, 0])
                    slot[0] += a
                    slot[1] += b
            if not quietly:
                raise
            log.warning("counters not written yet: %s", e)

    def forget_pending(self) -> None:
        self.pending = {}
        self.lock, self.flushing = threading.Lock(), threading.Lock()

    def env_workflow(self) -> str:
        """$LEDGER_WORKFLOW or "default", read on first use like the other settings."""
        if self._env_workflow is None:
            self._env_workflow = os.environ.get("LEDGER_WORKFLOW") or "default"
        return self._env_workflow

    def name_of(self, fn: Callable, info: _ToolInfo) -> str:
        """The name a function's records are kept under: the one it was wrapped under, if any."""
        try:
            return self.names.get(fn) or info.name
        except TypeError:
            return info.name

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
        duplicate (returns an Outcome)."""
        store, policy = self.store, call.policy
        self.secret  # a missing signing key must fail before the tool runs, not after it
        waited_epoch = deadline = landed = None
        delay, lost_races = POLL_FIRST, 0
        while True:
            now = time.time()
            record = landed or store.get(call.id)
            landed = None
            if record is None:
                run = self.claim(call, None, now)
                if store.insert(run.record):
                    self.note_new_call(call, now)
                    return self.started(run)
                lost_races = _lost_race(lost_races, store, call)
                continue
            if call.argsum is not None and record.argsum not in (None, call.argsum):
                self.count(call.id, 1, 0)
                raise KeyReuseError(
                    f"{call.name}: idempotency key {call.key!r} was first used with other values of "
                    f"{_validated_names(policy)}; use a new key for a different request")
            status = record.status
            if force:
                takeover = self.claim(call, record, now, new_run=True)
            elif status == Status.RUNNING:
                if record.lease_until > now:
                    if not policy.replay:
                        return self.duplicate(call, record, "blocked")
                    if policy.wait is not None and deadline is None:
                        deadline = now + policy.wait
                    if deadline is not None and now >= deadline:
                        self.count(call.id, 1, 0)
                        raise WaitTimeout(f"{call.name}: waited {policy.wait}s for the running call {call.id} "
                                          f"to finish; raise the policy's wait= or try again later")
                    waited_epoch = record.epoch
                    timeout = min(record.lease_until - now, (deadline or math.inf) - now)
                    flight = _FLIGHTS.get((store.url, call.id))
                    if flight is not None and flight.epoch == record.epoch:
                        yield _Wait(flight, timeout, store, call.id)
                        landed = flight.record
                    else:
                        yield _Wait(None, min(delay, timeout), store, call.id)
                        delay = min(delay * 1.5, POLL_MAX)
                    continue
                if policy.recover == "block":
                    self.warn("%s (call %s) is stale: its worker stopped renewing the lease %.1fs ago and "
                              "recover='block' keeps it blocked; clear it with guard.retry(...) or "
                              "`ledger retry %s` once you know whether it took effect",
                              call.name, call.id, now - record.lease_until, call.id)
                    return self.duplicate(call, record, "blocked")
                takeover = self.claim(call, record, now)
            elif status == Status.FAILED:
                if waited_epoch == record.epoch:
                    self.count(call.id, 1, 0)
                    raise LeaderFailed(f"{call.name}: the running call this one waited for raised "
                                       f"{record.error}; the next call runs it again")
                takeover = self.claim(call, record, now)
            else:
                fresh = record.expires is None or record.expires > now
                if fresh and record.runs >= policy.max:
                    source = "shared" if waited_epoch is not None else "replayed" if policy.replay else "blocked"
                    return self.duplicate(call, record, source)
                takeover = self.claim(call, record, now, new_run=True, new_window=not fresh)
            if store.swap(takeover.record, record.epoch, record.owner):
                if status == Status.RUNNING and not force:
                    self.warn("%s (call %s): took over from a worker whose lease expired %.1fs ago "
                              "(epoch %d -> %d)", call.name, call.id, now - record.lease_until,
                              record.epoch, takeover.record.epoch)
                return self.started(takeover)
            lost_races = _lost_race(lost_races, store, call)

    def claim(self, call: _Call, prev: Record | None, now: float,
              new_run: bool = False, new_window: bool = False) -> _Run:
        """The RUNNING record this process would write to claim the call."""
        policy = call.policy
        if prev is None or new_run:
            once = policy.max == 1 and policy.ttl is None and prev is None
            run_key = call.id if once else f"{call.id}.{_unique_token()}"
        else:
            run_key = prev.run_key
        record = Record(
            id=call.id, tool=call.name, workflow=call.workflow, caller=call.caller,
            status=Status.RUNNING.value, owner=_unique_token(),
            epoch=prev.epoch + 1 if prev else 1, lease_until=now + policy.lease, run_key=run_key,
            runs=0 if prev is None or new_window else prev.runs,
            created=prev.created if prev else now, updated=now, started=now,
            attempts=prev.attempts if prev else 0, executed=prev.executed + 1 if prev else 1,
            blocked=prev.blocked if prev else 0, argsum=call.argsum, args=_preview(call),
            cost=policy.cost)
        return _Run(self, call, record)

    def started(self, run: _Run) -> _Run:
        self.count(run.call.id, 1, 0)
        _FLIGHTS[(self.store.url, run.call.id)] = _Flight(run.record.epoch)
        _HEARTBEAT.add(run)
        return run

    def duplicate(self, call: _Call, record: Record, source: str) -> Outcome:
        value = BLOCKED if source == "blocked" else self.replay(call, record)
        self.count(call.id, 1, 1)
        self.fire("block", record)
        return Outcome(value, source, record.run_key, record)

    def replay(self, call: _Call, record: Record) -> Any:
        if record.sig is None or not hmac.compare_digest(record.sig, _sign(self.secret, record)):
            raise IntegrityError(
                f"{call.name}: the stored record {record.id} failed its signature check (tampered with, "
                f"or written with another secret); it is neither replayed nor re-run. Inspect it with "
                f"`ledger show`, then clear it with `ledger retry {record.id}` if the call should run again")
        if record.unstored is not None:
            self.warn("%s returned a %s, which could not be stored, so this duplicate gets BLOCKED "
                      "instead of the result; give the policy a serializer= to store such values",
                      call.name, record.unstored)
            return BLOCKED
        loads = _codec(call.policy.serializer)[1] if call.policy.serializer else json.loads
        try:
            return loads(record.result)
        except Exception as e:
            raise LedgerError(f"{call.name}: the stored result of call {record.id} cannot be decoded "
                              f"({type(e).__name__}: {e}); did the policy's serializer change?") from e

    # -- completing --------------------------------------------------------

    def succeed(self, run: _Run, value: Any) -> Outcome:
        call, now = run.call, time.time()
        result, unstored = _encode(call, value)
        record = run.record.evolve(
            status=Status.SUCCESS.value, updated=now, lease_until=now, duration=now - run.record.started,
            expires=now + call.policy.ttl if call.policy.ttl else None, runs=run.record.runs + 1,
            result=result, unstored=unstored)
        record.sig = _sign(self.secret, record)
        if unstored is not None:
            self.warn("%s returned a %s, which cannot be stored (%s); the call is recorded as done and "
                      "duplicates get BLOCKED; give the policy a serializer= to store such values",
                      call.name, _describe(value), unstored)
        try:
            self.complete(run, record)
        except Exception as e:
            raise CompletionError(
                f"{call.name} RAN and returned, but its record could not be completed ({e}). Do not "
                f"assume it failed: its result is in this error's .value. The record stays RUNNING and "
                f"its lease expires in {call.policy.lease}s", value) from e
        self.fire("success", record)
        return Outcome(value, "executed", record.run_key, record)

    def fail(self, run: _Run, error: BaseException) -> None:
        call, now = run.call, time.time()
        if not isinstance(error, Exception) and call.policy.recover == "block":
            # Interrupted, not failed: whether it took effect is unknown, so the
            # record stays RUNNING and turns stale when its lease runs out.
            with run.lock:
                run.done = True
            self.release(run)
            return
        record = run.record.evolve(status=Status.FAILED.value, updated=now, lease_until=now,
                                   duration=now - run.record.started,
                                   error=f"{type(error).__name__}: {error}"[:2000])
        try:
            self.complete(run, record)
        except Exception as e:
            log.error("%s raised %s and its FAILED record could not be written: %s",
                      call.name, type(error).__name__, e)
        self.fire("fail", record)

    def complete(self, run: _Run, record: Record) -> bool:
        """Write the final record with retries; False if another worker fenced this run off."""
        with run.lock:
            run.done = True
        stored = None
        try:
            for delay in COMPLETION_RETRIES + (None,):
                try:
                    won = self.store.swap(record, run.record.epoch, run.record.owner)
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
        the record it stored (None: they read the store)."""
        _HEARTBEAT.discard(run)
        flight = _FLIGHTS.pop((self.store.url, run.call.id), None)
        if flight is not None:
            flight.land(stored)

    # -- noticing non-deterministic arguments ------------------------------

    def note_new_call(self, call: _Call, now: float) -> None:
        """Warn when a tool keeps running with arguments that differ only in
        timestamps or UUIDs: those are retries the ledger cannot recognise."""
        if call.key is not None or call.name in self.warned:
            return
        volatile = sorted(name for name, value in call.bound.items() if _looks_volatile(value))
        if not volatile:
            return
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


def _lost_race(lost: int, store: Store, call: _Call) -> int:
    """Count a claim lost to another worker. Each loss means the record changed,
    so a thousand in a row means the store is broken, not busy."""
    if lost >= 1000:
        raise StoreError(f"{call.name}: {store!r} refused 1000 claims in a row for call {call.id}; "
                         f"run ledger.check_store() against it")
    return lost + 1


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


def _encode(call: _Call, value: Any) -> tuple[str | None, str | None]:
    """The stored form of a result, or (None, why it cannot be stored)."""
    try:
        text = _codec(call.policy.serializer)[0](value) if call.policy.serializer else _json_dumps(value)
    except Exception as e:
        return None, f"{_describe(value)} ({type(e).__name__}: {e})"
    if not isinstance(text, str):
        return None, f"{_describe(value)} (the serializer returned {_describe(text)}, not str)"
    if len(text) > MAX_RESULT_BYTES:
        return None, f"{_describe(value)} of {len(text)} characters, over the {MAX_RESULT_BYTES} limit"
    return text, None


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
        self._default_workflow = workflow
        self._default_caller = caller
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
        """A guard whose calls are fingerprinted in workflow `id`; also a `with` block
        that scopes calls made in this thread or task."""
        return self._scoped(str(id), self._scope[1])

    def as_caller(self, name: str) -> Guard:
        """A guard that records its calls as made by `name`; also a `with` block."""
        return self._scoped(self._scope[0], str(name))

    def _scoped(self, workflow: str | None, caller: str | None) -> Guard:
        scoped = object.__new__(Guard)
        scoped._core = self._core
        scoped._default_workflow, scoped._default_caller = self._default_workflow, self._default_caller
        scoped._scope = (workflow, caller)
        return scoped

    def __enter__(self) -> Guard:
        workflow, caller = self._scope
        tokens = (_WORKFLOW.set(workflow or _WORKFLOW.get()), _CALLER.set(caller or _CALLER.get()))
        _SCOPE_TOKENS.set(_SCOPE_TOKENS.get() + (tokens,))
        return self

    def __exit__(self, *exc: Any) -> None:
        stack = _SCOPE_TOKENS.get()
        workflow_token, caller_token = stack[-1]
        _SCOPE_TOKENS.set(stack[:-1])
        _CALLER.reset(caller_token)
        _WORKFLOW.reset(workflow_token)

    def _workflow(self) -> str:
        return self._scope[0] or _WORKFLOW.get() or self._default_workflow or self._core.env_workflow()

    def _caller(self) -> str | None:
        return self._scope[1] or _CALLER.get() or self._default_caller

    # -- calling -----------------------------------------------------------

    def __call__(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` unless this call already ran; an async fn gives an awaitable.

        A duplicate returns BLOCKED, or with replay=True the recorded result.
        key= (or idempotency_key=) names the call instead of its arguments.
        """
        call = self._prepare(fn, args, kwargs)
        if call.policy.unlimited:
            return call.fn(*call.args, **call.kwargs)
        if call.info.is_async:
            return _value_of(self._run_async(call))
        return self._run(call).value

    def execute(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Outcome:
        """Like calling the guard, but returns an Outcome: the value and where it came from
        (executed, replayed, shared, blocked, unlimited). An async fn gives an awaitable."""
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
        step = _drive(self._core.settle(call, force))
        if isinstance(step, Outcome):
            return step
        with step:
            value = call.fn(*call.args, **call.kwargs)
        return self._core.succeed(step, value)

    async def _run_async(self, call: _Call, force: bool = False) -> Outcome:
        step = await _drive_async(self._core.settle(call, force))
        if isinstance(step, Outcome):
            return step
        with step:
            value = await call.fn(*call.args, **call.kwargs)
        return self._core.succeed(step, value)

    def _prepare(self, fn: Callable, args: tuple, kwargs: dict) -> _Call:
        fn, name = _unwrap(fn)
        while isinstance(fn, functools.partial):
            args, kwargs = fn.args + args, {**fn.keywords, **kwargs}
            fn = fn.func
        if not callable(fn):
            raise ConfigError(f"guard needs a callable tool, got {_describe(fn)}")
        info = _info(fn)
        call = _Call()
        call.fn, call.info = fn, info
        call.name = name or self._core.name_of(fn, info)
        call.key = kwargs.pop("idempotency_key", None)
        if "key" in kwargs and not info.takes_key:
            if call.key is not None:
                raise ConfigError("pass key= or idempotency_key=, not both")
            call.key = kwargs.pop("key")
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
            call.arguments_text = _dump(call.arguments)
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
            if policy:  # under the name the records will have
                self.policy(name or _framework_name(fn) or _registered_name(fn) or fn, **policy)
            return self._wrap_tool(fn, name, blocked_return, "guard.once")
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
            return type(tools)(self._wrap_tool(tool, None, blocked_return) for tool in tools)
        if _adapter_for(tools) is not None:
            return self._wrap_tool(tools, None, blocked_return)
        raise ConfigError(f"wrap_tools takes a dict or a list of tools, a framework tool or an MCP server, "
                          f"not {_describe(tools)}")

    def _wrap_tool(self, tool: Any, name: str | None, blocked_return: Any, caller: str = "wrap_tools") -> Any:
        adapt = _adapter_for(tool)
        if adapt is not None:
            return adapt(self, tool, name or _framework_name(tool), blocked_return)
        if not _is_plain_callable(tool):
            raise ConfigError(
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
        inner, inner_name = _unwrap(fn)
        name = name or inner_name or self._core.name_of(inner, _info(inner))
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

    def policy(self, fn_or_name: Callable | str, /, *, unlimited: bool = False, replay: bool = False,
               max: int = 1, ttl: float | None = None, lease: float = 30.0, recover: str = "retry",
               validate: bool | Iterable[str] = False, cost: float | None = None,
               serializer: Any = None, wait: float | None = None) -> Policy:
        """Set how calls of one tool (a function, its wrapped form, or its name) are treated."""
        policy = Policy(unlimited=unlimited, replay=replay, max=max, ttl=ttl, lease=lease, recover=recover,
                        validate=validate, cost=cost, serializer=serializer, wait=wait)
        if isinstance(fn_or_name, str):
            self._core.policies[fn_or_name] = policy
            return policy
        fn, name = _unwrap(fn_or_name)
        self._core.policies[name or _framework_name(fn) or self._core.name_of(fn, _info(fn))] = policy
        try:
            self._core.policies_by_fn[fn] = policy
        except TypeError:
            pass
        return policy

    def on_success(self, callback: Callable[[Record], Any]) -> Callable[[Record], Any]:
        """Call `callback(record)` after each recorded run; usable as a decorator."""
        self._core.callbacks["success"].append(callback)
        return callback

    def on_block(self, callback: Callable[[Record], Any]) -> Callable[[Record], Any]:
        """Call `callback(record)` for each duplicate (blocked, replayed or shared)."""
        self._core.callbacks["block"].append(callback)
        return callback

    def on_fail(self, callback: Callable[[Record], Any]) -> Callable[[Record], Any]:
        """Call `callback(record)` after each run whose tool raised."""
        self._core.callbacks["fail"].append(callback)
        return callback

    # -- operating -----------------------------------------------------------

    def retry(self, fn: Callable | str, /, *args: Any, **kwargs: Any) -> bool:
        """Let this call run again on its next attempt (for a call a stale lease or
        recover='block' left blocked). True if there was a record to release."""
        return self.retry_id(self._prepare(self._resolve(fn), args, kwargs).id)

    def retry_id(self, id: str) -> bool:
        """`retry` by record id, as `ledger retry ID` does."""
        store = self.store
        while True:
            record = store.get(id)
            if record is None or record.status == Status.FAILED:
                return False
            released = record.evolve(status=Status.FAILED.value, owner="retry", epoch=record.epoch + 1,
                                      updated=time.time(), error="released for retry by an operator")
            if store.swap(released, record.epoch, record.owner):
                return True

    def reset(self, wf: str | None = None) -> int:
        """Delete every record (of workflow `wf`); how many were deleted."""
        self._core.flush()
        return self.store.clear(wf)

    def history(self, tool: Callable | str | None = None, wf: str | None = None) -> list[dict[str, Any]]:
        """Every record (of one tool, one workflow) as a dict, oldest first."""
        _flush_all()
        return [r.as_dict() for r in self.store.records(workflow=wf, tool=self._tool_name(tool))]

    def stats(self, wf: str | None = None) -> dict[str, Any]:
        """Totals: actions (records), attempts, executed, blocked, failed, running, stale,
        duplicate_rate (blocked / attempts), saved_usd and saved_seconds (what duplicates
        avoided), fenced (this process)."""
        _flush_all()
        return {**_totals(self.store.records(workflow=wf)), "fenced": self._core.fenced}

    def log(self, wf: str | None = None, file: Any = None) -> str:
        """A per-tool summary, written to stderr (or `file`) and returned."""
        _flush_all()
        lines = [_summary_line(tool, rows) for tool, rows in _by_tool(self.store.records(workflow=wf)).items()]
        text = "\n".join(lines) if lines else "(no calls recorded)"
        print(text, file=file or sys.stderr)
        return text

    def check(self) -> bool:
        """Self-test: the store contract and the state machine, in memory. True or raises."""
        check_store(MemoryStore())
        probe = Guard(MemoryStore(), quiet=True)
        calls: list[int] = []

        def tool(n: int) -> int:
            calls.append(n)
            if n < 0:
                raise ValueError(n)
            return n * 2

        probe.policy(tool, replay=True)
        results = [probe(tool, 21), probe(tool, n=21)]
        for _ in range(2):
            try:
                probe(tool, -1)
            except ValueError:
                pass
        if results != [42, 42] or calls != [21, -1, -1]:
            raise LedgerError(f"self-check failed: results {results}, runs {calls}")
        return True

    def close(self) -> None:
        """Flush counters and close the store."""
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
        if tool is None or isinstance(tool, str):
            return tool
        fn, name = _unwrap(tool)
        return name or _framework_name(fn) or self._core.name_of(fn, _info(fn))


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


# Framework adapters. Each takes (guard, tool, name, blocked_return) and returns a
# guarded copy of the framework's own tool object (the MCP server adapter guards
# the server in place); all of them guard the framework's innermost call of the
# user's code through Guard._wrap. Frameworks are never imported: a tool's class
# can only be one of theirs if their module is already loaded.

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
    guarded = tool.model_copy()
    base = sys.modules["langchain_core.tools"].BaseTool
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
    guarded = tool.model_copy()
    base = sys.modules["crewai.tools.base_tool"].BaseTool
    for attr in ("_run", "_arun"):
        if getattr(type(tool), attr) is not getattr(base, attr):
            object.__setattr__(guarded, attr, guard._wrap(getattr(tool, attr), name, blocked_return))
    return guarded


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


def _registered_name(fn: Any) -> str | None:
    """The name a framework registered `fn` under, which is also the name of its records."""
    return next((owner.name for owner, guard_in_place, _ in _registrations(fn) if guard_in_place), None)


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


def _argsum(bound: Mapping[str, Any], validate: bool | tuple[str, ...]) -> str:
    names = bound.keys() if validate is True else validate
    return hashlib.sha256(_dump(_canonical_arguments({n: bound.get(n) for n in names})).encode()).hexdigest()[:16]


async def _value_of(outcome: Any) -> Any:
    return (await outcome).value


async def _outcome_of(awaitable: Any) -> Outcome:
    return Outcome(await awaitable, "unlimited")


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
        "running": sum(r.status == Status.RUNNING and not r.stale(now) for r in records),
        "stale": sum(r.stale(now) for r in records),
        "duplicate_rate": round(blocked / attempts, 4) if attempts else 0.0,
        "saved_usd": round(sum(r.blocked * (r.cost or 0) for r in records), 6),
        "saved_seconds": round(sum(r.blocked * (r.duration or 0) for r in records), 6),
    }


def _summary_line(tool: str, rows: list[Record]) -> str:
    failed = [r for r in rows if r.status == Status.FAILED]
    mark = "✗" if failed else "✓"
    line = (f"{mark} {tool:<24} attempts {sum(r.attempts for r in rows):<4} "
            f"executed {sum(r.executed for r in rows):<4} blocked {sum(r.blocked for r in rows)}")
    return line + (f"  -> {failed[-1].error}" if failed else "")


guard = Guard()


# ---------------------------------------------------------------------------
# Command line: `python ledger.py COMMAND` (and the `ledger` console script).
# Reports go to stdout, since there they are the program's output; diagnostics
# go to stderr. Every command but `demo` opens only an existing database, and
# only `clear`, `retry` and `check` (on scratch records of its own) write to it.
# Exit codes: 0 ok, 1 a check failed or a confirmation was declined, 2 usage error.
# ---------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEMO_LEASE = 1.0
DASHBOARD_ROWS = 1000
STATES = ("RUNNING", "STALE", "SUCCESS", "FAILED")
_STATE_STYLE = {"RUNNING": "blue", "STALE": "yellow", "SUCCESS": "green", "FAILED": "red"}
# Tool arguments, errors and names are untrusted: no control character of theirs reaches the terminal.
_CONTROL = {**dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)], "\ufffd"), **dict.fromkeys(map(ord, "\t\n\r"), " ")}


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
    p = command("show", _cmd_show, "the calls in the ledger, as a table", wf, as_json)
    p.add_argument("--tool", help="only the calls of this tool")
    p.add_argument("--status", type=str.upper, choices=STATES, help="only the calls in this state")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="only the N most recent calls")
    p = command("tail", _cmd_tail, "follow new activity as it happens, until Ctrl-C", wf, as_json)
    p.add_argument("--last", type=int, default=10, metavar="N", help="first show the N latest calls (default 10)")
    p.add_argument("--interval", type=_positive_float, default=0.5, metavar="SECONDS",
                   help="how often to look (default 0.5)")
    command("stats", _cmd_stats, "totals and the duplicate rate", wf, as_json)
    command("savings", _cmd_savings, "runs avoided, money and time saved, per tool", wf, as_json)
    p = command("clear", _cmd_clear, "delete the records (of one workflow); asks first", wf)
    p.add_argument("--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    p = command("retry", _cmd_retry, "let one call run again: for a call left blocked by recover='block' "
                "or a stale lease")
    p.add_argument("id", metavar="ID", help="the record's id, or a unique prefix of it (see `ledger show`)")
    p = command("export", _cmd_export, "every record, as JSON lines or CSV", wf)
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="default: jsonl")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    command("check", _cmd_check, "check the database against the store contract, on scratch records "
            "of its own (existing records are not touched)", as_json)
    p = command("serve", _cmd_serve, "a live dashboard in the browser (read-only)", wf)
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


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


# -- shared by the commands ---------------------------------------------------

class _Paint:
    """ANSI colours: only on a terminal, never with NO_COLOR set or TERM=dumb."""

    CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34"}

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
    return getattr(args, "db", None) or os.environ.get("LEDGER_DB") or "ledger.db"


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
    return "STALE" if record.stale(now) else record.status


def _record_json(record: Record, now: float) -> dict[str, Any]:
    return {**record.as_dict(), "state": _state(record, now)}


def _print_json(value: Any) -> int:
    print(json.dumps(value, indent=2, ensure_ascii=False))
    return EXIT_OK


def _scope(wf: str | None) -> str:
    return f"workflow {wf!r}" if wf else "all workflows"


# -- show, stats, savings -------------------------------------------------------

def _cmd_show(args: Any) -> int:
    with _opened(args) as guard:
        records = _snapshot(guard, args.wf, args.tool)
    now = time.time()
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
        detail = r.error if r.status == Status.FAILED else r.args
        rows.append([r.id[:8], state, _clean(r.tool)] + [_clean(r.workflow)] * with_workflow
                    + [_clean(r.caller or "-")] * with_caller
                    + [str(r.executed), str(r.blocked), _seconds(r.duration), _clean(detail)])
        styles.append(["dim", _STATE_STYLE[state]] + [None] * (len(headers) - 3)
                      + ["red" if r.status == Status.FAILED else None])
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
    print(f"duplicates  {paint('green', bar)} {stats['duplicate_rate']:.0%} of calls did not run again")
    print(f"saved       {_money(stats['saved_usd'])} and {_seconds(stats['saved_seconds'])} of tool time")
    return EXIT_OK


def _cmd_savings(args: Any) -> int:
    with _opened(args) as guard:
        records = _snapshot(guard, args.wf)
    if args.json:
        return _print_json({"totals": _totals(records),
                            "tools": {tool: _totals(rows) for tool, rows in _by_tool(records).items()}})
    print("\n".join(_savings_report(records, _Paint(sys.stdout))))
    return EXIT_OK


def _savings_report(records: list[Record], paint: _Paint) -> list[str]:
    """Runs avoided, money and time saved, per tool, with a bar chart."""
    total = _totals(records)
    lines = [f"{paint('bold', 'Savings')}: {total['blocked']} of {total['attempts']} calls were duplicates "
             f"and did not run ({total['duplicate_rate']:.0%})",
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


def _cmd_retry(args: Any) -> int:
    with _opened(args) as guard:
        record = _find_record(guard, args.id)
        state = _state(record, time.time())
        if guard.retry_id(record.id):
            print(f"released {record.id} ({_clean(record.tool)}, was {state}): its next call runs again")
        else:
            print(f"{record.id} ({_clean(record.tool)}) is FAILED already, nothing to release: "
                  f"its next call runs again")
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
            writer.writerows(rows)
        else:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"wrote {len(rows)} records to {args.output}", file=sys.stderr)
    return EXIT_OK


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


# -- tail -------------------------------------------------------------------------

_EVENTS = {"RUNNING": "started", "STALE": "stale", "SUCCESS": "ran", "FAILED": "failed"}


def _cmd_tail(args: Any) -> int:
    paint = _Paint(sys.stdout)
    with _opened(args) as guard:
        print(f"following {guard.store.url} ({_scope(args.wf)}); Ctrl-C to stop", file=sys.stderr)
        seen: dict[str, tuple] = {}
        first = True
        try:
            while True:
                now = time.time()
                events, removed = _changes(seen, _snapshot(guard, args.wf), now)
                if first:  # of what was there before, only the latest few
                    events, removed, first = events[-args.last:] if args.last > 0 else [], 0, False
                for event, record, detail in events:
                    if args.json:
                        print(json.dumps({"event": event, "detail": detail, "record": _record_json(record, now)},
                                         ensure_ascii=False))
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
    if state == "FAILED":
        return _clean(r.error)
    if state == "SUCCESS":
        return f"in {_seconds(r.duration)}  {_clean(r.args)}"
    if state == "STALE":
        return f"lease ran out {_seconds(now - r.lease_until)} ago  {_clean(r.args)}"
    return f"by {_clean(r.caller)}  {_clean(r.args)}" if r.caller else _clean(r.args)


def _tail_line(event: str, r: Record, detail: str, paint: _Paint) -> str:
    style = {"ran": "green", "failed": "red", "stale": "yellow", "started": "blue", "blocked": "dim"}[event]
    head = (f"{time.strftime('%H:%M:%S', time.localtime(r.updated))}  {paint(style, event.ljust(7))}  "
            f"{_fit(_clean(r.tool), 20, keep_end=True):<20}  {_fit(_clean(r.workflow), 12):<12}  ")
    return head + _fit(detail, max(16, _width() - 55))


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
          f"{max(0.0, record.lease_until - time.time()):.1f}s more")
    while not record.stale():
        time.sleep(max(0.02, record.lease_until - time.time()))
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


# -- serve: the dashboard ---------------------------------------------------------

def _cmd_serve(args: Any) -> int:
    from http.server import ThreadingHTTPServer
    with _opened(args) as guard:
        board = _Dashboard(guard, args.wf)
        try:
            server = ThreadingHTTPServer((args.host, args.port), _dashboard_handler(board))
        except OSError as e:
            raise LedgerError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; "
                              f"pick another --port") from None
        server.daemon_threads = True
        port = server.server_address[1]
        board.allow_hosts(args.host, port)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        try:
            print(f"ledger dashboard: http://{shown}:{port}/  ({guard.store.url}; Ctrl-C to stop)", flush=True)
            if board.hosts is None:
                print(f"ledger: the dashboard shows tool arguments and results to anyone who can reach "
                      f"{args.host}:{port}", file=sys.stderr)
            server.serve_forever(poll_interval=0.25)
        except KeyboardInterrupt:  # Ctrl-C is how it stops
            pass
        finally:
            server.server_close()
    return EXIT_OK


class _Dashboard:
    """What the page polls: records, totals, per-tool savings, and executed/blocked over time.

    Read-only: it only ever lists records. The time series is sampled from the totals
    (at most once a second while a page polls), since records keep counts, not events.
    """

    def __init__(self, guard: Guard, workflow: str | None):
        import collections
        self.guard, self.workflow = guard, workflow
        self.samples: collections.deque = collections.deque(maxlen=2400)
        self.lock = threading.Lock()
        self.hosts: set[str] | None = None
        self.page, self.csp = _dashboard_page()

    def allow_hosts(self, host: str, port: int) -> None:
        """On a loopback address, answer only requests addressed to it: a web page elsewhere
        that rebinds its own name to 127.0.0.1 then cannot read the ledger."""
        import ipaddress
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            names = ("127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host)
            self.hosts = {f"{name}:{port}" for name in names} | (set(names) if port == 80 else set())

    def state(self) -> dict[str, Any]:
        records = _snapshot(self.guard, self.workflow)
        now = time.time()
        totals = _totals(records, now)
        with self.lock:
            point = (round(now, 3), totals["executed"], totals["blocked"])
            if not self.samples or now - self.samples[-1][0] >= 1 or self.samples[-1][1:] != point[1:]:
                self.samples.append(point)
            series = list(self.samples)
        recent = sorted(records, key=lambda r: r.updated)[-DASHBOARD_ROWS:]
        return {
            "db": self.guard.store.url, "workflow": self.workflow, "now": now,
            "totals": totals, "series": series,
            "tools": {tool: {**_totals(rows, now), "priced": any(r.cost is not None for r in rows)}
                      for tool, rows in _by_tool(records).items()},
            "records": [_record_view(r, now) for r in reversed(recent)],
        }


def _record_view(r: Record, now: float) -> dict[str, Any]:
    view = {k: v for k, v in r.as_dict().items() if k not in ("owner", "sig")}
    if r.result is not None and len(r.result) > 500:
        view["result"] = r.result[:499] + "…"
    view["state"] = _state(r, now)
    return view


def _dashboard_handler(board: _Dashboard) -> type:
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        server_version = f"ledger.py/{__version__}"

        def version_string(self) -> str:
            return self.server_version

        def do_GET(self) -> None:
            self.answer(body=True)

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def refuse(self) -> None:
            self.send(405, "application/json", b'{"error": "the dashboard is read-only: GET only"}',
                      {"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_TRACE = do_CONNECT = refuse

        def answer(self, body: bool) -> None:
            if board.hosts is not None and self.headers.get("Host", "") not in board.hosts:
                return self.send(403, "text/plain", b"unknown Host header", body=body)
            path = self.path.split("?", 1)[0]
            if path == "/":
                return self.send(200, "text/html; charset=utf-8", board.page, body=body)
            if path != "/api/state":
                return self.send(404, "text/plain", b"not found", body=body)
            try:
                data, code = board.state(), 200
            except LedgerError as e:
                data, code = {"error": _clean(e)}, 503
            self.send(code, "application/json", json.dumps(data, ensure_ascii=False).encode(), body=body)

        def send(self, code: int, kind: str, payload: bytes, headers: Mapping[str, str] = {},
                 body: bool = True) -> None:
            self.send_response(code)
            for name, value in {"Content-Type": kind, "Content-Length": str(len(payload)),
                                "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                "Referrer-Policy": "no-referrer", "Content-Security-Policy": board.csp,
                                **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a page polls every 1.5 s; a line per request would drown everything else

    return Handler


def _dashboard_page() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that lets only its own script and style run."""
    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    page = _DASHBOARD_HTML.replace("/*STYLE*/", _DASHBOARD_CSS).replace("/*SCRIPT*/", _DASHBOARD_JS)
    csp = (f"default-src 'none'; script-src {digest(_DASHBOARD_JS)}; style-src {digest(_DASHBOARD_CSS)}; "
           f"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page.encode(), csp


_DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ledger.py dashboard</title>
<link rel="icon" href="data:,">
<style>/*STYLE*/</style>
</head>
<body>
<header>
  <h1>ledger<span>.py</span></h1>
  <div id="db" class="db"></div>
  <div id="live" class="live">connecting…</div>
</header>
<main>
  <section id="totals" class="cards" aria-label="totals"></section>
  <section class="panels">
    <div class="panel">
      <h2>Executed vs blocked <small id="since"></small></h2>
      <svg id="chart" viewBox="0 0 640 170" role="img" aria-label="executed and blocked calls over time"></svg>
      <div class="legend"><span class="key ran"></span>executed <span class="key blk"></span>blocked (did not run)</div>
    </div>
    <div class="panel">
      <h2>Savings by tool <small id="metric"></small></h2>
      <table id="tools" class="tools"><thead><tr><th>tool</th><th class="num">avoided</th><th class="num">money</th>
        <th class="num">time</th><th></th></tr></thead><tbody></tbody></table>
    </div>
  </section>
  <section class="filters" aria-label="filters">
    <label>workflow <select id="f-wf"></select></label>
    <label>tool <select id="f-tool"></select></label>
    <label>status <select id="f-status">
      <option value="">all states</option><option>RUNNING</option><option>STALE</option>
      <option>SUCCESS</option><option>FAILED</option></select></label>
    <span id="count" class="count"></span>
  </section>
  <table id="records" class="records">
    <thead><tr><th>status</th><th>tool</th><th>workflow</th><th>caller</th><th class="num" title="attempts">att</th>
      <th class="num" title="executed">ran</th><th class="num" title="blocked duplicates">blk</th>
      <th class="num">time</th><th>updated</th><th>arguments</th><th>last error</th></tr></thead>
    <tbody id="rows"></tbody>
  </table>
  <p class="foot">Read-only view, refreshed every 1.5 s. Click a row for its details.
    <code>ledger retry ID</code> releases a stale call.</p>
</main>
<script>/*SCRIPT*/</script>
</body>
</html>
"""

_DASHBOARD_CSS = """
:root { --bg: #f5f6f8; --card: #fff; --ink: #18202c; --mute: #677085; --line: #e3e6eb;
  --ran: #2f6fde; --blk: #17a362; --fail: #d63a3a; --stale: #c97a06; --run: #7047d6; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif; }
header { display: flex; align-items: baseline; gap: 16px; padding: 12px 24px; background: #151b26; color: #f3f5f8; }
h1 { margin: 0; font-size: 19px; letter-spacing: .01em; } h1 span { color: #8fa3c4; font-weight: 400; }
.db { flex: 1; color: #9aa6b8; font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.live { font-size: 12px; color: #9aa6b8; white-space: nowrap; }
.live::before { content: "●"; margin-right: 6px; color: #6b7280; }
.live.ok::before { color: #33c27f; } .live.down { color: #ffb4b4; } .live.down::before { color: #ef4444; }
main { max-width: 1440px; margin: 0 auto; padding: 16px 24px 28px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(118px, 1fr)); gap: 10px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 9px 12px; }
.card .k { color: var(--mute); font-size: 11.5px; text-transform: uppercase; letter-spacing: .05em; }
.card .v { font-size: 22px; font-weight: 650; font-variant-numeric: tabular-nums; white-space: nowrap; }
.card.good .v { color: var(--blk); } .card.bad .v { color: var(--fail); } .card.warn .v { color: var(--stale); }
.panels { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 10px; margin-top: 10px; }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
h2 { margin: 0 0 6px; font-size: 13px; text-transform: uppercase; letter-spacing: .05em; color: var(--mute); }
h2 small { text-transform: none; letter-spacing: 0; font-weight: 400; margin-left: 6px; }
svg { width: 100%; height: auto; display: block; }
svg .axis { stroke: #c9ced8; stroke-width: 1; } svg .grid { stroke: #eef0f3; stroke-width: 1; }
svg .ran { fill: none; stroke: var(--ran); stroke-width: 2.2; } svg .blk { fill: none; stroke: var(--blk); stroke-width: 2.2; }
svg text { fill: var(--mute); font-size: 11px; }
.legend { font-size: 12px; color: var(--mute); }
.key { display: inline-block; width: 14px; height: 3px; margin: 0 5px 3px 10px; vertical-align: middle; }
.key.ran { background: var(--ran); } .key.blk { background: var(--blk); }
table { width: 100%; border-collapse: collapse; }
th { text-align: left; font-size: 11.5px; font-weight: 600; color: var(--mute); text-transform: uppercase;
  letter-spacing: .04em; padding: 6px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
td { padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: middle; white-space: nowrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tools td { padding: 4px 8px; } .tools td.bar { width: 40%; }
.fill { height: 10px; border-radius: 3px; background: var(--blk); min-width: 2px; }
.filters { display: flex; flex-wrap: wrap; align-items: center; gap: 14px; margin: 16px 0 8px; color: var(--mute); }
select { font: inherit; padding: 3px 6px; border: 1px solid var(--line); border-radius: 6px; background: #fff; color: var(--ink); }
.count { margin-left: auto; font-size: 12px; }
.records { background: var(--card); border: 1px solid var(--line); border-radius: 8px; }
.records tbody tr { cursor: pointer; } .records tbody tr:hover { background: #f8fafc; }
.mono { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
td.clip { max-width: 0; width: 32%; overflow: hidden; text-overflow: ellipsis; }
td.err { width: 20%; color: var(--fail); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 11px; font-weight: 650; letter-spacing: .03em; }
.badge.SUCCESS { background: #dcf5e7; color: #146c43; } .badge.FAILED { background: #fde2e2; color: #a61d1d; }
.badge.RUNNING { background: #ebe5fc; color: #5031a8; } .badge.STALE { background: #fdf0d5; color: #8a5300; }
tr.fresh { animation: flash 2.5s ease-out; } @keyframes flash { from { background: #fff4c2; } to { background: transparent; } }
tr.detail { cursor: default; background: #fafbfc; } tr.detail:hover { background: #fafbfc; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 4px 0; }
dt { color: var(--mute); } dd { margin: 0; white-space: pre-wrap; word-break: break-all; }
tr.detail td { white-space: normal; }
.empty { text-align: center; color: var(--mute); padding: 22px; }
.foot { color: var(--mute); font-size: 12px; margin-top: 10px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eceff3; padding: 1px 4px; border-radius: 4px; }
@media (max-width: 900px) { .panels { grid-template-columns: 1fr; } }
"""

# Built with textContent and createElement only: records hold untrusted text, and none of it
# is ever parsed as HTML.
_DASHBOARD_JS = """
"use strict";
const POLL_MS = 1500;
const SVG = "http://www.w3.org/2000/svg";
const STATES = new Set(["RUNNING", "STALE", "SUCCESS", "FAILED"]);
const CARDS = [
  ["attempts", "calls", (t) => t.attempts],
  ["executed", "ran", (t) => t.executed],
  ["blocked", "blocked", (t) => t.blocked, "good"],
  ["duplicate_rate", "duplicate rate", (t) => Math.round(t.duplicate_rate * 100) + "%"],
  ["saved_usd", "money saved", (t) => money(t.saved_usd), "good"],
  ["saved_seconds", "time saved", (t) => seconds(t.saved_seconds), "good"],
  ["failed", "failed", (t) => t.failed, "bad"],
  ["running", "running", (t) => t.running],
  ["stale", "stale", (t) => t.stale, "warn"],
];
const ui = { data: null, known: null, open: new Set(), polls: 0 };
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function shape(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}
function money(x) {
  return x >= 0.01 || x === 0 ? "$" + x.toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: 2})
                              : "$" + x.toPrecision(2);
}
function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " m " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
  return Math.floor(s / 3600) + " h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + " m";
}
function ago(s) {
  s = Math.max(0, s);
  if (s < 60) return Math.round(s) + "s ago";
  if (s < 3600) return Math.round(s / 60) + "m ago";
  if (s < 86400) return Math.round(s / 3600) + "h ago";
  return Math.round(s / 86400) + "d ago";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], {hour12: false}); }
function unique(values) { return Array.from(new Set(values)).sort(); }

function setOptions(select, values, allLabel) {
  const current = select.value;
  const wanted = [""].concat(values);
  if (Array.from(select.options, (o) => o.value).join("\\u0000") !== wanted.join("\\u0000")) {
    select.replaceChildren(...wanted.map((v) => new Option(v === "" ? allLabel : v, v)));
  }
  select.value = wanted.includes(current) ? current : "";
}

function buildCards() {
  $("totals").replaceChildren(...CARDS.map(([key, label]) => {
    const card = el("div", null, "card");
    card.dataset.total = key;
    card.append(el("div", label, "k"), el("div", "–", "v"));
    return card;
  }));
}

function renderTotals(totals) {
  for (const [key, , value, tone] of CARDS) {
    const card = document.querySelector('[data-total="' + key + '"]');
    card.querySelector(".v").textContent = value(totals);
    card.className = "card" + (tone && totals[key] > 0 ? " " + tone : "");
  }
}

function renderChart(series, now) {
  const chart = $("chart"), W = 640, H = 170, L = 40, R = 10, T = 10, B = 24;
  const points = series.concat([[now, series.length ? series[series.length - 1][1] : 0,
                                 series.length ? series[series.length - 1][2] : 0]]);
  const t0 = points[0][0], t1 = Math.max(now, t0 + 5);
  const top = Math.max(1, ...points.map((p) => Math.max(p[1], p[2])));
  const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const line = (i) => points.map((p, n) => (n ? x(p[0]).toFixed(1) + "," + y(points[n - 1][i]).toFixed(1) + " " : "")
                                          + x(p[0]).toFixed(1) + "," + y(p[i]).toFixed(1)).join(" ");
  const nodes = [];
  for (const v of [0, top / 2, top]) {
    nodes.push(shape("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: v ? "grid" : "axis"}));
    nodes.push(shape("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, Math.round(v)));
  }
  nodes.push(shape("text", {x: L, y: H - 6}, clock(t0)));
  nodes.push(shape("text", {x: W - R, y: H - 6, "text-anchor": "end"}, clock(now)));
  nodes.push(shape("polyline", {points: line(1), class: "ran"}));
  nodes.push(shape("polyline", {points: line(2), class: "blk"}));
  chart.replaceChildren(...nodes);
  $("since").textContent = "since " + clock(t0) + ", when this dashboard first looked";
}

function renderTools(tools) {
  const entries = Object.entries(tools);
  const sum = (k) => entries.reduce((a, [, t]) => a + t[k], 0);
  const [metric, label] = sum("saved_usd") > 0 ? ["saved_usd", "bars: money saved"]
    : sum("saved_seconds") > 0 ? ["saved_seconds", "bars: time saved"] : ["blocked", "bars: runs avoided"];
  const top = Math.max(...entries.map(([, t]) => t[metric]), 0) || 1;
  entries.sort((a, b) => b[1][metric] - a[1][metric] || b[1].blocked - a[1].blocked || (a[0] < b[0] ? -1 : 1));
  $("metric").textContent = label;
  const rows = entries.map(([tool, t]) => {
    const tr = el("tr");
    const bar = el("td", null, "bar");
    if (t[metric] > 0) {
      const fill = el("div", null, "fill");
      fill.style.width = (100 * t[metric] / top).toFixed(1) + "%";
      bar.append(fill);
    }
    tr.append(el("td", tool, "mono"), el("td", t.blocked, "num"), el("td", t.priced ? money(t.saved_usd) : "–", "num"),
              el("td", seconds(t.saved_seconds), "num"), bar);
    return tr;
  });
  if (!rows.length) {
    const td = el("td", "nothing recorded yet", "empty");
    td.colSpan = 5;
    rows.push(el("tr"));
    rows[0].append(td);
  }
  document.querySelector("#tools tbody").replaceChildren(...rows);
}

function detailRow(r) {
  const tr = el("tr", null, "detail");
  const td = el("td");
  td.colSpan = 11;
  const dl = el("dl", null, "mono");
  const fields = [["id", r.id], ["idempotency key", r.run_key], ["epoch", r.epoch], ["successful runs", r.runs],
    ["created", new Date(r.created * 1000).toLocaleString()], ["arguments", r.args], ["result", r.result],
    ["not stored", r.unstored], ["error", r.error], ["cost per run", r.cost === null ? null : money(r.cost)]];
  for (const [name, value] of fields) {
    if (value === null || value === undefined) continue;
    dl.append(el("dt", name), el("dd", value));
  }
  td.append(dl);
  tr.append(td);
  return tr;
}

function renderRows(records, now) {
  const wf = $("f-wf").value, tool = $("f-tool").value, status = $("f-status").value;
  const shown = records.filter((r) => (!wf || r.workflow === wf) && (!tool || r.tool === tool)
                                      && (!status || r.state === status));
  const rows = [];
  for (const r of shown) {
    const tr = el("tr");
    tr.dataset.id = r.id;
    if (ui.known && !ui.known.has(r.id)) tr.classList.add("fresh");
    const badge = el("span", r.state, "badge");
    if (STATES.has(r.state)) badge.classList.add(r.state);
    if (r.state === "STALE") badge.title = "RUNNING, but its lease ran out: its worker died or stalled";
    const status = el("td");
    status.append(badge);
    const updated = el("td", ago(now - r.updated));
    updated.title = new Date(r.updated * 1000).toLocaleString();
    tr.append(status, el("td", r.tool, "mono"), el("td", r.workflow), el("td", r.caller || "–"),
              el("td", r.attempts, "num"), el("td", r.executed, "num"), el("td", r.blocked, "num"),
              el("td", seconds(r.duration), "num"), updated, el("td", r.args, "mono clip"),
              el("td", r.error, "mono clip err"));
    tr.addEventListener("click", () => {
      if (ui.open.has(r.id)) ui.open.delete(r.id); else ui.open.add(r.id);
      render();
    });
    rows.push(tr);
    if (ui.open.has(r.id)) rows.push(detailRow(r));
  }
  if (!rows.length) {
    const td = el("td", records.length ? "no call matches these filters" : "no calls recorded yet", "empty");
    td.colSpan = 11;
    rows.push(el("tr"));
    rows[0].append(td);
  }
  $("rows").replaceChildren(...rows);
  const total = ui.data.totals.actions;
  $("count").textContent = shown.length + " of " + total + " calls"
    + (records.length < total ? " (the table holds the " + records.length + " most recent)" : "");
}

function render() {
  const d = ui.data;
  if (!d) return;
  $("db").textContent = d.db + (d.workflow ? "  ·  workflow " + d.workflow : "");
  renderTotals(d.totals);
  renderChart(d.series, d.now);
  renderTools(d.tools);
  setOptions($("f-wf"), unique(d.records.map((r) => r.workflow)), "all workflows");
  setOptions($("f-tool"), unique(d.records.map((r) => r.tool)), "all tools");
  renderRows(d.records, d.now);
}

function setLive(ok, text) {
  $("live").className = "live " + (ok ? "ok" : "down");
  $("live").textContent = text;
}

async function poll() {
  try {
    const response = await fetch("api/state", {cache: "no-store"});
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    ui.data = data;
    render();
    ui.known = new Set(data.records.map((r) => r.id));
    setLive(true, "live · " + clock(data.now));
    document.body.dataset.polls = String(++ui.polls);
  } catch (error) {
    setLive(false, "cannot read the ledger: " + error.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

buildCards();
for (const id of ["f-wf", "f-tool", "f-status"]) $(id).addEventListener("change", render);
poll();
"""


if __name__ == "__main__":
    sys.exit(main())
