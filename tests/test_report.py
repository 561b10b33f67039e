"""`python -m mmedit_jax.report`: the page from a real `evaluate` run, its errors on broken run directories, and the
page in a real headless browser (Chromium): no script errors, every case shown, filtering and sorting from the URL's
hash, a screenshot that is not blank.

The browser checks need `chromium` (`.ci/run` installs it); without it they fail, unless MMEDIT_JAX_NO_BROWSER=1
asks to skip them.
"""

import base64
import html
import html.parser
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from mmedit_jax import evaluate, report
from mmedit_jax.case import METRICS

ACCURACY = ("reliability", "t_generality", "m_generality")


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A real run: MEND on 8 cases of the built-in world (its files generated in a temporary cache)."""
    root = tmp_path_factory.mktemp("report")
    out = str(root / "run")
    evaluate.main(["--world", "--editor", "mend", "--limit", "8", "--batch-size", "4", "--cache-dir",
                   str(root / "world"), "--out", out, "--no-progress"])
    return out


def read_rows(run_dir):
    with open(os.path.join(run_dir, "cases.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_rows(run_dir, rows):
    with open(os.path.join(run_dir, "cases.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


BENCH = {"editor": "mend", "device": "cpu", "data": "/data/vqa_eval.json", "matmul_peak_gflops": 250.0,
         "throughput": [{"batch": b, "compile_s": 3.0, "edits_per_s": e, "speedup": e / 9.0, "p50_ms": 1e3 * b / e,
                         "p90_ms": 1.1e3 * b / e, "fraction_of_peak": 0.01 * b}
                        for b, e in ((1, 9.0), (8, 50.0), (32, 120.0), (64, 131.0))]}


@pytest.fixture(scope="module")
def edge_run(world_run, tmp_path_factory):
    """The real run's files with rows bent to the edge cases: markup in a question, a missing and an unreadable
    image, a non-finite edit that failed, a locality mark below 1, a row without answers; and a bench.json."""
    d = str(tmp_path_factory.mktemp("edge") / "run")
    shutil.copytree(world_run, d)
    rows = read_rows(d)
    bad = os.path.join(d, "not_an_image.png")
    with open(bad, "wb") as f:
        f.write(b"this is not a PNG")
    rows[0]["src"] = '<script>window.injected=1</script> & "which" <b>shape</b>?'
    rows[0]["image"] = os.path.join(d, "nowhere", "gone.png")
    rows[1].update(finite=False, reliability=0.0, t_generality=0.0, m_loc=bad)
    rows[2].update(t_locality=0.85, m_locality=0.95, m_generality=0.0)
    rows[4].update(t_locality=0.95)  # fails below 1, not below 0.9
    del rows[3]["answers"]
    write_rows(d, rows)
    with open(os.path.join(d, "bench.json"), "w") as f:
        json.dump(BENCH, f)
    return d


def make_page(run_dir, tmp_path, name="report.html"):
    out = str(tmp_path / name)
    assert report.main([run_dir, "--out", out]) == out
    with open(out, encoding="utf-8") as f:
        return out, f.read()


class Dom(html.parser.HTMLParser):
    """What the tests look at in a page: the case rows (attributes, hidden or not, in order), images, scripts."""

    def __init__(self, text):
        super().__init__()
        self.cases, self.imgs, self.attrs_of = [], [], {}
        self.root = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.root = a
        if tag == "body":
            self.attrs_of["body"] = a
        if tag == "tr" and "case" in (a.get("class") or "").split():
            self.cases.append(a)
        if tag == "img":
            self.imgs.append(a)
        if "id" in a:
            self.attrs_of[a["id"]] = a


def fails(row, metric, loc=1.0):
    v = row.get(metric)
    return isinstance(v, float) and v < (1.0 if metric in ACCURACY else loc)


# --------------------------------------------------------------------------------------------------
# The page itself.


def test_page_holds_every_case_summary_and_only_embedded_images(world_run, tmp_path):
    rows = read_rows(world_run)
    _, page = make_page(world_run, tmp_path)
    dom = Dom(page)
    assert [int(c["data-index"]) for c in dom.cases] == [r["index"] for r in rows]
    for r, c in zip(rows, dom.cases):
        for m in METRICS:
            assert float(c[f"data-{m}"]) == pytest.approx(r[m], abs=0)
    with open(os.path.join(world_run, "summary.json")) as f:
        summary = json.load(f)
    for m in METRICS:
        assert f"<td>{summary[m]:.2f}</td>" in page
    assert f"{summary['pre_reliability']:.2f}" in page and "8 kept of 8 read" in page
    for r in rows:  # every input's answers are on the page
        for a in r["answers"].values():
            assert report.esc(a["post"].strip()) in page
    # self-contained: every image inline, nothing fetched from elsewhere
    assert len(dom.imgs) == 3 * len(rows)
    for img in dom.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert max(im.size) == report.THUMB_PX  # the world's 32 px images, enlarged
    for needle in ("<link", 'src="http', "src='http", "url(http", "@import", "//cdn"):
        assert needle not in page
    assert 'id="throughput"' not in page  # no bench.json in this run


def test_edge_rows_escaped_placeholders_flagged_and_bench_plotted(edge_run, tmp_path):
    _, page = make_page(edge_run, tmp_path)
    dom = Dom(page)
    assert len(dom.cases) == len(read_rows(edge_run))
    assert "<script>window.injected" not in page and "&lt;script&gt;window.injected=1&lt;/script&gt; &amp;" in page
    assert "<b>shape</b>" not in page
    assert page.count('class="noimg"') == 2 and ">missing</div>" in page and ">unreadable</div>" in page
    assert [c["data-finite"] for c in dom.cases].count("false") == 1 and "non-finite patch (NaN or inf)" in page
    assert dom.cases[1]["class"] == "case nonfinite"
    svg = page[page.index('<svg id="throughput"'):page.index("</svg>")]
    assert svg.count("<circle") == len(BENCH["throughput"]) and "131" in svg
    assert 'id="bench-table"' in page and "on cpu" in page
    summary = json.loads((edge_run / "summary.json").read_text()) if hasattr(edge_run, "joinpath") else \
        json.load(open(os.path.join(edge_run, "summary.json")))
    # The data file the page names: the run's own summary's, else the bench's.
    assert html.escape(summary.get("data_path") or BENCH["data"]) in page


def test_broken_run_directories_are_named(world_run, tmp_path):
    def broken(name, content=None):
        d = tmp_path / f"{len(list(tmp_path.iterdir()))}_{name}"
        shutil.copytree(world_run, d)
        path = d / name
        if content is None:
            path.unlink()
        else:
            path.write_text(content)
        return str(d), str(path)

    for name, content, says in [("summary.json", None, "is missing"), ("run.json", None, "is missing"),
                                ("cases.jsonl", None, "is missing"), ("summary.json", "{not json", "not valid JSON"),
                                ("run.json", "[1, 2]", "not an object"),
                                ("cases.jsonl", '{"index": 0}\n{oops\n{"index": 2}\n', "line 2: not valid JSON"),
                                ("bench.json", '{"throughput": [{"batch": 1}]}', "numeric `batch` and `edits_per_s`"),
                                ("bench.json", "", "not valid JSON")]:
        d, path = broken(name, content)
        with pytest.raises(SystemExit) as e:
            report.main([d, "--out", str(tmp_path / "x.html")])
        assert path in str(e.value) and says in str(e.value), (name, str(e.value))
    with pytest.raises(SystemExit, match="is not a directory"):
        report.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.html")])


def test_a_torn_last_line_is_left_out_and_said(world_run, tmp_path):
    d = tmp_path / "torn"
    shutil.copytree(world_run, d)
    rows = read_rows(str(d))
    with open(d / "cases.jsonl", "a") as f:
        f.write('{"index": 99, "src": "half a ro')
    before = (d / "cases.jsonl").read_bytes()
    _, page = make_page(str(d), tmp_path)
    assert len(Dom(page).cases) == len(rows) and "the unfinished last line was left out" in page
    assert (d / "cases.jsonl").read_bytes() == before  # the run's files are only read


def test_default_out_is_in_the_run_dir(world_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(world_run, d)
    assert report.main([str(d)]) == os.path.join(str(d), "report.html") and (d / "report.html").exists()


# --------------------------------------------------------------------------------------------------
# In a real browser.


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """`browser(url, *flags)` -> CompletedProcess of headless Chromium; fails when Chromium is not installed."""
    if os.environ.get("MMEDIT_JAX_NO_BROWSER") == "1":
        pytest.skip("MMEDIT_JAX_NO_BROWSER=1: the browser checks are skipped on request")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed, so the report page cannot be checked in a browser: "
                    "apt-get install -y chromium (.ci/run does), or set MMEDIT_JAX_NO_BROWSER=1 to skip these checks")
    profile = str(tmp_path_factory.mktemp("chromium-profile"))

    def run(url, *flags):
        cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *flags, url]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    return run


def loaded(browser, page, hash_=""):
    """The DOM after the page's script ran, checked free of script errors."""
    p = browser(f"file://{page}{hash_}", "--dump-dom")
    dom = Dom(p.stdout)
    assert "data-js-error" not in dom.root, dom.attrs_of.get("js-errors")
    assert "Uncaught" not in p.stderr, [line for line in p.stderr.splitlines() if "CONSOLE" in line]
    assert dom.attrs_of["body"].get("data-ready") == "1", "the page's script did not finish"
    return dom, p.stdout


