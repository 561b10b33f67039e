"""One job: turn an `evaluate` or `bench` run directory into one self-contained HTML page to look at, case by case.

    python -m mmedit_jax.report RUN_DIR [--out report.html] [--bench bench.json]

The page holds the run's summary (the five metrics, pre-edit base accuracy, editor, model, data, edits/s and the
data report), the throughput plot when the directory has a `bench.json` (what `python -m mmedit_jax.bench --json`
writes), and one row per case: thumbnails of its three images, the question and the edit (pred -> alt), the
unedited and edited model's answer to each of the five inputs, and each metric's mark. The rows sort by any
column and filter by failing metric; the state is in the URL's hash (`#filter=reliability&sort=m_locality&dir=desc`,
also `loc=0.9`: the locality mark below which a case counts as failing, 1 by default), so a view can be linked.
Images are embedded (PNG, base64) and the page loads nothing from elsewhere. The run's files are only read; the
page goes to RUN_DIR/report.html unless --out names another file.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os

from PIL import Image

from mmedit_jax.case import ACCURACY_INPUTS, INPUTS, METRICS
from mmedit_jax.eval.records import HEADERS, PRE_METRICS

THUMB_PX = 96
ACCURACY_METRICS = tuple(i.metric for i in INPUTS if i.name in ACCURACY_INPUTS)
# Per input: the row field holding its prompt, and what it shows besides (the image of `image_rephrase` differs).
PROMPT_FIELD = {"edit": "src", "rephrase": "rephrase", "image_rephrase": "src", "loc": "loc", "loc_image": "m_loc_q"}
# Per input: the row field holding its answer as the data file gives it (where the run recorded no `answers`).
TARGET_FIELD = {"edit": "alt", "rephrase": "alt", "image_rephrase": "alt", "loc": "loc_ans", "loc_image": "m_loc_a"}
IMAGE_FIELDS = (("image", "edit"), ("image_rephrase", "rephrased"), ("m_loc", "locality"))


class ReportError(ValueError):
    """A run directory the report cannot be made from; the message names the file."""


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


# --------------------------------------------------------------------------------------------------
# Reading the run directory.


def read_json(path: str, required: bool = True) -> dict | None:
    if not os.path.exists(path):
        if not required:
            return None
        raise ReportError(f"{path} is missing: is {os.path.dirname(path) or '.'} the --out directory of "
                          "`python -m mmedit_jax.evaluate` or `python -m mmedit_jax.bench`?")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ReportError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def read_cases(path: str) -> tuple[list[dict], list[str]]:
    """The rows of `cases.jsonl`, and notes (an unfinished last line: the run may still be writing)."""
    if not os.path.exists(path):
        raise ReportError(f"{path} is missing: the run wrote no cases (is this a run directory?)")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows, notes = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if n == len(lines):  # no newline after it: torn by a run that died or is still writing
                notes.append(f"{path}: the unfinished last line was left out")
                continue
            raise ReportError(f"{path}, line {n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}, line {n}: a JSON {type(row).__name__}, not an object")
        rows.append(row)
    return rows, notes


def read_bench(path: str | None) -> dict | None:
    bench = read_json(path, required=False) if path else None
    if bench is None:
        return None
    rows = bench.get("throughput")
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and _num(r.get("batch")) and _num(r.get("edits_per_s")) for r in rows):
        raise ReportError(f"{path}: `throughput` is not a list of rows with numeric `batch` and `edits_per_s` "
                          "(the file `python -m mmedit_jax.bench --json` writes)")
    return bench


def load_run(run_dir: str, bench_path: str | None = None) -> dict:
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir} is not a directory")
    rows, notes = read_cases(os.path.join(run_dir, "cases.jsonl"))
    return dict(dir=os.path.abspath(run_dir), summary=read_json(os.path.join(run_dir, "summary.json")),
                run=read_json(os.path.join(run_dir, "run.json")), rows=rows, notes=notes,
                bench=read_bench(bench_path or os.path.join(run_dir, "bench.json")))


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------------------
# Thumbnails.


def thumbnail(path: str | None, base: str, cache: dict, px: int = THUMB_PX) -> str:
    """An `<img>` of `path` scaled to `px` on its long side (small images enlarged pixel by pixel, NEAREST), or a
    placeholder naming what is wrong. Each file is encoded once."""
    if not path:
        return '<div class="noimg">no image</div>'
    full = path if os.path.isabs(path) else os.path.join(base, path)
    if full not in cache:
        try:
            with Image.open(full) as im:
                im = im.convert("RGB")
                scale = px / max(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                im = im.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, "PNG", optimize=True)
            cache[full] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        except FileNotFoundError:
            cache[full] = None
        except (OSError, ValueError) as e:
            cache[full] = e
    got = cache[full]
    if isinstance(got, str):
        return f'<img class="thumb" src="{got}" alt="{esc(os.path.basename(full))}" title="{esc(full)}">'
    why = "missing" if got is None else "unreadable"
    return f'<div class="noimg" title="{esc(full)}{esc(": " + str(got)) if got else ""}">{why}</div>'


# --------------------------------------------------------------------------------------------------
# The page.


def fmt(x, spec=".2f", none="–") -> str:
    return format(x, spec) if _num(x) else none


def mark(metric: str, v) -> str:
    """A metric's cell for one case: ✓/✗ for accuracy (a fraction where token accuracy gives one), the
    fraction for locality, coloured from red (0) to green (1)."""
    if not _num(v):
        return '<td class="mark na">–</td>'
    hue = round(120 * min(max(v, 0.0), 1.0))
    style = f' style="background:hsl({hue},70%,88%);color:hsl({hue},80%,22%)"'
    if metric in ACCURACY_METRICS and v in (0, 1):
        text = "✓" if v == 1 else "✗"
    else:
        text = f"{v:.2f}"
    return f'<td class="mark"{style} title="{esc(HEADERS[metric])} {v:.4f}">{text}</td>'


def edits_per_s(summary: dict, bench: dict) -> str:
    """The run's steady edits/s; a bench's best where the run had no steady batches (one batch: compile only)."""
    if _num(summary.get("edits_per_s")):
        return fmt(summary["edits_per_s"])
    best = max(bench.get("throughput") or [], key=lambda r: r["edits_per_s"], default=None)
    return "–" if best is None else f"{best['edits_per_s']:.2f} (bench, E={esc(best['batch'])})"


def summary_section(run: dict) -> str:
    s, fp, bench = run["summary"], run["run"], run["bench"] or {}
    cells = "".join(f"<th>{esc(HEADERS[m])}</th>" for m in METRICS)
    post = "".join(f"<td>{fmt(s.get(m))}</td>" for m in METRICS)
    pre = "".join(f"<td>{fmt(s.get('pre_' + m))}</td>" if m in PRE_METRICS else "<td>–</td>" for m in METRICS)
    metrics = (f'<table class="metrics" id="summary"><tr><th></th>{cells}</tr>'
               f'<tr><th>after the edit</th>{post}</tr><tr><th>pre-edit base accuracy</th>{pre}</tr></table>')

    def short(v):
        v = "–" if v is None else str(v)
        return f'<span title="{esc(v)}">{esc(v[:16] + "…" if len(v) > 20 else v)}</span>'

    scoring = {True: "exact match", False: "token accuracy"}.get(s.get("exact_match", fp.get("exact_match")), "–")
    facts = [("editor", esc(s.get("editor") or fp.get("editor") or "–")),
             ("model", esc(s["model_path"]) if s.get("model_path") else short(fp.get("model"))),
             ("data", esc(s.get("data_path") or bench.get("data")) if (s.get("data_path") or bench.get("data"))
              else short(fp.get("data"))),
             ("image root", esc(fp.get("image_root") or "–")),
             ("task", esc(fp.get("task") or bench.get("task") or "–")),
             ("scoring", scoring), ("cases", esc(s.get("num_cases", len(run["rows"])))),
             ("edits/s", edits_per_s(s, bench)), ("batch size", esc(s.get("batch_size", "–"))),
             ("non-finite edits", esc(s.get("nonfinite_edits", "–"))),
             ("resumed cases", esc(s.get("resumed_cases", "–")))]
    if bench.get("device"):
        facts.append(("device", esc(bench["device"])))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    out = f'<section><h2>Summary</h2><div class="row"><div>{metrics}</div><dl class="facts">{dl}</dl>'

    d = s.get("data")
    if isinstance(d, dict):
        skipped = d.get("skipped") or {}
        items = [f"{esc(d.get('kept', '–'))} kept of {esc(d.get('read', '–'))} read ({esc(d.get('in_file', '–'))} in "
                 "the file)",
                 "skipped: " + (", ".join(f"{esc(k)}: {esc(v)}" for k, v in skipped.items()) or "none"),
                 f"rejected: {esc(d.get('rejected', 0))}", f"too long for the model: {esc(d.get('too_long', 0))}"]
        items += [f"problem: {esc(p)}" for p in d.get("problems") or []]
        items += [f"too long: {esc(json.dumps(p))}" for p in d.get("too_long_records") or []]
        out += '<div><h3>Data</h3><ul id="data-report">' + "".join(f"<li>{i}</li>" for i in items) + "</ul></div>"
    out += "</div>"
    for note in run["notes"]:
        out += f'<p class="warn">{esc(note)}</p>'
    return out + "</section>"


def nice_step(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `x` (> 0): a tick spacing."""
    if not x > 0:
        return 1.0
    p = 10 ** math.floor(math.log10(x))
    return next(m * p for m in (1, 2, 2.5, 5, 10) if m * p >= x)


