"""ledger_dashboard.py: the live dashboard of a ledger, behind `ledger serve`.

Run it through ledger.py's command line, which declares its options::

    python ledger.py serve --db ledger.db            # http://127.0.0.1:4242/
    python ledger.py serve --db ledger.db --port 8080 --wf order-7

This file sits beside ledger.py and imports it (``pip install tool-ledger`` installs
both; a user who copied ledger.py copies this file next to it). It adds nothing to
the guarantee: it only reads records through ``Guard.history``.

What it shows: one self-contained page that polls ``/api/state`` every 1.5 seconds:
the totals and the savings, executed and blocked calls over time, savings per tool,
and the most recent calls with their state, filterable by workflow, tool and state.

Read-only: it lists records and nothing else, and answers GET and HEAD only (any other
method gets 405).

Security: on a loopback address (the default, 127.0.0.1) it answers only requests whose
Host header names that address, so a web page elsewhere cannot read the ledger by
rebinding its own name to 127.0.0.1. Records hold untrusted text: the page builds every
element with textContent, never by parsing HTML, and its Content-Security-Policy lets
only its own inline script and style run (by their hashes) and fetch only from itself.

One vocabulary and one set of formatters: the states are ledger's (``Status`` plus
``STALE``), and durations, money and times arrive at the page formatted by ledger's
CLI formatters, so the page's script only places text.

Sections, in the order they are used: serving (`ledger serve`) -> what /api/state
answers -> the HTTP handler -> the page.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import ipaddress
import json
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import ledger
from ledger import STATES, Guard, LedgerError, Record, Status

DASHBOARD_ROWS = 1000  # the most recently active calls the table holds; the totals count them all


# ---------------------------------------------------------------------------
# Serving: `ledger serve` (ledger.py parses its options and calls serve()).
# Listens until Ctrl-C on an existing database, which it never writes to.
# A loopback address answers only requests addressed to it; any other address
# is said on stderr to show tool arguments and results to whoever reaches it.
# ---------------------------------------------------------------------------

def serve(args: Any) -> int:
    """Serve the dashboard of the ledger `args.db` names (of `args.wf` only, if given) on
    `args.host`:`args.port`. Returns ledger's exit code."""
    with ledger._opened(args) as guard:
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
    return ledger.EXIT_OK


# ---------------------------------------------------------------------------
# What /api/state answers: records, totals, per-tool savings, and executed/
# blocked over time. Every number the page shows comes with its text, made by
# ledger's CLI formatters (`_seconds`, `_money`, `_percent`, `_clock`), under
# "text": the page formats nothing itself. Records lose their owner token and
# signature; a long result is cut to 500 characters.
# ---------------------------------------------------------------------------

# How each total is written; a count is written as itself.
_TOTAL_TEXT = {"duplicate_rate": ledger._percent, "saved_usd": ledger._money, "saved_seconds": ledger._seconds}
# What a state's badge says when the pointer rests on it.
_STATE_HINT = {
    ledger.STALE: "RUNNING, but its lease ran out: its worker died or stalled",
    Status.UNKNOWN.value: "it may or may not have taken effect: check by its key, then ledger resolve ID",
}