def test_browser_shows_every_case_without_errors(browser, world_run, tmp_path):
    page, _ = make_page(world_run, tmp_path)
    dom, text = loaded(browser, page)
    rows = read_rows(world_run)
    assert [int(c["data-index"]) for c in dom.cases] == [r["index"] for r in rows]
    assert not any("hidden" in c for c in dom.cases)
    assert f"showing {len(rows)} of {len(rows)} cases" in text


def test_browser_catches_a_script_error(browser, world_run, tmp_path, monkeypatch):
    """The error check above can fail: a page whose script throws is caught."""
    broken = report.JS.replace("readHash();\napply();", "undefinedFunction();")
    assert broken != report.JS
    monkeypatch.setattr(report, "JS", broken)
    page, _ = make_page(world_run, tmp_path)
    p = browser(f"file://{page}", "--dump-dom")
    assert Dom(p.stdout).root.get("data-js-error") == "1" and "undefinedFunction" in p.stdout


@pytest.mark.parametrize("hash_, loc", [("#filter=reliability", 1.0), ("#filter=t_generality", 1.0),
                                        ("#filter=m_locality", 1.0), ("#filter=t_locality&loc=0.9", 0.9),
                                        ("#filter=any&loc=0.5", 0.5), ("#filter=nonfinite", 1.0)])