def throughput_svg(rows: list[dict], w: int = 640, h: int = 300) -> str:
    """edits/s against the batch size E (log2 axis), as inline SVG."""
    rows = sorted(rows, key=lambda r: r["batch"])
    left, right, top, bottom = 64, 20, 20, 46
    xs = [math.log2(max(r["batch"], 1)) for r in rows]
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    step = nice_step(max(r["edits_per_s"] for r in rows) * 1.1 / 4)
    ymax = step * max(1, math.ceil(max(r["edits_per_s"] for r in rows) * 1.1 / step))
    X = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)
    Y = lambda v: h - bottom - v / ymax * (h - top - bottom)
    parts = [f'<svg id="throughput" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="edits per second against batch size">',
             f'<rect width="{w}" height="{h}" fill="#fff"/>']
    for i in range(round(ymax / step) + 1):
        v = step * i
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#e3e3e3"/>'
                     f'<text x="{left - 6}" y="{Y(v) + 4:.1f}" text-anchor="end" class="tick">{v:g}</text>')
    for r, x in zip(rows, xs):
        parts.append(f'<text x="{X(x):.1f}" y="{h - bottom + 16}" text-anchor="middle" class="tick">'
                     f'{esc(r["batch"])}</text>')
    pts = " ".join(f"{X(x):.1f},{Y(r['edits_per_s']):.1f}" for r, x in zip(rows, xs))
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#2563eb" stroke-width="2"/>')
    for r, x in zip(rows, xs):
        parts.append(f'<circle cx="{X(x):.1f}" cy="{Y(r["edits_per_s"]):.1f}" r="4" fill="#2563eb">'
                     f'<title>E={esc(r["batch"])}: {r["edits_per_s"]:.2f} edits/s</title></circle>'
                     f'<text x="{X(x):.1f}" y="{Y(r["edits_per_s"]) - 9:.1f}" text-anchor="middle" class="val">'
                     f'{r["edits_per_s"]:.3g}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{h - bottom}" stroke="#555"/>'
                 f'<line x1="{left}" x2="{w - right}" y1="{h - bottom}" y2="{h - bottom}" stroke="#555"/>'
                 f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle" class="lab">'
                 'independent edits per compiled call (E, log scale)</text>'
                 f'<text x="14" y="{(top + h - bottom) / 2}" text-anchor="middle" class="lab" '
                 f'transform="rotate(-90 14 {(top + h - bottom) / 2})">edits/s (edit + 5 metrics)</text></svg>')
    return "".join(parts)