class _Dashboard:
    """What the page polls. Read-only: it only ever lists records. The time series is
    sampled from the totals (at most once a second while a page polls), since records
    keep counts, not events."""

    def __init__(self, guard: Guard, workflow: str | None):
        self.guard, self.workflow = guard, workflow
        self.samples: collections.deque = collections.deque(maxlen=2400)
        self.lock = threading.Lock()
        self.hosts: set[str] | None = None
        self.page, self.csp = _dashboard_page()

    def allow_hosts(self, host: str, port: int) -> None:
        """On a loopback address, answer only requests addressed to it: a web page elsewhere
        that rebinds its own name to 127.0.0.1 then cannot read the ledger."""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            names = ("127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host)
            self.hosts = {f"{name}:{port}" for name in names} | (set(names) if port == 80 else set())

    def state(self) -> dict[str, Any]:
        records = ledger._snapshot(self.guard, self.workflow)
        now, clock = time.time(), self.guard.store.now()
        totals = ledger._totals(records, clock)
        with self.lock:
            point = (round(now, 3), totals["executed"], totals["blocked"])
            if not self.samples or now - self.samples[-1][0] >= 1 or self.samples[-1][1:] != point[1:]:
                self.samples.append(point)
            series = list(self.samples)
        recent = sorted(records, key=lambda r: r.updated)[-DASHBOARD_ROWS:]
        return {
            "db": self.guard.store.url, "workflow": self.workflow, "now": now,
            "text": {"now": ledger._clock(now), "since": ledger._clock(series[0][0])},
            "totals": _with_text(totals), "series": series,
            "tools": {tool: _with_text(ledger._totals(rows, clock), priced=any(r.cost is not None for r in rows))
                      for tool, rows in ledger._by_tool(records).items()},
            "records": [_record_view(r, clock) for r in reversed(recent)],
        }


def _with_text(totals: dict[str, Any], priced: bool = True) -> dict[str, Any]:
    """Totals with each one's text; money saved is "-" for a tool without a cost= policy."""
    text = {key: _TOTAL_TEXT.get(key, str)(value) for key, value in totals.items()}
    if not priced:
        text["saved_usd"] = "-"
    return {**totals, "priced": priced, "text": text}


def _record_view(r: Record, now: float) -> dict[str, Any]:
    view = {k: v for k, v in r.as_dict().items() if k not in ("owner", "sig")}
    if r.result is not None and len(r.result) > 500:
        view["result"] = r.result[:499] + "…"
    view["state"] = state = ledger._state(r, now)
    view["text"] = {
        "duration": ledger._seconds(r.duration),
        "updated": ledger._seconds(max(0.0, now - r.updated)) + " ago",
        "updated_at": ledger._when(r.updated), "created": ledger._when(r.created),
        "cost": None if r.cost is None else ledger._money(r.cost),
        "hint": _STATE_HINT.get(state),
    }
    return view


# ---------------------------------------------------------------------------
# HTTP: GET or HEAD of "/" (the page) and "/api/state" (JSON), nothing else.
# Every answer carries the page's Content-Security-Policy and is never cached;
# a request whose Host header is not the dashboard's own (on loopback) gets 403,
# any other method 405, and a store that cannot be read 503 with its message.
# ---------------------------------------------------------------------------

def _dashboard_handler(board: _Dashboard) -> type:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"ledger.py/{ledger.__version__}"

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
                data, code = {"error": ledger._clean(e)}, 503
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


# ---------------------------------------------------------------------------
# The page: HTML, CSS and a script, inline, loading nothing from elsewhere.
# Its state filter, its badge colours and the cards of the states come from
# ledger.STATES: a state added there without a look here fails at import. The
# script holds no state names and no formatting: it places the text
# /api/state sends, with textContent and createElement only.
# ---------------------------------------------------------------------------

# Each state's badge (background, text colour) and the tone its card takes while it is not zero.
_STATE_LOOK = {
    Status.RUNNING.value: ("#ebe5fc", "#5031a8", ""),
    ledger.STALE: ("#fdf0d5", "#8a5300", "warn"),
    Status.SUCCESS.value: ("#dcf5e7", "#146c43", ""),
    Status.FAILED.value: ("#fde2e2", "#a61d1d", "bad"),
    Status.UNKNOWN.value: ("#fbe0f3", "#8c1d6b", "bad"),
}
# The cards of the totals: (key in the totals, label, tone while it is not zero); then one
# card per state the totals count.
_CARDS = [("attempts", "calls", ""), ("executed", "ran", ""), ("blocked", "blocked", "good"),
          ("duplicate_rate", "duplicate rate", ""), ("saved_usd", "money saved", "good"),
          ("saved_seconds", "time saved", "good"),
          *((state.lower(), state.lower(), _STATE_LOOK[state][2]) for state in STATES
            if state.lower() in ledger._totals([]))]


def _dashboard_page() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that lets only its own script and style run."""
    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    style = _DASHBOARD_CSS + "".join(f'.badge[data-state="{state}"] {{ background: {_STATE_LOOK[state][0]}; '
                                     f'color: {_STATE_LOOK[state][1]}; }}\n' for state in STATES)
    cards = "".join(f'<div class="card" data-total="{key}" data-tone="{tone}"><div class="k">{label}</div>'
                    f'<div class="v">–</div></div>' for key, label, tone in _CARDS)
    options = "".join(f"<option>{state}</option>" for state in STATES)
    page = (_DASHBOARD_HTML.replace("/*STYLE*/", style).replace("/*SCRIPT*/", _DASHBOARD_JS)
            .replace("/*CARDS*/", cards).replace("/*STATES*/", options))
    csp = (f"default-src 'none'; script-src {digest(_DASHBOARD_JS)}; style-src {digest(style)}; "
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
  <section id="totals" class="cards" aria-label="totals">/*CARDS*/</section>
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
      <option value="">all states</option>/*STATES*/</select></label>
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
# is ever parsed as HTML. Every text it shows comes formatted, under "text", from /api/state.
_DASHBOARD_JS = """
"use strict";
const POLL_MS = 1500;
const SVG = "http://www.w3.org/2000/svg";
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
function unique(values) { return Array.from(new Set(values)).sort(); }

function setOptions(select, values, allLabel) {
  const current = select.value;
  const wanted = [""].concat(values);
  if (Array.from(select.options, (o) => o.value).join("\\u0000") !== wanted.join("\\u0000")) {
    select.replaceChildren(...wanted.map((v) => new Option(v === "" ? allLabel : v, v)));
  }
  select.value = wanted.includes(current) ? current : "";
}

function renderTotals(totals) {
  for (const card of document.querySelectorAll("[data-total]")) {
    const key = card.dataset.total, tone = card.dataset.tone;
    card.querySelector(".v").textContent = totals.text[key];
    card.className = "card" + (tone && totals[key] > 0 ? " " + tone : "");
  }
}

function renderChart(series, now, text) {
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
  nodes.push(shape("text", {x: L, y: H - 6}, text.since));
  nodes.push(shape("text", {x: W - R, y: H - 6, "text-anchor": "end"}, text.now));
  nodes.push(shape("polyline", {points: line(1), class: "ran"}));
  nodes.push(shape("polyline", {points: line(2), class: "blk"}));
  chart.replaceChildren(...nodes);
  $("since").textContent = "since " + text.since + ", when this dashboard first looked";
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
    tr.dataset.tool = tool;
    const bar = el("td", null, "bar");
    if (t[metric] > 0) {
      const fill = el("div", null, "fill");
      fill.style.width = (100 * t[metric] / top).toFixed(1) + "%";
      bar.append(fill);
    }
    tr.append(el("td", tool, "mono"), el("td", t.text.blocked, "num"), el("td", t.text.saved_usd, "num"),
              el("td", t.text.saved_seconds, "num"), bar);
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
    ["created", r.text.created], ["arguments", r.args], ["result", r.result],
    ["not stored", r.unstored], ["error", r.error], ["cost per run", r.text.cost]];
  for (const [name, value] of fields) {
    if (value === null || value === undefined) continue;
    dl.append(el("dt", name), el("dd", value));
  }
  td.append(dl);
  tr.append(td);
  return tr;
}

