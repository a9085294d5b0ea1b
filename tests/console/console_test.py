#!/usr/bin/env python3
"""atlake's web console in a real browser: Debian's Chromium driven by Playwright (sync API).

Run by tests/it/console.rs against a daemon (`atlake run`, ingesting from the simulator, with a
token) and a `serve` on the same lake:

    console_test.py --base http://127.0.0.1:P --serve-base http://127.0.0.1:Q \
        --token T --queries DIR --chromium PATH

Checks, in order, what a user sees: the token prompt; an example loaded and run with one click;
typed headers, SQL NULLs unlike strings, numbers right-aligned; paging; CSV and Parquet downloads
equal to the same query over HTTP; the tables panel; errors; cancelling; the live page's charts
moving; `serve` saying it has no daemon; a wrong token getting an error and no data; no request
to any other host and the token in no URL. The first failed check ends the run with exit 1.
"""

import argparse
import os
import csv
import io
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
from playwright.sync_api import expect, sync_playwright

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]

# 250 rows (more than one page of 100), a NULL every seventh row
PAGED_SQL = (
    "SELECT n, n * 2 AS twice, CASE WHEN n % 7 = 0 THEN NULL ELSE 'v' || CAST(n AS VARCHAR) END AS s\n"
    "FROM (SELECT unnest(range(0, 250)) AS n)\nORDER BY n"
)
NULL_SQL = "SELECT NULL AS a, 'NULL' AS b, '' AS c, CAST(NULL AS BIGINT) AS d, 42 AS e, 1.5 AS f"
# seconds of work for the engine (two billion joined rows): something to cancel
SLOW_SQL = (
    "SELECT count(*) AS n FROM (SELECT unnest(range(0, 1000000)) AS a) x\n"
    "CROSS JOIN (SELECT unnest(range(0, 2000)) AS b) y WHERE (a + b) % 7 = 3"
)


def expected(message):
    """Console errors the checks cause on purpose: a refused token, a bad query, serve's /filters."""
    return any(
        message.startswith(f"Failed to load resource: the server responded with a status of {s}")
        for s in (400, 401, 404)
    )


class Failed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failed(what)
    print(f"ok: {what}", flush=True)


def http_sql(base, token, sql, fmt):
    req = urllib.request.Request(
        f"{base}/sql?format={fmt}",
        data=sql.encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def cells(page, row):
    return page.locator(f"#result tbody tr:nth-child({row}) td")


def run_in_editor(page, sql, shortcut=True):
    page.fill("#sql", sql)
    if shortcut:
        page.locator("#sql").press("Control+Enter")
    else:
        page.click("#run")


def wait_done(page):
    expect(page.locator("#run")).to_be_enabled(timeout=30_000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--serve-base", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--chromium", required=True)
    ap.add_argument("--downloads", required=True)
    ap.add_argument("--screenshots", required=True)
    a = ap.parse_args()
    base, token = a.base.rstrip("/"), a.token
    origins = (a.base.rstrip("/") + "/", a.serve_base.rstrip("/") + "/")
    requests, problems = [], []

    def watch(ctx):
        """Records every request of a browser context, and its pages' errors."""
        ctx.on("request", lambda r: requests.append(r.url))
        ctx.on("page", lambda pg: pg.on("pageerror", lambda e: problems.append(f"page error: {e}")))
        ctx.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" and not expected(m.text) else None)
        return ctx

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.chromium, args=CHROMIUM_ARGS)
        ctx = watch(browser.new_context(accept_downloads=True))
        page = ctx.new_page()
        try:
            session(page, ctx, lambda: watch(browser.new_context()), a, base, token)
        except BaseException:
            dump(page)
            raise
        finally:
            browser.close()

    # every request went to the atlake servers (or stayed in the browser: blob:, data:)
    others = [u for u in requests if not u.startswith(origins) and not u.startswith(("blob:", "data:"))]
    check(not others, f"no request to another host ({len(requests)} requests; others: {others[:5]})")
    check(all(token not in u for u in requests), "the token is in no URL")
    check(not problems, f"no page errors or console errors (CSP violations among them): {problems[:5]}")


def dump(page):
    try:
        print("--- page state at the failure ---")
        for sel in ["#status", "#error", "#page-info", "#tables-status", "#live-status", "#token-error"]:
            loc = page.locator(sel)
            if loc.count():
                print(f"{sel}: {loc.first.text_content()!r}")
        print(page.locator("body").inner_text()[:3000])
    except Exception as e:  # the page may be gone
        print(f"(no page state: {e})")