BENCH_COLUMNS = (("batch", "E", "d"), ("compile_s", "compile s", ".2f"), ("edits_per_s", "edits/s", ".1f"),
                 ("speedup", "x one-at-a-time", ".2f"), ("p50_ms", "p50 ms", ".1f"), ("p90_ms", "p90 ms", ".1f"),
                 ("fraction_of_peak", "of matmul peak", ".1%"))


def bench_section(bench: dict | None) -> str:
    if not bench or not bench["throughput"]:
        return ""
    rows = sorted(bench["throughput"], key=lambda r: r["batch"])
    cols = [c for c in BENCH_COLUMNS if any(c[0] in r for r in rows)]
    head = "".join(f"<th>{esc(t)}</th>" for _, t, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(k), spec)}</td>" for k, _, spec in cols) + "</tr>" for r in rows)
    where = f" on {esc(bench['device'])}" if bench.get("device") else ""
    peak = f", float32 matmul peak {fmt(bench.get('matmul_peak_gflops'), '.0f')} GFLOP/s" \
        if _num(bench.get("matmul_peak_gflops")) else ""
    return (f'<section><h2>Throughput{where}{peak}</h2><div class="bench">{throughput_svg(rows)}'
            f'<table class="metrics" id="bench-table"><tr>{head}</tr>{body}</table></div></section>')