function renderRows(records) {
  const wf = $("f-wf").value, tool = $("f-tool").value, status = $("f-status").value;
  const shown = records.filter((r) => (!wf || r.workflow === wf) && (!tool || r.tool === tool)
                                      && (!status || r.state === status));
  const rows = [];
  for (const r of shown) {
    const tr = el("tr");
    tr.dataset.id = r.id;
    if (ui.known && !ui.known.has(r.id)) tr.classList.add("fresh");
    const badge = el("span", r.state, "badge");
    badge.dataset.state = r.state;
    if (r.text.hint) badge.title = r.text.hint;
    const status = el("td");
    status.append(badge);
    const updated = el("td", r.text.updated, "updated");
    updated.title = r.text.updated_at;
    tr.append(status, el("td", r.tool, "mono"), el("td", r.workflow), el("td", r.caller || "-"),
              el("td", r.attempts, "num"), el("td", r.executed, "num"), el("td", r.blocked, "num"),
              el("td", r.text.duration, "num duration"), updated, el("td", r.args, "mono clip"),
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
  renderChart(d.series, d.now, d.text);
  renderTools(d.tools);
  setOptions($("f-wf"), unique(d.records.map((r) => r.workflow)), "all workflows");
  setOptions($("f-tool"), unique(d.records.map((r) => r.tool)), "all tools");
  renderRows(d.records);
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
    setLive(true, "live · " + data.text.now);
    document.body.dataset.polls = String(++ui.polls);
  } catch (error) {
    setLive(false, "cannot read the ledger: " + error.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

for (const id of ["f-wf", "f-tool", "f-status"]) $(id).addEventListener("change", render);
poll();
"""
