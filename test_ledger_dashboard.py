"""Tests of ledger_dashboard.py, the dashboard `ledger serve` loads: in the order of its
code (serving, what /api/state answers, HTTP, the page), against a real `python ledger.py
serve` process and, for the page, a real headless Chromium (marked slow)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

import ledger
from ledger import Guard

from conftest import LEDGER_PY, XSS, Lines, interruptible, need, records_of  # fixtures come from there too

HERE = pathlib.Path(__file__).resolve().parent


@contextlib.contextmanager
def serving(db, *options: str):
    """`python ledger.py serve` on a free port; yields its URL and stops it with Ctrl-C."""
    proc = subprocess.Popen([sys.executable, LEDGER_PY, "serve", "--db", str(db), "--port", "0", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        line = Lines(proc.stdout).until("http://")
        yield line.split()[2]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert "Traceback" not in proc.stderr.read()
        proc.stderr.close()


def http(method: str, url: str, headers: dict | None = None):
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def api_state(db, *options: str) -> dict:
    with serving(db, *options) as url:
        return json.loads(http("GET", url + "api/state")[2])


# ---------------------------------------------------------------------------
# Serving: `ledger serve` loads this companion file, or says which file to copy.
# ---------------------------------------------------------------------------

def test_serve_listens_on_loopback_and_serves_one_self_contained_page(ledger_db):
    with serving(ledger_db) as url:
        assert url.startswith("http://127.0.0.1:")
        status, headers, body = http("GET", url)
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "<script>" in page and "<style>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing from a CDN
    assert "script-src 'sha256-" in headers["Content-Security-Policy"]


def test_serve_without_ledger_dashboard_py_says_in_one_line_which_file_to_copy(tmp_path):
    alone = tmp_path / "ledger.py"
    shutil.copy(LEDGER_PY, alone)
    # -I -S: nothing but the copy's folder is importable, as for a user who copied ledger.py alone
    done = subprocess.run([sys.executable, "-I", "-S", str(alone), "serve", "--db", str(tmp_path / "ledger.db")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode == ledger.EXIT_USAGE and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("ledger: ")
    assert "ledger_dashboard.py: copy it next to ledger.py" in done.stderr and str(tmp_path) in done.stderr
    assert "pip install tool-ledger" in done.stderr


def test_serve_run_as_a_script_hands_the_companion_the_running_module(ledger_db):
    # Had ledger_dashboard's `import ledger` loaded a second copy of ledger.py, the LedgerError it
    # raises would be another class than the one `python ledger.py`'s main() catches: a traceback.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, LEDGER_PY, "serve", "--db", str(ledger_db), "--port", str(port)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode == ledger.EXIT_USAGE and done.stdout == ""
    assert done.stderr.startswith(f"ledger: cannot listen on 127.0.0.1:{port}: ") and done.stderr.count("\n") == 1
    assert "pick another --port" in done.stderr


# ---------------------------------------------------------------------------
# What /api/state answers: every record and the totals, each number with the
# text ledger's CLI formatters make of it.
# ---------------------------------------------------------------------------

def test_dashboard_state_holds_every_record_and_the_totals(ledger_db):
    with serving(ledger_db) as url:
        status, headers, body = http("GET", url + "api/state")
    state = json.loads(body)
    stats = Guard(str(ledger_db), quiet=True).stats()
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert len(state["records"]) == 5 and {k: state["totals"][k] for k in ("attempts", "blocked", "saved_usd")} == \
        {k: stats[k] for k in ("attempts", "blocked", "saved_usd")}
    assert state["tools"]["crm.lookup"]["saved_usd"] == 0.75 and state["series"][-1][1:] == [5, 4]
    assert "sig" not in state["records"][0] and "owner" not in state["records"][0]


def test_dashboard_of_one_workflow(ledger_db):
    with serving(ledger_db, "--wf", "triage") as url:
        state = json.loads(http("GET", url + "api/state")[2])
    assert [r["workflow"] for r in state["records"]] == ["triage"]


def test_dashboard_counts_unknown_calls(unknown_db):
    state = api_state(unknown_db)
    assert state["totals"]["unknown"] == 1 and {r["state"] for r in state["records"]} == {"SUCCESS", "UNKNOWN"}


def test_dashboard_state_sends_each_number_with_the_text_of_the_cli_formatters(ledger_db):
    state = api_state(ledger_db)
    totals = state["totals"]
    assert totals["text"] == {**{k: str(v) for k, v in totals.items() if k not in ("text", "priced")},
                              "duplicate_rate": ledger._percent(totals["duplicate_rate"]),
                              "saved_usd": ledger._money(totals["saved_usd"]),
                              "saved_seconds": ledger._seconds(totals["saved_seconds"])}
    assert totals["text"]["saved_usd"] == "$0.75" and totals["text"]["duplicate_rate"] == "44%"
    tools = state["tools"]
    assert tools["crm.lookup"]["text"]["saved_usd"] == "$0.75"
    assert tools["charge_card"]["text"]["saved_usd"] == "-"  # no cost= in its policy: nothing to count
    for r in state["records"]:
        assert r["text"]["duration"] == ledger._seconds(r["duration"])
        assert r["text"]["cost"] == (None if r["cost"] is None else ledger._money(r["cost"]))
        assert r["text"]["created"] == ledger._when(r["created"])
    by_tool = {r["tool"]: r for r in state["records"]}
    assert by_tool["crm.lookup"]["text"]["cost"] == "$0.25"
    assert by_tool["nightly_job"]["state"] == ledger.STALE and "lease ran out" in by_tool["nightly_job"]["text"]["hint"]
    assert state["text"]["now"] == ledger._clock(state["now"])


# ---------------------------------------------------------------------------
# HTTP: GET and HEAD only, only requests addressed to it, and a CSP on every answer.
# ---------------------------------------------------------------------------

def test_dashboard_is_read_only(ledger_db):
    before = records_of(ledger_db)
    with serving(ledger_db) as url:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            for path in ("", "api/state"):
                status, headers, _ = http(method, url + path)
                assert (status, headers.get("Allow")) == (405, "GET, HEAD")
        assert http("GET", url + "api/clear")[0] == 404
    assert records_of(ledger_db) == before


def test_dashboard_answers_only_requests_addressed_to_it(ledger_db):
    with serving(ledger_db) as url:
        assert http("GET", url + "api/state", {"Host": "attacker.example"})[0] == 403
        assert http("GET", url.replace("127.0.0.1", "localhost") + "api/state")[0] == 200


def test_every_answer_lets_only_the_pages_own_script_and_style_run(ledger_db):
    with serving(ledger_db) as url:
        answers = [http("GET", url + path) for path in ("", "api/state", "missing")]
    page = answers[0][2].decode()

    def digest(inline: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode() + "'"
    script, = re.findall(r"<script>(.*?)</script>", page, re.S)
    style, = re.findall(r"<style>(.*?)</style>", page, re.S)
    csp = answers[0][1]["Content-Security-Policy"]
    assert f"script-src {digest(script)};" in csp and f"style-src {digest(style)};" in csp
    assert csp.startswith("default-src 'none';") and "connect-src 'self';" in csp
    assert all(headers["Content-Security-Policy"] == csp for _, headers, _ in answers)


# ---------------------------------------------------------------------------
# The page: its states come from ledger.STATES, and in a real browser it shows
# every record, filters them, escapes every value and follows new calls.
# ---------------------------------------------------------------------------

def test_the_state_filter_badges_and_cards_come_from_ledgers_states(ledger_db):
    with serving(ledger_db) as url:
        page = http("GET", url)[2].decode()
    script, = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert re.findall(r"<option>(\w+)</option>", page) == list(ledger.STATES)
    assert set(ledger.STATES) == {*ledger.Status, ledger.STALE}
    for state in ledger.STATES:
        assert f'.badge[data-state="{state}"] {{ background: ' in page
        assert state not in script and f'"{state.lower()}"' not in script
    counted = [state.lower() for state in ledger.STATES if state.lower() in ledger._totals([])]
    assert counted == ["running", "stale", "failed", "unknown"]
    assert [key for key in re.findall(r'data-total="(\w+)"', page) if key in counted] == counted


@pytest.mark.slow
def test_dashboard_in_a_real_browser(ledger_db):
    import importlib.util
    import shutil
    chromium = os.environ.get("LEDGER_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    need("Chromium", os.path.exists(chromium), "apt-get install chromium (or set LEDGER_TEST_CHROMIUM)")
    need("playwright", importlib.util.find_spec("playwright") is not None, "pip install -e '.[browser]'")
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=15_000)  # generous on a loaded machine; a pass takes a few seconds
    records = records_of(ledger_db)
    with serving(ledger_db) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            dialogs, errors = [], []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(url)  # waits go through locators: the page's CSP forbids the eval() of wait_for_function
            rows = page.locator("#rows tr[data-id]")
            expect(rows).to_have_count(5)
            expect(page.locator('[data-total="attempts"] .v')).to_have_text("9")
            expect(page.locator('[data-total="blocked"] .v')).to_have_text("4")
            expect(page.locator('[data-total="saved_usd"] .v')).to_have_text("$0.75")
            expect(page.locator('[data-total="stale"] .v')).to_have_text("1")

            # Untrusted text is shown as text: no element made of it, no script run.
            expect(rows.filter(has_text=XSS)).to_have_count(1)
            expect(rows.filter(has_text="<svg onload=alert(2)>")).to_have_count(1)
            assert page.locator("#rows img, #rows svg").count() == 0
            rows.filter(has_text=XSS).click()
            expect(page.locator("tr.detail dd").filter(has_text=XSS)).to_have_count(2)  # arguments, and the result echoing them

            # What the page shows for a duration and for money is what the CLI's formatters print.
            charged = next(r for r in records if r["tool"] == "charge_card")
            expect(rows.filter(has_text="charge_card").locator("td.duration")).to_have_text(
                ledger._seconds(charged["duration"]))
            expect(page.locator('#tools tr[data-tool="crm.lookup"] td').nth(2)).to_have_text(ledger._money(0.75))
            expect(page.locator('[data-total="saved_seconds"] .v')).to_have_text(
                ledger._seconds(sum(r["blocked"] * (r["duration"] or 0) for r in records)))
            rows.filter(has_text="acme corp").click()  # the XSS one is open too: both crm.lookup calls, both priced
            expect(page.locator("tr.detail dd").filter(has_text=ledger._money(0.25))).to_have_count(2)

            # Every state of the vocabulary is in the filter, and each one filters.
            expect(page.locator("#f-status option")).to_have_text(["all states", *ledger.STATES])
            now = ledger.SQLiteStore(ledger_db, create=False).now()
            for state in ledger.STATES:
                page.select_option("#f-status", state)
                expect(rows).to_have_count(sum(ledger._state(ledger.Record(**r), now) == state for r in records))
            page.select_option("#f-status", "FAILED")
            expect(rows.first).to_contain_text("flaky_api")
            page.select_option("#f-status", "STALE")
            expect(rows.first).to_contain_text("nightly_job")
            page.select_option("#f-status", "")
            page.select_option("#f-wf", "triage")
            expect(rows).to_have_count(1)
            page.select_option("#f-wf", "")
            page.select_option("#f-tool", "crm.lookup")
            expect(rows).to_have_count(2)
            page.select_option("#f-tool", "")

            g = Guard(str(ledger_db), quiet=True)
            g.wrap_tools({"fresh_tool": lambda n: n})["fresh_tool"](n=1)
            g.close()
            expect(rows).to_have_count(6)  # the next poll brings it
            expect(rows.first).to_contain_text("fresh_tool")
            expect(page.locator('[data-total="executed"] .v')).to_have_text("6")

            (HERE / "artifacts").mkdir(exist_ok=True)
            page.screenshot(path=str(HERE / "artifacts" / "dashboard-test.png"), full_page=True)
            assert (dialogs, errors) == ([], [])
        finally:
            browser.close()