def answers_table(row: dict) -> str:
    answers = row.get("answers") if isinstance(row.get("answers"), dict) else {}
    out = ['<table class="answers"><colgroup><col class="c-inp"><col><col class="c-ans"><col class="c-ans">'
           '<col class="c-ans"></colgroup>'
           '<tr><th>input</th><th>prompt</th><th>target</th><th>pre</th><th>post</th></tr>']
    for spec in INPUTS:
        a = answers.get(spec.name) or {}
        target, pre, post = (a.get(k) for k in ("target", "pre", "post"))
        target = row.get(TARGET_FIELD[spec.name]) if target is None else target
        # accuracy inputs should reach the target; locality ones should keep the unedited answer
        want = target if spec.name in ACCURACY_INPUTS else pre
        cls = "" if post is None or want is None else ("good" if post.strip() == want.strip() else "bad")
        prompt = row.get(PROMPT_FIELD[spec.name])
        if spec.name == "image_rephrase":
            prompt = f"{prompt or ''} [rephrased image]"
        out.append(f"<tr><td class='inp'>{esc(spec.name)}</td><td>{esc(prompt)}</td>"
                   f"<td>{esc((target or '').strip())}</td><td>{esc('–' if pre is None else pre.strip())}</td>"
                   f"<td class='{cls}'>{esc('–' if post is None else post.strip())}</td></tr>")
    return "".join(out) + "</table>"


def case_row(row: dict, base: str, cache: dict) -> str:
    idx = row.get("index", "")
    attrs = {"data-index": idx if _num(idx) else "", "data-question": row.get("src") or "",
             "data-edit": f"{row.get('pred', '')} -> {row.get('alt', '')}",
             "data-finite": "false" if row.get("finite") is False else "true"}
    attrs.update({f"data-{m}": repr(float(row[m])) if _num(row.get(m)) else "" for m in METRICS})
    attr = " ".join(f'{k}="{esc(v)}"' for k, v in attrs.items())
    thumbs = "".join(f'<figure>{thumbnail(row.get(f), base, cache)}<figcaption>{cap}</figcaption></figure>'
                     for f, cap in IMAGE_FIELDS)
    flag = ('<div class="flag" title="the edit produced a non-finite patch (NaN or inf): this case\'s scores mean '
            'nothing">non-finite</div>' if row.get("finite") is False else "")
    return (f'<tr class="case{" nonfinite" if row.get("finite") is False else ""}" {attr}>'
            f'<td class="idx">{esc(idx)}{flag}</td><td class="imgs">{thumbs}</td>'
            f'<td class="q">{esc(row.get("src"))}<div class="edit"><span class="pred">{esc(row.get("pred"))}</span>'
            f' → <span class="alt">{esc(row.get("alt"))}</span></div></td>'
            f'<td>{answers_table(row)}</td>' + "".join(mark(m, row.get(m)) for m in METRICS) + "</tr>")