def test_browser_filters_by_failing_metric(browser, edge_run, tmp_path, hash_, loc):
    page, _ = make_page(edge_run, tmp_path)
    dom, text = loaded(browser, page, hash_)
    rows = read_rows(edge_run)
    what = hash_.split("&")[0].split("=")[1]
    if what == "nonfinite":
        want = {r["index"] for r in rows if r.get("finite") is False}
    elif what == "any":
        want = {r["index"] for r in rows if any(fails(r, m, loc) for m in METRICS)}
    else:
        want = {r["index"] for r in rows if fails(r, what, loc)}
    assert want and len(want) < len(rows) or what == "m_locality", (what, want)  # the filter has work to do
    if loc != 1.0 and what != "nonfinite":  # and the threshold changes what it shows
        assert want != {r["index"] for r in rows if any(fails(r, m) for m in ([what] if what in METRICS else METRICS))}
    shown = {int(c["data-index"]) for c in dom.cases if "hidden" not in c}
    assert shown == want
    assert len(dom.cases) == len(rows) and f"showing {len(want)} of {len(rows)} cases" in text


@pytest.mark.parametrize("metric, direction", [("m_locality", "desc"), ("t_locality", "asc"), ("index", "desc")])
def test_browser_sorts_by_a_column(browser, edge_run, tmp_path, metric, direction):
    page, _ = make_page(edge_run, tmp_path)
    dom, _ = loaded(browser, page, f"#sort={metric}&dir={direction}")
    rows = read_rows(edge_run)
    sign = -1 if direction == "desc" else 1
    want = [r["index"] for r in sorted(rows, key=lambda r: sign * r[metric])]  # stable, as the page's sort
    assert [int(c["data-index"]) for c in dom.cases] == want
    assert want != [r["index"] for r in rows]  # the order changed


def test_browser_screenshot_is_not_blank(browser, edge_run, tmp_path):
    page, _ = make_page(edge_run, tmp_path)
    shot = str(tmp_path / "report.png")
    browser(f"file://{page}", f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars")
    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape[:2] == (1000, 1400)
    assert len(np.unique(im.reshape(-1, 3), axis=0)) > 200 and im.std() > 20