def session(page, ctx, new_context, a, base, token):
    # ---- the token prompt ----------------------------------------------------------------
    page.goto(base + "/")
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible(timeout=10_000)
    check(True, "the token prompt appears (the first request was refused)")
    check(page.evaluate("sessionStorage.getItem('atlake.token')") is None, "no token stored before")
    page.fill("#token-input", token)
    page.click("#token-ok")
    expect(dialog).to_be_hidden()
    expect(page.locator('#tables li[data-table="events"]')).to_be_visible(timeout=15_000)
    check(
        page.evaluate("sessionStorage.getItem('atlake.token')") == token,
        "the token is accepted and kept in sessionStorage",
    )
    check(page.evaluate("localStorage.length") == 0, "nothing in localStorage")

    # ---- the tables panel ----------------------------------------------------------------
    events = page.locator('#tables li[data-table="events"]')
    events.locator(".toggle").click()
    for col, typ in [("did", "Utf8"), ("time_us", "Int64"), ("collection", "Utf8")]:
        btn = events.locator(f'.columns button[data-name="{col}"]')
        expect(btn).to_be_visible()
        check(typ in btn.locator(".type").text_content(), f"the tables panel lists events.{col} ({typ})")
    expect(page.locator('#tables li[data-table="system.files"]')).to_be_visible()
    events.locator(".table-name").click()
    check("FROM events" in page.input_value("#sql"), "clicking a table writes a query on it")

    # ---- an example, one click -----------------------------------------------------------
    q1 = Path(a.queries, "q1_top_event_types.sql").read_text()
    page.click('#examples button[data-name="q1_top_event_types"]')
    check(page.input_value("#sql") == q1, "the example's SQL from queries/ is in the editor")
    wait_done(page)
    expect(page.locator("#status")).to_contain_text("rows in")
    heads = page.locator("#result thead th")
    check(heads.count() == 2, "the example's result has its two columns")
    check(heads.nth(0).locator(".name").text_content() == "event", "first column: event")
    check(heads.nth(1).locator(".type").text_content() == "Int64", "the count's header shows Int64")
    check(int(page.locator("#result").get_attribute("data-rows")) > 1, "the example ran and returned rows")
    count = cells(page, 1).nth(1)
    check("num" in (count.get_attribute("class") or ""), "numbers are right-aligned")
    # identity and account events have no collection: a real NULL in the data
    nulls = page.locator("#result tbody td.null")
    check(nulls.count() >= 1, "the example's NULL event (identity/account) shows as NULL")
    print(f"   example: {page.locator('#status').text_content()}")
    names = [b.get_attribute("data-name") for b in page.locator("#examples button").all()]
    on_disk = sorted(f.stem for f in Path(a.queries).glob("*.sql"))
    check(sorted(names) == on_disk, f"every queries/*.sql file is one click away ({len(names)})")

    # ---- typed headers and NULLs -------------------------------------------------------------
    run_in_editor(page, NULL_SQL)  # Ctrl+Enter
    wait_done(page)
    expect(page.locator("#result")).to_have_attribute("data-rows", "1")
    types = [t.text_content() for t in page.locator("#result thead th .type").all()]
    check(types[:5] == ["Null", "Utf8", "Utf8", "Int64", "Int64"], f"typed headers: {types}")
    row = cells(page, 1)
    a_, b_, c_, d_, e_, f_ = (row.nth(i) for i in range(6))
    check("null" in a_.get_attribute("class") and a_.text_content() == "NULL", "SQL NULL is shown as NULL")
    check("null" in d_.get_attribute("class"), "a typed (Int64) NULL is shown as NULL")
    check(b_.text_content() == "NULL" and "null" not in (b_.get_attribute("class") or ""),
          "the string 'NULL' is plain text, unlike a NULL")
    check(c_.text_content() == "" and "null" not in (c_.get_attribute("class") or ""),
          "the empty string is empty, unlike a NULL")
    null_style = a_.locator("span").evaluate("e => getComputedStyle(e).fontStyle")
    text_style = b_.evaluate("e => getComputedStyle(e).fontStyle")
    check(null_style != text_style, f"NULL is styled apart ({null_style} vs {text_style})")
    check(e_.text_content() == "42" and "num" in e_.get_attribute("class"), "an integer, right-aligned")
    check(f_.text_content() == "1.5", "a float as written")
    # two columns of one name are one JSON key: the console says so rather than show a wrong value
    run_in_editor(page, "SELECT a.n, b.n FROM (SELECT 1 AS n) a, (SELECT 2 AS n) b")
    wait_done(page)
    row = cells(page, 1)
    check(row.nth(0).text_content() == "?" and row.nth(1).text_content() == "2",
          "of two columns named n, the hidden one shows ?")
    expect(page.locator("#status")).to_contain_text("named twice (n)")
    big = "SELECT 9007199254740993 AS big, CAST(12.50 AS DECIMAL(10, 2)) AS price"
    run_in_editor(page, big)
    wait_done(page)
    row = cells(page, 1)
    check(row.nth(0).text_content() == "9007199254740993", "an integer past 2^53 stays exact")
    check(row.nth(1).text_content() == "12.50", "a decimal keeps its scale")

    # ---- paging ----------------------------------------------------------------------------
    run_in_editor(page, PAGED_SQL, shortcut=False)
    wait_done(page)
    expect(page.locator("#result")).to_have_attribute("data-rows", "250")
    info = page.locator("#page-info")
    expect(info).to_contain_text("of 250")
    body = page.locator("#result tbody tr")
    check(body.count() == 100, "a page holds 100 rows")
    check(cells(page, 1).first.text_content() == "0", "page 1 starts at row 0")
    check(page.locator("#prev").is_disabled(), "no previous page on page 1")
    page.click("#next")
    check(cells(page, 1).first.text_content() == "100", "Next: page 2 starts at row 100")
    expect(info).to_contain_text("Rows 101–200 of 250")
    page.click("#next")
    check(cells(page, 1).first.text_content() == "200" and body.count() == 50, "page 3: the last 50 rows")
    check(page.locator("#next").is_disabled(), "no next page after the last")
    page.click("#prev")
    check(cells(page, 1).first.text_content() == "100", "Prev goes back to page 2")
    # row 105 is n = 105 = 7 × 15: its s is NULL
    check("null" in cells(page, 6).nth(2).get_attribute("class"), "NULLs on later pages too")

    # ---- downloads -------------------------------------------------------------------------
    want_csv = http_sql(base, token, PAGED_SQL, "csv")
    with page.expect_download() as dl:
        page.click("#dl-csv")
    d = dl.value
    check(d.suggested_filename.endswith(".csv"), f"the CSV file is named {d.suggested_filename}")
    got = Path(a.downloads, d.suggested_filename)
    d.save_as(got)
    data = got.read_bytes()
    check(data == want_csv, "the CSV download equals the same query's HTTP CSV")
    rows = list(csv.reader(io.StringIO(data.decode())))
    check(rows[0] == ["n", "twice", "s"] and len(rows) == 251, f"CSV: header + 250 rows ({len(rows)})")
    check(rows[8] == ["7", "14", ""] and rows[9] == ["8", "16", "v8"], "CSV rows hold the values")

    want_pq = pq.read_table(io.BytesIO(http_sql(base, token, PAGED_SQL, "parquet")))
    with page.expect_download() as dl:
        page.click("#dl-parquet")
    d = dl.value
    check(d.suggested_filename.endswith(".parquet"), f"the Parquet file is named {d.suggested_filename}")
    got = Path(a.downloads, d.suggested_filename)
    d.save_as(got)
    table = pq.read_table(got)
    check(table.equals(want_pq), "the Parquet download equals the same query's HTTP Parquet")
    check(table.num_rows == 250 and table.column("s").null_count == 36, "Parquet: 250 rows, 36 NULLs")
    check(table.column("n").to_pylist() == list(range(250)), "Parquet: the values")

    # ---- errors ----------------------------------------------------------------------------
    run_in_editor(page, "SELECT * FROM no_such_table")
    wait_done(page)
    err = page.locator("#error")
    expect(err).to_be_visible()
    text = err.text_content()
    check("(400)" in text and "no_such_table" in text, f"a SQL error is shown readably: {text!r}")
    check(page.locator("#result tbody tr").count() == 0, "no stale rows beside an error")
    check(page.locator("#dl-csv").is_disabled(), "nothing to download after an error")

    # ---- cancelling --------------------------------------------------------------------------
    run_in_editor(page, SLOW_SQL)
    expect(page.locator("#cancel")).to_be_enabled()
    time.sleep(0.5)
    check(page.locator("#run").is_disabled(), "the query is running")
    t = time.time()
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("Cancelled.", timeout=5_000)
    wait_done(page)
    check(time.time() - t < 5, "Cancel stops the query at once")
    check(page.locator("#error").is_hidden(), "a cancelled query is not an error")
    run_in_editor(page, "SELECT 7 AS seven")
    wait_done(page)
    expect(page.locator("#result tbody td").first).to_have_text("7")
    check(True, "the next query runs after a cancel")

    # ---- the live page -----------------------------------------------------------------------
    os.makedirs(a.screenshots, exist_ok=True)
    page.screenshot(path=os.path.join(a.screenshots, "query.png"), full_page=True)
    page.click("#tab-live")
    expect(page.locator("#live")).to_be_visible(timeout=10_000)
    check(page.locator("#no-daemon").is_hidden(), "the daemon's live page has charts, not the notice")
    chart = page.locator("#chart-events")
    page.wait_for_function(
        "() => Number(document.querySelector('#chart-events').dataset.points) > 0", timeout=15_000
    )
    canvas = chart.locator("canvas")
    before_points = int(chart.get_attribute("data-points"))
    before_pixels = canvas.evaluate("c => c.toDataURL()")
    before_polls = page.evaluate("() => document.querySelector('#live-status').textContent")
    time.sleep(2.5)
    after_points = int(chart.get_attribute("data-points"))
    after_pixels = canvas.evaluate("c => c.toDataURL()")
    check(after_points > before_points, f"events/s gains points while ingesting ({before_points} → {after_points})")
    check(after_pixels != before_pixels, "the events/s chart is redrawn")
    check(page.locator("#live-status").text_content() != before_polls, f"the poll count moves: {before_polls}")
    legend = chart.locator(".legend li")
    check(legend.count() >= 2, f"events/s by collection: {legend.count()} series")
    check(any("app.bsky.feed" in t for t in legend.all_text_contents()), "collections are named in the legend")
    for tile in ["rate", "lag", "buffered", "files", "quarantined", "checkpoint"]:
        v = page.locator(f"#tile-{tile}").text_content()
        check(v not in ("", "–"), f"tile {tile}: {v}")
    for c in ["lag", "buffered", "files", "checkpoint"]:
        n = int(page.locator(f"#chart-{c}").get_attribute("data-points"))
        check(n > 0, f"chart {c} has {n} points")
    expect(page.locator("#tile-checkpoint-at")).to_contain_text("jetstream", timeout=5_000)
    page.screenshot(path=os.path.join(a.screenshots, "live.png"), full_page=True)
    files_before = int(page.locator("#tile-files").text_content().replace(",", ""))
    page.wait_for_function(
        f"() => Number(document.querySelector('#tile-files').textContent.replace(/,/g, '')) > {files_before}",
        timeout=20_000,
    )
    check(True, "files written grows as the daemon flushes")

    # ---- serve, without a daemon -----------------------------------------------------------
    other = ctx.new_page()
    other.goto(a.serve_base.rstrip("/") + "/#live")
    expect(other.locator("#token-dialog")).to_be_visible(timeout=10_000)
    other.fill("#token-input", token)
    other.click("#token-ok")
    expect(other.locator("#no-daemon")).to_be_visible(timeout=10_000)
    check(other.locator("#live").is_hidden(), "serve: the live page says there is no daemon, no empty charts")
    other.close()

    # ---- a wrong token -----------------------------------------------------------------------
    wrong = new_context()
    w = wrong.new_page()
    w.goto(base + "/")
    expect(w.locator("#token-dialog")).to_be_visible(timeout=10_000)
    w.fill("#token-input", "not-the-token")
    w.click("#token-ok")
    expect(w.locator("#token-error")).to_be_visible(timeout=10_000)
    check("refused" in w.locator("#token-error").text_content(), "a wrong token is refused, said in the prompt")
    w.click("#token-cancel")
    expect(w.locator("#tables-status")).to_contain_text("unavailable")
    check(w.locator("#tables li").count() == 0, "a wrong token lists no table")
    run_in_editor(w, "SELECT did FROM events LIMIT 5", shortcut=False)
    expect(w.locator("#token-dialog")).to_be_visible(timeout=10_000)
    w.click("#token-cancel")
    expect(w.locator("#error")).to_be_visible()
    check("unauthorized (401)" in w.locator("#error").text_content(), "a refused query shows the error")
    check(w.locator("#result tbody tr").count() == 0, "and no data")
    check(w.evaluate("sessionStorage.getItem('atlake.token')") is None, "a refused token is not kept")
    wrong.close()


if __name__ == "__main__":
    try:
        main()
    except Failed as e:
        print(f"FAILED: {e}", flush=True)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        print("FAILED: see the traceback above", flush=True)
        sys.exit(1)
    print("console test: every check passed", flush=True)