def cases_section(run: dict) -> str:
    cache: dict = {}
    heads = [("index", "num", "#"), (None, None, "images"), ("question", "text", "question, edit"),
             (None, None, "answers before (pre) and after (post) the edit")]
    heads += [(m, "num", HEADERS[m]) for m in METRICS]
    th = "".join(f'<th data-key="{k}" data-type="{t}" class="sortable" title="sort">{esc(n)}</th>' if k else
                 f"<th>{esc(n)}</th>" for k, t, n in heads)
    options = '<option value="">all cases</option><option value="any">any metric</option>'
    options += "".join(f'<option value="{m}">{esc(HEADERS[m])}</option>' for m in METRICS)
    options += '<option value="nonfinite">non-finite patch</option>'
    body = "\n".join(case_row(r, run["dir"], cache) for r in run["rows"])
    unanswered = sum(not isinstance(r.get("answers"), dict) for r in run["rows"])
    note = (f'<p class="warn" id="no-answers">{unanswered} of {len(run["rows"])} cases have no recorded answers '
            "(pre and post show –): runs written before answers were recorded do not have them; "
            "`bench --out` and `evaluate` record them now.</p>" if unanswered else "")
    return (f'<section><h2>Cases</h2>{note}<div class="controls"><label>show cases failing: '
            f'<select id="filter">{options}</select></label> <label>a locality mark fails below '
            '<input id="loc" type="number" min="0" max="1" step="0.05" value="1"></label> <span id="shown"></span> '
            '<span class="hint">(click a column head to sort; accuracy fails below 1)</span></div>'
            f'<table id="cases"><thead><tr>{th}</tr></thead><tbody>\n{body}\n</tbody></table></section>')


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 20px; color: #1a1a1a; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 22px 0 8px; }
h3 { font-size: 15px; margin: 0 0 4px; }
.sub { color: #666; margin: 0 0 8px; }
table { border-collapse: collapse; background: #fff; }
.metrics td, .metrics th { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
.metrics th { background: #f1f3f5; }
.row, .bench { display: flex; gap: 36px; align-items: flex-start; flex-wrap: wrap; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 0; }
dl.facts dt { color: #666; }
dl.facts dd { margin: 0; }
#data-report { margin: 4px 0; padding-left: 20px; }
.warn { color: #b45309; }
svg .tick { font-size: 11px; fill: #555; }
svg .val { font-size: 11px; fill: #1e40af; }
svg .lab { font-size: 12px; fill: #333; }
.controls { margin: 6px 0 10px; }
.controls input { width: 60px; }
#shown { font-weight: 600; margin-left: 12px; }
.hint { color: #777; }
#cases { width: 100%; }
#cases > thead th { white-space: nowrap; position: sticky; top: 0; background: #e9ecef; border: 1px solid #ccc;
                    padding: 6px; z-index: 2; }
#cases > thead th.sortable { cursor: pointer; user-select: none; }
#cases > thead th[aria-sort]::after { content: " ▲"; }
#cases > thead th[aria-sort=descending]::after { content: " ▼"; }
#cases > tbody > tr > td { border: 1px solid #ddd; padding: 6px; vertical-align: top; }
#cases > tbody > tr:nth-child(even) { background: #f8f9fa; }
td.idx { font-weight: 600; text-align: right; }
td.imgs { white-space: nowrap; }
figure { display: inline-block; margin: 0 4px 0 0; text-align: center; }
figcaption { font-size: 11px; color: #666; }
img.thumb { width: 64px; height: 64px; object-fit: contain; image-rendering: pixelated; border: 1px solid #ccc; }
img.thumb:hover { transform: scale(2.4); transform-origin: top left; position: relative; z-index: 5;
                  box-shadow: 0 2px 8px #0005; }
.noimg { width: 64px; height: 64px; display: flex; align-items: center; justify-content: center; font-size: 10px;
         color: #888; border: 1px dashed #bbb;
         background: repeating-linear-gradient(45deg, #eee, #eee 6px, #f8f8f8 6px, #f8f8f8 12px); }
td.q { min-width: 140px; max-width: 190px; overflow-wrap: anywhere; }
.edit { margin-top: 6px; }
.pred { color: #b91c1c; text-decoration: line-through; }
.alt { color: #15803d; font-weight: 600; }
table.answers { font-size: 12px; background: transparent; table-layout: fixed; width: 100%; min-width: 480px; }
table.answers td, table.answers th { padding: 1px 6px; border: 0; border-bottom: 1px solid #eee; text-align: left;
                                     overflow-wrap: anywhere; }
table.answers th { color: #666; font-weight: 500; }
col.c-inp { width: 118px; }
col.c-ans { width: 86px; }
td.inp { color: #555; font-family: monospace; }
td.good { color: #15803d; font-weight: 600; }
td.bad { color: #b91c1c; font-weight: 600; }
td.mark { text-align: center; font-weight: 700; font-size: 15px; min-width: 44px; vertical-align: middle !important; }
tr.nonfinite > td { background: #fee2e2 !important; }
.flag { font-size: 10px; color: #fff; background: #b91c1c; border-radius: 3px; padding: 1px 3px; margin-top: 4px;
        font-weight: 600; text-align: center; }
#js-errors { background: #fee2e2; color: #991b1b; padding: 8px; white-space: pre-wrap; }
"""

# Runs before anything else: a script error anywhere shows on the page and marks <html data-js-error="1"> for tests.
ONERROR = """window.onerror = function (msg, src, line) {
  var e = document.getElementById('js-errors');
  if (e) { e.hidden = false; e.textContent += 'script error: ' + msg + ' (line ' + line + ')\\n'; }
  document.documentElement.setAttribute('data-js-error', '1');
};"""

# Sorting and filtering the case rows; the state lives in the URL's hash. Sets <body data-ready="1"> when done.
JS = """(function () {
var METRICS = %(metrics)s, ACCURACY = %(accuracy)s;
var tbody = document.querySelector('#cases tbody'), rows = Array.prototype.slice.call(tbody.rows);
var sel = document.getElementById('filter'), loc = document.getElementById('loc');
var state = {sort: 'index', dir: 'asc', filter: '', loc: 1};

function val(tr, key, type) {
  var v = tr.getAttribute('data-' + key);
  if (type !== 'num') return v || '';
  return v === '' || v === null ? null : parseFloat(v);
}
function fails(tr, m) {
  var v = val(tr, m, 'num');
  return v !== null && v < (ACCURACY.indexOf(m) >= 0 ? 1 : state.loc);
}
function shown(tr, filter) {
  if (!filter) return true;
  if (filter === 'nonfinite') return tr.getAttribute('data-finite') === 'false';
  if (filter === 'any') return METRICS.some(function (m) { return fails(tr, m); });
  return fails(tr, filter);
}
function readHash() {
  location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
    var p = kv.split('=');
    if (p.length !== 2) return;
    var k = decodeURIComponent(p[0]), v = decodeURIComponent(p[1]);
    if (k === 'loc') { var x = parseFloat(v); if (!isNaN(x)) state.loc = x; }
    else if (k in state) state[k] = v;
  });
}
function writeHash() {
  var h = '#sort=' + state.sort + '&dir=' + state.dir + (state.filter ? '&filter=' + state.filter : '')
        + (state.loc !== 1 ? '&loc=' + state.loc : '');
  try { history.replaceState(null, '', h); } catch (e) { /* some browsers refuse it on file:// pages */ }
}
function apply() {
  var th = document.querySelector('#cases th[data-key="' + state.sort + '"]');
  if (!th) { state.sort = 'index'; th = document.querySelector('#cases th[data-key="index"]'); }
  var type = th.getAttribute('data-type'), sign = state.dir === 'desc' ? -1 : 1;
  var order = rows.slice().sort(function (a, b) {  // stable: ties keep the file's order
    var x = val(a, state.sort, type), y = val(b, state.sort, type);
    if (x === null || y === null) return (x === null) - (y === null);  // cases without a value go last
    return sign * (type === 'num' ? x - y : x.localeCompare(y));
  });
  order.forEach(function (tr) { tbody.appendChild(tr); });
  var n = 0;
  rows.forEach(function (tr) { var s = shown(tr, state.filter); tr.hidden = !s; if (s) n++; });
  document.querySelectorAll('#cases th[data-key]').forEach(function (h) {
    if (h === th) h.setAttribute('aria-sort', state.dir === 'desc' ? 'descending' : 'ascending');
    else h.removeAttribute('aria-sort');
  });
  Array.prototype.forEach.call(sel.options, function (o) {
    if (!o.value) return;
    var c = rows.filter(function (tr) { return shown(tr, o.value); }).length;
    o.textContent = o.getAttribute('data-label') + ' (' + c + ')';
  });
  sel.value = state.filter;
  loc.value = state.loc;
  document.getElementById('shown').textContent = 'showing ' + n + ' of ' + rows.length + ' cases';
  document.body.setAttribute('data-ready', '1');
}

Array.prototype.forEach.call(sel.options, function (o) { o.setAttribute('data-label', o.textContent); });
document.querySelectorAll('#cases th[data-key]').forEach(function (h) {
  h.addEventListener('click', function () {
    var k = h.getAttribute('data-key');
    state.dir = state.sort === k && state.dir === 'asc' ? 'desc' : 'asc';
    state.sort = k;
    writeHash(); apply();
  });
});
sel.addEventListener('change', function () { state.filter = sel.value; writeHash(); apply(); });
loc.addEventListener('change', function () {
  var x = parseFloat(loc.value); state.loc = isNaN(x) ? 1 : x; writeHash(); apply();
});
window.addEventListener('hashchange', function () { readHash(); apply(); });
readHash();
apply();
})();"""


def render(run: dict) -> str:
    s, fp = run["summary"], run["run"]
    editor = s.get("editor") or fp.get("editor") or "?"
    title = f"{editor}: {len(run['rows'])} cases"
    js = JS % {"metrics": json.dumps(list(METRICS)), "accuracy": json.dumps(list(ACCURACY_METRICS))}
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style><script>{ONERROR}</script></head><body>"
            f'<div id="js-errors" hidden></div><h1>MMEdit run report: {esc(title)}</h1>'
            f'<p class="sub">{esc(run["dir"])}</p>'
            f"{summary_section(run)}{bench_section(run['bench'])}{cases_section(run)}"
            f"<script>{js}</script></body></html>\n")


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="an `evaluate` or `bench` --out directory (summary.json, cases.jsonl, run.json)")
    ap.add_argument("--out", help="the HTML file to write (default: RUN_DIR/report.html)")
    ap.add_argument("--bench", help="a `bench --json` file (default: RUN_DIR/bench.json, when there is one)")
    args = ap.parse_args(argv)
    try:
        page = render(load_run(args.run_dir, args.bench))
    except ReportError as e:
        raise SystemExit(f"error: {e}") from None
    out = args.out or os.path.join(args.run_dir, "report.html")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(out + ".tmp", out)
    print(f"wrote {out} ({os.path.getsize(out) / 1024:.0f} KiB)")
    return out


if __name__ == "__main__":
    main()
