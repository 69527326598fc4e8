"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

tests/dashboard.rs seeds a database with 35 days of history and runs this
suite with TOLLGATE_BIN and TOLLGATE_DASHBOARD_DB. The suite starts the real
tollgate on that database in front of a small mock upstream, sends a few real
requests through it, and then checks what the page shows against what the
REST API answers to the admin key: the same numbers, to the cent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from decimal import ROUND_HALF_UP, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

for _var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

ADMIN = "admin-secret-for-the-browser-suite"
CHROMIUM = os.environ.get("TOLLGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---- HTTP helpers -----------------------------------------------------------


def call(url: str, method: str = "GET", body: object | None = None, headers: dict | None = None):
    """(status, raw body, parsed JSON or None); money stays Decimal."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _http.open(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        doc = json.loads(raw, parse_float=Decimal)
    except ValueError:
        doc = None
    return status, raw, doc


def admin_get(tg, path: str):
    status, raw, doc = call(f"{tg.base}/{path}", headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200, (path, raw)
    return doc


def money(v) -> str:
    """The page's money format: dollars rounded half up to the cent."""
    d = Decimal(str(v)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"${d:,.2f}".replace("$-", "-$")


def is_openai_error(doc, code: str | None = None) -> bool:
    return (
        isinstance(doc, dict)
        and set(doc) == {"error"}
        and {"message", "type", "param", "code"} <= set(doc["error"])
        and (code is None or doc["error"]["code"] == code)
    )


# ---- the mock upstream ------------------------------------------------------


class Upstream(BaseHTTPRequestHandler):
    """Chat completions with usage and x-ratelimit-* headers; the model
    `broken-model` gets a 503."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        model = body.get("model", "")
        if model == "broken-model":
            doc, status = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}, 503
        else:
            prompt = int(body.get("messages", [{}])[0].get("content", "1000"))
            doc, status = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1767225600,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": 321, "total_tokens": prompt + 321},
            }, 200
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ratelimit-limit-requests", "500")
        self.send_header("x-ratelimit-remaining-requests", "420")
        self.send_header("x-ratelimit-reset-requests", "1s")
        self.send_header("x-ratelimit-limit-tokens", "300000")
        self.send_header("x-ratelimit-remaining-tokens", "150000")
        self.send_header("x-ratelimit-reset-tokens", "6m0s")
        self.end_headers()
        self.wfile.write(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tollgate:
    def __init__(self, base: str, keys: dict[str, str]):
        self.base = base
        self.keys = keys


@pytest.fixture(scope="module")
def tollgate(tmp_path_factory):
    binary = os.environ.get("TOLLGATE_BIN")
    db = os.environ.get("TOLLGATE_DASHBOARD_DB")
    if not binary or not db:
        pytest.fail("TOLLGATE_BIN and TOLLGATE_DASHBOARD_DB must be set (cargo test --test dashboard sets them)")
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    tmp = tmp_path_factory.mktemp("tollgate")
    log = tmp / "tollgate.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env["TOLLGATE_ADMIN_TOKEN"] = ADMIN
    env["TOLLGATE_UPSTREAM_TOKEN"] = "sk-upstream"
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{upstream.server_port}",
             "--db", db, "--auth", "keys"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"tollgate exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            call(f"{base}/healthz")
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("tollgate did not answer within 30 s")
            time.sleep(0.05)
    # alice and bob work on search (their keys are bound to it); carol is in no project.
    status, raw, _ = call(f"{base}/projects/search", "PUT", {"members": ["alice", "bob"]},
                          {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, raw
    status, raw, _ = call(f"{base}/projects/search/limits", "PUT", {"budget": 500, "period": "month"},
                          {"Authorization": f"Bearer {ADMIN}"})
    assert status == 200, raw
    keys = {}
    for user in ("alice", "bob", "carol"):
        status, raw, doc = call(f"{base}/users/{user}/keys", "POST", headers={"Authorization": f"Bearer {ADMIN}"})
        assert status == 201, raw
        keys[user] = doc["key"]
    # Today's records, through the real proxy: alice and bob on priced
    # models, and one request upstream refuses.
    for user, model, prompt in [("alice", "gpt-4o", 40000), ("alice", "gpt-4o", 1234), ("bob", "gpt-4o-mini", 5000),
                                ("bob", "broken-model", 10), ("carol", "gpt-4o", 77777)]:
        status, raw, _ = call(f"{base}/v1/chat/completions", "POST",
                              {"model": model, "messages": [{"role": "user", "content": str(prompt)}]},
                              {"Authorization": f"Bearer {keys[user]}"})
        assert status == (503 if model == "broken-model" else 200), raw
    # alice is over a small all-time budget; bob is far under a huge one.
    for user, limits in [("alice", {"budget": 1, "period": "total"}), ("bob", {"budget": 100000, "period": "month"})]:
        status, raw, _ = call(f"{base}/users/{user}/limits", "PUT", limits, {"Authorization": f"Bearer {ADMIN}"})
        assert status == 200, raw
    yield Tollgate(base, keys)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=20) == 0, log.read_text(errors="replace")[-4000:]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("tollgate did not stop on SIGTERM")
    upstream.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


SHOTS = Path(os.environ.get("TOLLGATE_DASHBOARD_SHOTS", "/nonexistent"))


def shot(page, name: str):
    """Screenshots of the main views: kept in docs/ when asked for
    (TOLLGATE_DASHBOARD_SHOTS=docs), else taken and dropped."""
    if SHOTS.is_dir():
        page.screenshot(path=str(SHOTS / name), full_page=True)
    else:
        page.screenshot(full_page=True)


def login(page, tg, key: str):
    page.goto(f"{tg.base}/dashboard")
    page.fill("#login-key", key)
    page.click("#login-submit")
    expect(page.locator("#main")).to_be_visible()
    # Every section finished loading.
    expect(page.locator("#spend-totals tbody tr").first).to_be_visible()
    expect(page.locator("#recent-table tbody tr").first).to_be_visible()


def table(page, selector: str) -> list[list[str]]:
    return page.eval_on_selector_all(
        f"{selector} tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))"
    )


def cookie_header(page) -> dict:
    c = {c["name"]: c["value"] for c in page.context.cookies()}
    return {"Cookie": f"tollgate_session={c['tollgate_session']}"}


# ---- the tests ---------------------------------------------------------------


def test_a_wrong_admin_key_is_refused(page, tollgate):
    status, _, doc = call(f"{tollgate.base}/dashboard/login", "POST", {"key": "not-the-admin-key"})
    assert status == 401 and is_openai_error(doc, "invalid_api_key"), doc
    status, _, doc = call(f"{tollgate.base}/usage", headers={"Authorization": "Bearer not-the-admin-key"})
    assert status == 401 and is_openai_error(doc, "invalid_api_key"), doc
    page.goto(f"{tollgate.base}/dashboard")
    page.fill("#login-key", "not-the-admin-key")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_contain_text("Incorrect key")
    expect(page.locator("#main")).to_be_hidden()
    assert page.context.cookies() == []
    shot(page, "dashboard-login-refused.png")


def test_spend_chart_and_top_tables_equal_usage(page, tollgate):
    login(page, tollgate, ADMIN)
    spend = page.locator("#spend")
    totals = admin_get(tollgate, spend.get_attribute("data-totals-query"))
    assert {"gpt-4o", "gpt-4o-mini", "o4-mini"} <= {r["model"] for r in totals}
    want = sorted(((r["model"], money(r["cost"])) for r in totals), key=lambda r: r[0])
    assert sorted(map(tuple, table(page, "#spend-totals"))) == want
    # The chart: one stacked series per model, each day's bar the API's day.
    by_day = admin_get(tollgate, spend.get_attribute("data-query"))
    chart = page.evaluate(
        "() => { const c = Chart.getChart('spend-chart');"
        " return {labels: c.data.labels, sets: c.data.datasets.map(d => ({label: d.label, exact: d.exact}))}; }"
    )
    assert sorted(s["label"] for s in chart["sets"]) == sorted(r["model"] for r in totals)
    assert len(chart["labels"]) == 30
    seen = 0
    for s in chart["sets"]:
        for day, exact in zip(chart["labels"], s["exact"]):
            rows = [r for r in by_day if r["day"] == day and r["model"] == s["label"]]
            assert Decimal(exact) == (rows[0]["cost"] if rows else 0), (day, s["label"])
            seen += bool(rows)
    assert seen == len(by_day) and seen > 20
    # Top users and models, by cost, with requests and tokens.
    for g in ("user", "model"):
        box = page.locator(f"#top-{g}")
        rows = admin_get(tollgate, box.get_attribute("data-query"))
        rows.sort(key=lambda r: r["cost"], reverse=True)
        want = [[r[g], f"{r['numQueries']:,}", f"{r['queryTokens'] + r['answerTokens']:,}", money(r["cost"])]
                for r in rows[:10]]
        assert table(page, f"#top-{g}") == want
    shot(page, "dashboard.png")


def test_switching_grouping_and_periods(page, tollgate):
    login(page, tollgate, ADMIN)
    page.select_option("#spend-group", "user")
    expect(page.locator("#spend-key")).to_have_text("user")
    page.wait_for_function("() => document.getElementById('spend').dataset.totalsQuery.includes('group_by=user')")
    totals = admin_get(tollgate, page.locator("#spend").get_attribute("data-totals-query"))
    assert sorted(map(tuple, table(page, "#spend-totals"))) == sorted((r["user"], money(r["cost"])) for r in totals)
    labels = page.evaluate("() => Chart.getChart('spend-chart').data.datasets.map(d => d.label)")
    assert sorted(labels) == ["alice", "bob", "carol"]
    # 90 days covers the whole history: more than 30 days.
    page.select_option("#spend-range", "90")
    page.wait_for_function("() => Chart.getChart('spend-chart').data.labels.length === 90")
    all_time = admin_get(tollgate, "usage?group_by=user")
    assert sorted(map(tuple, table(page, "#spend-totals"))) == sorted((r["user"], money(r["cost"])) for r in all_time)
    # Today only: just the requests sent through the proxy.
    page.select_option("#top-period", "today")
    expect(page.locator("#top-tables")).to_have_attribute("data-period", "today")
    rows = admin_get(tollgate, page.locator("#top-model").get_attribute("data-query"))
    assert {r["model"] for r in rows} == {"gpt-4o", "gpt-4o-mini", "broken-model"}
    assert sorted(r[0] for r in table(page, "#top-model")) == sorted(r["model"] for r in rows)


def test_stacked_and_top_by_project(page, tollgate):
    login(page, tollgate, ADMIN)
    offered = page.eval_on_selector_all("#spend-group option", "os => os.map(o => o.value)")
    assert "project" in offered, offered
    page.select_option("#spend-group", "project")
    expect(page.locator("#spend-key")).to_have_text("project")
    page.wait_for_function("() => document.getElementById('spend').dataset.totalsQuery.includes('group_by=project')")
    totals = admin_get(tollgate, page.locator("#spend").get_attribute("data-totals-query"))
    # Requests of no project are their own row (null).
    name = lambda r: "null" if r["project"] is None else r["project"]
    assert {name(r) for r in totals} == {"search", "null"}
    assert sorted(map(tuple, table(page, "#spend-totals"))) == sorted((name(r), money(r["cost"])) for r in totals)
    labels = page.evaluate("() => Chart.getChart('spend-chart').data.datasets.map(d => d.label)")
    assert sorted(labels) == sorted(name(r) for r in totals)
    # Top projects, by cost, equal to /usage?group_by=project.
    box = page.locator("#top-project")
    expect(box.locator("h3")).to_have_text("Top projects")
    rows = admin_get(tollgate, box.get_attribute("data-query"))
    rows.sort(key=lambda r: r["cost"], reverse=True)
    want = [[name(r), f"{r['numQueries']:,}", f"{r['queryTokens'] + r['answerTokens']:,}", money(r["cost"])]
            for r in rows[:10]]
    assert table(page, "#top-project") == want


def test_budget_burn(page, tollgate):
    login(page, tollgate, ADMIN)
    # The two users' budgets and the search project's.
    expect(page.locator("#budget-table tbody tr")).to_have_count(3)
    for user, over in [("alice", True), ("bob", False)]:
        row = page.locator(f"#budget-table tbody tr[data-user='{user}']")
        lim = admin_get(tollgate, f"users/{user}/limits")
        cells = row.locator("td").all_text_contents()
        assert cells[1] == money(lim["budget"]) and cells[3] == money(lim["spent"])
        assert cells[4] == money(lim["reserved"]) and cells[5] == money(lim["remaining"])
        assert ("over" in (row.get_attribute("class") or "")) == over, cells
    assert page.locator("#budget-table tr[data-user='alice'] td.outlook").text_content() == "exhausted"
    row = page.locator("#budget-table tbody tr[data-project='search']")
    lim = admin_get(tollgate, "projects/search/limits")
    cells = row.locator("td").all_text_contents()
    assert cells[0] == "project search" and cells[1] == money(lim["budget"]) == "$500.00"
    assert cells[3] == money(lim["spent"]) and cells[5] == money(lim["remaining"])


def test_recent_requests_filters_and_csv(page, tollgate):
    login(page, tollgate, ADMIN)
    recent = page.locator("#recent")
    rows = table(page, "#recent-table")
    api = admin_get(tollgate, recent.get_attribute("data-query"))
    assert len(rows) == len(api) == 50
    assert [r[1] for r in rows] == [r["user"] for r in api]
    assert [r[7] for r in rows] == [money(r["cost"]) for r in api]
    # Newest first: the last request sent is on top.
    assert rows[0][1] == "carol"
    page.select_option("#recent-status", "error")
    page.wait_for_function("() => document.getElementById('recent').dataset.query.includes('status=error')")
    errors = admin_get(tollgate, recent.get_attribute("data-query"))
    rows = table(page, "#recent-table")
    assert len(rows) == len(errors) > 1
    assert all(int(r[4]) >= 400 for r in rows)
    assert rows[0][2] == "broken-model" and rows[0][4] == "503"
    page.fill("#recent-user", "bob")
    page.select_option("#recent-estimated", "false")
    page.wait_for_function("() => document.getElementById('recent').dataset.query.includes('user=bob')")
    rows = table(page, "#recent-table")
    assert rows and {r[1] for r in rows} == {"bob"} and {r[8] for r in rows} == {"reported"}
    assert len(rows) == len(admin_get(tollgate, recent.get_attribute("data-query")))
    # The CSV is what is shown, as /queries writes it.
    with page.expect_download() as d:
        page.click("#recent-csv")
    got = Path(d.value.path()).read_bytes()
    status, want, _ = call(f"{tollgate.base}/{recent.get_attribute('data-query')}&format=csv",
                           headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200 and got == want
    lines = got.decode().strip().split("\r\n")
    assert len(lines) == len(rows) + 1 and all(",bob," in l for l in lines[1:])
    # By project: carol's requests are in none.
    # Text first: every load the selects start then asks the same.
    page.fill("#recent-user", "")
    page.fill("#recent-project", "search")
    page.select_option("#recent-status", "")
    page.select_option("#recent-estimated", "")
    page.click("#recent-filters button[type=submit]")
    page.wait_for_function("() => document.getElementById('recent').dataset.query.includes('project=search')")
    rows = table(page, "#recent-table")
    api = admin_get(tollgate, recent.get_attribute("data-query"))
    assert rows and len(rows) == len(api) and {r[1] for r in rows} == {"alice", "bob"}
    assert {r["project"] for r in api} == {"search"}


def test_rate_limit_headroom(page, tollgate):
    login(page, tollgate, ADMIN)
    expect(page.locator("#ratelimit-table tbody tr")).to_have_count(2)
    rows = table(page, "#ratelimit-table")
    assert rows[0][:4] == ["requests", "420", "500", "84%"]
    assert rows[1][:4] == ["tokens", "150,000", "300,000", "50%"]


def test_a_key_holder_sees_only_their_own(page, tollgate):
    login(page, tollgate, tollgate.keys["bob"])
    expect(page.locator("#who")).to_have_text("key holder: bob")
    expect(page.locator("#ratelimits")).to_be_hidden()
    expect(page.locator("#recent-user-label")).to_be_hidden()
    # Groupings offered: no per-user one.
    offered = page.eval_on_selector_all("#spend-group option", "os => os.map(o => o.value)")
    assert offered[0] == "model" and "user" not in offered, offered
    spend = page.locator("#spend")
    q = spend.get_attribute("data-totals-query")
    want = admin_get(tollgate, q + "&user=bob")
    assert sorted(map(tuple, table(page, "#spend-totals"))) == sorted((r["model"], money(r["cost"])) for r in want)
    assert want and "broken-model" in {r["model"] for r in want}
    recent = table(page, "#recent-table")
    assert recent and {r[1] for r in recent} == {"bob"}
    expect(page.locator("#budget-table tbody tr")).to_have_count(1)
    assert page.locator("#budget-table tbody tr").get_attribute("data-user") == "bob"
    shot(page, "dashboard-key-holder.png")
    # The server enforces it, not the page.
    me = cookie_header(page)
    status, _, doc = call(f"{tollgate.base}/usage?user=alice", headers=me)
    assert status == 403 and is_openai_error(doc), doc
    for path in ("ratelimits", "limits", "users/alice/limits", "users/bob/keys", "models"):
        status, _, doc = call(f"{tollgate.base}/{path}", headers=me)
        assert status == 403 and is_openai_error(doc), (path, doc)
    status, _, mine = call(f"{tollgate.base}/usage", headers=me)
    assert status == 200 and mine == admin_get(tollgate, "usage?user=bob")
    assert mine != admin_get(tollgate, "usage")
    status, _, rows = call(f"{tollgate.base}/queries", headers=me)
    assert status == 200 and rows and {r["user"] for r in rows} == {"bob"}
    # A session cookie never changes anything, even an admin's.
    status, _, doc = call(f"{tollgate.base}/users/bob/limits", "PUT", {"budget": 5}, me)
    assert status == 403 and is_openai_error(doc), doc


def test_an_admin_session_only_reads_and_logs_out(page, tollgate):
    login(page, tollgate, ADMIN)
    cookie = page.context.cookies()[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > time.time()
    me = cookie_header(page)
    status, _, doc = call(f"{tollgate.base}/users/dave/keys", "POST", None, me)
    assert status == 403 and is_openai_error(doc), doc
    assert call(f"{tollgate.base}/ratelimits", headers=me)[0] == 200
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    status, _, doc = call(f"{tollgate.base}/ratelimits", headers=me)
    assert status == 401 and is_openai_error(doc, "invalid_api_key"), doc
