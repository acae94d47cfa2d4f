"""Evaluation outputs: predictions.jsonl, metrics.json, fields.csv, field_accuracy.png and report.html.

The report is one HTML file with no external assets: a summary table (fine-tuned vs base, each column labelled
with how it was decoded), a per-field accuracy chart, the confidences' calibration, and every sample worst first,
named by its files, with a thumbnail of each of its pages (click: full size) beside gold and predicted values,
differences highlighted. Samples are shown 50 to a page and filtered by field, error type, confidence and name;
up to ``EMBED_LIMIT`` samples the thumbnails are embedded, above it they are files in ``report_files/``.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from .metrics import (SCALAR_METRICS, SampleScore, aggregate, align_lists, field_name, flatten, normalize_value,
                      parse_json, score_sample)

# columns, each a model decoded one way (constrained/unconstrained: the fine-tuned model decoded the other way)
MODELS = ("finetuned", "constrained", "unconstrained", "base")
DONUT = ("donut_ted_accuracy", "donut_field_f1")


def shown_metrics(protocol: str = "both") -> tuple[str, ...]:
    """The scalar metrics the console and the report show under ``metrics.protocol`` (metrics.json has all):
    Donut's two scores, this project's strict ones, or both. Validity and truncation belong to both."""
    if protocol == "donut":
        return DONUT + ("json_valid", "truncated")
    if protocol == "strict":
        return tuple(m for m in SCALAR_METRICS if m not in DONUT)
    return SCALAR_METRICS


def score_rows(rows: Sequence[dict[str, Any]], options: dict[str, Any], review_below: float = 0.0
               ) -> tuple[dict[str, list[SampleScore]], dict[str, Any]]:
    """Score stored predictions. Each row: {"id", "images", "gold", "<model>": {"raw", "truncated", "confidence"?}}.

    Returns:
        (per-model sample scores in row order, per-model aggregate metrics; with confidences, their calibration)
    """
    from .calibration import calibration

    models = [m for m in MODELS if rows and m in rows[0]]
    scores: dict[str, list[SampleScore]] = {m: [] for m in models}
    for row in rows:
        for m in models:
            out = row[m]
            scores[m].append(score_sample(out["raw"], row["gold"], truncated=bool(out.get("truncated")), **options))
    metrics = {m: aggregate(s) for m, s in scores.items()}
    for m in models:
        cal = calibration(rows, m, scores[m], options, review_below)
        if cal is not None:
            metrics[m]["calibration"] = cal
    return scores, metrics


def prediction_rows(rows: Sequence[dict[str, Any]], scores: dict[str, list[SampleScore]]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        r = {"id": row["id"], "images": row_images(row), "gold": row["gold"]}
        for m, sc in scores.items():
            ok, parsed = parse_json(row[m]["raw"])
            r[m] = {"raw": row[m]["raw"], "truncated": bool(row[m].get("truncated")), "parsed": parsed if ok else None,
                    "scores": sc[i].to_dict()}
            if row[m].get("confidence", False) is not False:
                r[m]["confidence"] = row[m]["confidence"]
        out.append(r)
    return out


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it once written whole: an evaluation killed or failing while
    it writes leaves each output as it was (or absent), never half of one for ``--from-predictions`` to re-score."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_fields_csv(path: Path, metrics: dict[str, Any]) -> None:
    models = [m for m in MODELS if m in metrics]
    fields = sorted({f for m in models for f in metrics[m].get("per_field_accuracy", {})})
    with _replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["field", "support"] + [f"{m}_accuracy" for m in models])
        for f in fields:
            support = next((metrics[m]["per_field_support"].get(f) for m in models if f in metrics[m]["per_field_support"]), 0)
            w.writerow([f, support] + [f"{metrics[m]['per_field_accuracy'].get(f, 0.0):.4f}" for m in models])


def field_chart_png(metrics: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if m in metrics]
    fields = sorted({f for m in models for f in metrics[m].get("per_field_accuracy", {})})
    fig, ax = plt.subplots(figsize=(7, 0.32 * max(len(fields), 3) + 1.2), dpi=110)
    height = 0.8 / max(len(models), 1)
    colors = {"finetuned": "#2563eb", "constrained": "#1e3a8a", "unconstrained": "#93c5fd", "base": "#9ca3af"}
    for j, m in enumerate(models):
        vals = [metrics[m]["per_field_accuracy"].get(f, 0.0) for f in fields]
        ax.barh([i + j * height for i in range(len(fields))], vals, height=height, label=m, color=colors[m])
    ax.set_yticks([i + height * (len(models) - 1) / 2 for i in range(len(fields))])
    ax.set_yticklabels(fields, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("field accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def row_images(row: dict[str, Any]) -> list[str]:
    """A row's document files (``images``; predictions written before multi-page documents have ``image``)."""
    if "images" in row:
        return list(row["images"])
    return [row["image"]] if row.get("image") else []


def _thumbnails(sources: Sequence[Any], max_side: int = 360) -> list[tuple[bytes, str]]:
    """(thumbnail JPEG, full-size link or "") for each page of a document; (b"", "") for a file that cannot be
    read."""
    from ..data.documents import FileSource, PageLimits, load_document

    out = []
    for src in sources:
        if isinstance(src, str):
            src = FileSource(Path(src))
        try:
            pages = load_document(src, PageLimits(render_pixels=max_side * max_side * 2, max_pages=10**6))
        except Exception:  # noqa: BLE001 - a missing image must not stop the report
            out.append((b"", ""))
            continue
        link = Path(src.path).resolve().as_uri() if isinstance(src, FileSource) else ""
        for k, im in enumerate(pages):
            im.thumbnail((max_side, max_side))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
            page_link = f"{link}#page={k + 1}" if link and len(pages) > 1 else link
            out.append((buf.getvalue(), page_link))
    return out


def _diff_rows(gold: Any, pred_raw: str, options: dict[str, Any], confidence: dict[str, Any] | None = None
               ) -> tuple[bool, list[list[Any]]]:
    """(output parses, [[field path, gold text, predicted text, status, confidence or None]]) of one sample;
    status is ok, wrong, missing, extra or text (a plain-text answer)."""
    ok, pred = parse_json(pred_raw)
    if isinstance(gold, str):
        # an answer stored as a JSON string (as Roboflow exports them) is compared per field, as the metrics do
        g_ok, g_val = parse_json(gold)
        if g_ok and isinstance(g_val, (dict, list)):
            gold = g_val
    if isinstance(gold, str):
        status = "ok" if pred_raw.strip() == gold.strip() else "wrong"
        return True, [["(text)", gold, pred_raw, status, None]]
    conf = (confidence or {}).get("fields") or {}
    if ok and options.get("list_matching") == "unordered":
        pred = align_lists(pred, gold)
        conf = {}  # confidences name the answer's own list positions, which alignment moved
    g = flatten(gold)
    p = {k: v for k, v in flatten(pred).items() if not k.endswith("__unmatched__")} if ok else {}
    norm = {k: options[k] for k in ("casefold", "whitespace", "numeric") if k in options}
    rows = []
    for path in list(g) + [k for k in p if k not in g]:
        gv, pv = g.get(path, None), p.get(path, None)
        if path not in p:
            cls = "missing"
        elif path not in g:
            cls = "extra"
        else:
            x, y = normalize_value(pv, **norm), normalize_value(gv, **norm)
            cls = "ok" if x == y and type(x) is type(y) else "wrong"
        rows.append([path, _text(gv) if path in g else None, _text(pv) if path in p else None, cls, conf.get(path)])
    return ok, rows


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _diff_table(gold: Any, pred_raw: str, options: dict[str, Any], confidence: dict[str, Any] | None = None,
                review_below: float = 0.0) -> str:
    """One sample's field-by-field comparison as an HTML table (the report builds the same in the browser)."""
    ok, rows = _diff_rows(gold, pred_raw, options, confidence)
    has_conf = any(r[4] is not None for r in rows)
    out = []
    for path, gv, pv, cls, c in rows:
        flag = " review" if c is not None and c < review_below else ""
        c_s = f'<td class="conf{flag}">{c:.2f}</td>' if has_conf and c is not None else ("<td></td>" if has_conf else "")
        out.append(f'<tr class="{cls}"><td>{html.escape(path)}</td><td>{"—" if gv is None else html.escape(gv)}</td>'
                   f'<td>{"—" if pv is None else html.escape(pv)}</td>{c_s}</tr>')
    head = "<tr><th>field</th><th>gold</th><th>predicted</th>" + ("<th>confidence</th>" if has_conf else "") + "</tr>"
    note = "" if ok else '<p class="bad">output is not valid JSON: every field counts as missing</p>'
    return f'{note}<table class="diff">{head}{"".join(out)}</table>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px} .muted{color:#666}
table{border-collapse:collapse} td,th{padding:4px 10px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
table.summary td.num{text-align:right;font-variant-numeric:tabular-nums} .better{color:#15803d;font-weight:600}
.sample{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px;margin:12px 0;display:flex;gap:16px}
.sample img{max-width:360px;border:1px solid #ddd;display:block;margin-bottom:6px;cursor:zoom-in} .sample .meta{font-size:12px;color:#444;margin-bottom:6px}
table.diff{font:12px/1.35 ui-monospace,SFMono-Regular,Menlo,monospace}
tr.ok td{color:#166534} tr.wrong td{background:#fef2f2;color:#991b1b} tr.missing td{background:#fff7ed;color:#9a3412}
tr.extra td{background:#eff6ff;color:#1e40af} .bad{color:#b91c1c;font-weight:600} pre{white-space:pre-wrap;max-width:720px}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border-radius:4px;font-size:12px}
td.conf{text-align:right;color:#555} td.conf.review{color:#b45309;font-weight:700} .rev{color:#b45309}
#filters{display:flex;flex-wrap:wrap;gap:8px 16px;margin:8px 0} #filters label{font-size:13px}
#filters select,#filters input{font:inherit;padding:2px 4px;max-width:240px}
.pager{display:flex;gap:12px;align-items:center;margin:8px 0} .pager button{font:inherit;padding:3px 10px}
.sample .pages{flex:0 0 auto} .sample .body{min-width:0;flex:1 1 auto;overflow-x:auto}
#zoom{position:fixed;inset:0;background:rgba(0,0,0,.82);display:flex;flex-direction:column;align-items:center;
justify-content:center;z-index:10;cursor:zoom-out} #zoom[hidden]{display:none} #zoom img{max-width:96vw;max-height:90vh;
background:#fff} #zoom p{color:#ddd} .scroll{overflow-x:auto} img.chart,#reliability{max-width:100%;height:auto}
@media (max-width: 760px){body{margin:10px}.sample{flex-direction:column}.sample img{max-width:100%}
table.diff{font-size:11px}}
"""


def reliability_png(metrics: dict[str, Any]) -> bytes | None:
    """Reliability diagram of each model with confidences: accuracy against mean confidence per bin."""
    models = [m for m in MODELS if m in metrics and "calibration" in metrics[m]]
    if not models:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), dpi=110)
    for ax, level in zip(axes, ("fields", "documents")):
        ax.plot([0, 1], [0, 1], color="#9ca3af", lw=1, ls="--", label="perfect calibration")
        for m in models:
            table = metrics[m]["calibration"][level]
            if not table["bins"]:
                continue
            xs = [b["confidence"] for b in table["bins"]]
            ys = [b["accuracy"] for b in table["bins"]]
            ax.plot(xs, ys, marker="o", label=f"{m} (ECE {table['ece']:.3f}, n={table['n']})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence")
        ax.set_ylabel("share right" if level == "fields" else "share exactly right")
        ax.set_title(level, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _calibration_html(metrics: dict[str, Any], review_below: float) -> str:
    models = [m for m in MODELS if m in metrics and "calibration" in metrics[m]]
    if not models:
        return ""
    png = reliability_png(metrics)
    parts = ['<h2>Confidence</h2><p class="muted">Each field\'s confidence is the probability of the tokens that '
             'spell it; a document\'s, the product over its fields. Below: how often fields (and whole documents) '
             'at each confidence were right, and what a review threshold would flag.</p>']
    if png:
        parts.append(f'<img id="reliability" alt="reliability diagram" '
                     f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    for m in models:
        cal = metrics[m]["calibration"]
        rows = "".join(
            f'<tr{" class=chosen" if r["threshold"] == review_below else ""}><td class="num">{r["threshold"]:g}</td>'
            f'<td class="num">{_pct(r["share_documents_flagged"])}</td><td class="num">{r["fields_flagged"]}</td>'
            f'<td class="num">{_pct(r["field_accuracy_unflagged"])}</td>'
            f'<td class="num">{_pct(r["exact_match_unflagged"])}</td></tr>'
            for r in cal["review_sweep"] + ([cal["review"]] if "review" in cal and
                                            cal["review"]["threshold"] not in {r["threshold"] for r in
                                                                               cal["review_sweep"]} else []))
        ece = lambda t: "—" if t["ece"] is None else f'{t["ece"]:.3f}'  # noqa: E731
        parts.append(f'<h3>{m}: field ECE {ece(cal["fields"])}, document ECE {ece(cal["documents"])}</h3>'
                     f'<table class="summary review"><tr><th>review below</th><th>documents flagged</th>'
                     f'<th>fields flagged</th><th>field accuracy, unflagged</th><th>exact match, unflagged</th></tr>'
                     f'{rows}</table>')
    return "".join(parts)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


EMBED_LIMIT = 200  # up to this many samples the report is one self-contained file; above, thumbnails go beside it
PAGE_SIZE = 50


def _not_scored_html(problems: Sequence[str], shown: int = 20) -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems[:shown])
    more = f"<li>... and {len(problems) - shown} more (qwenvl-tune check lists them all)</li>" if len(problems) > shown else ""
    return (f'<div class="bad" id="not-scored"><p><b>{len(problems)} row(s) of this split could not be read and are not '
            f'scored</b>; the scores below leave them out:</p><ul>{items}{more}</ul></div>')


def write_html(path: Path, title: str, rows: Sequence[dict[str, Any]], metrics: dict[str, Any], chart_png: bytes,
               options: dict[str, Any], decoding: dict[str, str] | None = None,
               sources: dict[str, Sequence[Any]] | None = None, review_below: float = 0.0,
               protocol: str = "both", not_scored: Sequence[str] = ()) -> None:
    """The report: summary, charts, calibration, then the samples worst first, a page at a time, with filters by
    field, by error type, by confidence and by name. The samples travel as JSON and are drawn by the page's script,
    so 10,000 of them make a few MB of HTML; above ``EMBED_LIMIT`` samples the page thumbnails are files in
    ``report_files/`` beside it instead of being embedded. ``not_scored``: the split's invalid rows, each named
    at the top, as the scores leave them out."""
    models = [m for m in MODELS if m in metrics]
    decoding = decoding or {}
    head = "".join(f'<th>{m}<br><span class="muted">{html.escape(decoding.get(m, ""))}</span></th>' for m in models)
    summary = []
    for name in shown_metrics(protocol):
        vals = [metrics[m][name] for m in models]
        cells = "".join(f'<td class="num">{v:.3f}</td>' for v in vals)
        summary.append(f"<tr><td>{name}</td>{cells}</tr>")
    summary.append("<tr><td>samples</td>" + "".join(f'<td class="num">{metrics[m]["n"]}</td>' for m in models) + "</tr>")
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["finetuned"]["scores"]["f1"],
                                                     -rows[i]["finetuned"]["scores"]["edit_distance"]))
    embed = len(rows) <= EMBED_LIMIT
    files = path.parent / "report_files"
    if not embed:
        files.mkdir(exist_ok=True)
    # Decoding and shrinking images dominates a large report; PIL releases the GIL while doing it.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2))) as pool:
        thumbs = dict(zip(order, pool.map(lambda i: _thumbnails((sources or {}).get(rows[i]["id"]) or
                                                                 rows[i]["images"]), order)))
    samples = []
    fields_seen: set[str] = set()
    for rank, i in enumerate(order, 1):
        r = rows[i]
        ft = r["finetuned"]
        sc = ft["scores"]
        pages = []
        for k, (jpeg, link) in enumerate(thumbs[i], 1):
            if not jpeg:
                pages.append(["", ""])
            elif embed:
                pages.append(["data:image/jpeg;base64," + base64.b64encode(jpeg).decode(), link])
            else:
                name = f"{rank:06d}_{k}.jpg"
                (files / name).write_bytes(jpeg)
                pages.append([f"report_files/{name}", link])
        ok, diff = _diff_rows(r["gold"], ft["raw"], options, ft.get("confidence"))
        fields_seen.update(field_name(d[0]) for d in diff)
        conf = ft.get("confidence")
        sample = {"id": r["id"], "rank": rank,
                  "names": [Path(n).name if "/" in n and "[" not in n else n for n in r["images"]],
                  "f1": sc["f1"], "ed": sc["edit_distance"], "ted": sc["ted_accuracy"], "valid": sc["json_valid"],
                  "truncated": sc["truncated"], "parses": ok, "pages": pages, "rows": diff, "raw": ft["raw"],
                  "conf": conf["document"] if conf else None}
        if review_below and "confidence" in ft:
            sample["review"] = conf is None or any(c is not None and c < review_below for *_, c in diff)
        if "base" in r:
            b = r["base"]["scores"]
            sample["base"] = {"f1": b["f1"], "ed": b["edit_distance"], "raw": r["base"]["raw"]}
        samples.append(sample)
    data = json.dumps({"samples": samples, "fields": sorted(fields_seen), "review_below": review_below,
                       "page_size": PAGE_SIZE}, ensure_ascii=False).replace("</", "<\\/")
    chart = base64.b64encode(chart_png).decode()
    has_conf = any(s_["conf"] is not None for s_ in samples)
    conf_filter = ('<label>document confidence below <input id="f-conf" type="number" min="0" max="1" step="0.05" '
                   'placeholder="any"></label>' + ('<label><input id="f-review" type="checkbox"> needs review</label>'
                                                   if review_below else "")) if has_conf else ""
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>{_not_scored_html(not_scored)}<p class="muted">{len(rows)} samples · list matching: {html.escape(str(options.get("list_matching")))}
· normalisation: casefold={options.get("casefold")}, whitespace={options.get("whitespace")}, numeric={options.get("numeric")}</p>
<h2>Summary</h2><div class="scroll"><table class="summary" id="summary"><tr><th>metric</th>{head}</tr>{"".join(summary)}</table></div>
<h2>Field accuracy</h2><img id="field-chart" class="chart" alt="per-field accuracy" src="data:image/png;base64,{chart}">
{_calibration_html(metrics, review_below)}
<h2>Samples, worst first</h2>
<div id="filters"><label>field <select id="f-field"><option value="">any</option></select></label>
<label>showing <select id="f-error"><option value="">all samples</option><option value="errors">with any error</option>
<option value="wrong">a wrong value</option><option value="missing">a missing field</option><option value="extra">an extra field</option>
<option value="invalid">invalid JSON</option><option value="truncated">cut off at max_new_tokens</option><option value="right">all right</option></select></label>
{conf_filter}<label>name <input id="f-name" type="search" placeholder="file or id"></label></div>
<p class="legend"><span style="background:#fef2f2">wrong</span><span style="background:#fff7ed">missing</span><span style="background:#eff6ff">extra</span><span style="color:#166534">correct</span>
<span id="count" class="muted"></span></p>
<nav class="pager"><button id="prev">‹ previous</button><span id="where"></span><button id="next">next ›</button></nav>
<div id="samples"></div>
<nav class="pager"><button id="prev2">‹ previous</button><span id="where2"></span><button id="next2">next ›</button></nav>
<div id="zoom" hidden><img alt="page, full size"><p class="muted">click or press Esc to close</p></div>
<script id="data" type="application/json">{data}</script>
<script>{SCRIPT}</script></body></html>"""
    with _replacing(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")


SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const fieldOf = (p) => p.replace(/\[\d+\]/g, '[]');
let shown = D.samples, page = 0;
for (const f of D.fields) { const o = document.createElement('option'); o.value = o.textContent = f; $('f-field').append(o); }
function matches(s) {
  const field = $('f-field').value, err = $('f-error').value, name = $('f-name').value.trim().toLowerCase();
  const rows = field ? s.rows.filter(r => fieldOf(r[0]) === field) : s.rows;
  if (field && !rows.length) return false;
  const bad = rows.filter(r => r[3] !== 'ok');
  if (err === 'errors' && !bad.length && s.valid) return false;
  if (['wrong', 'missing', 'extra'].includes(err) && !rows.some(r => r[3] === err)) return false;
  if (err === 'invalid' && s.parses) return false;
  if (err === 'truncated' && !s.truncated) return false;
  if (err === 'right' && (bad.length || !s.valid)) return false;
  if (!err && field && !bad.length && s.valid) return false;  // a field chosen: the samples where it is not right
  const c = $('f-conf') ? parseFloat($('f-conf').value) : NaN;
  if (!isNaN(c) && !(s.conf === null || s.conf < c)) return false;
  if ($('f-review') && $('f-review').checked && !s.review) return false;
  if (name && !(s.id.toLowerCase().includes(name) || s.names.some(n => n.toLowerCase().includes(name)))) return false;
  return true;
}
function table(s) {
  const conf = s.rows.some(r => r[4] !== null);
  let h = '<table class="diff"><tr><th>field</th><th>gold</th><th>predicted</th>' + (conf ? '<th>confidence</th>' : '') + '</tr>';
  for (const [path, g, p, cls, c] of s.rows) {
    const flag = c !== null && c < D.review_below ? ' review' : '';
    h += `<tr class="${cls}"><td>${esc(path)}</td><td>${g === null ? '—' : esc(g)}</td><td>${p === null ? '—' : esc(p)}</td>` +
         (conf ? `<td class="conf${flag}">${c === null ? '' : c.toFixed(2)}</td>` : '') + '</tr>';
  }
  return (s.parses ? '' : '<p class="bad">output is not valid JSON: every field counts as missing</p>') + h + '</table>';
}
function card(s) {
  const pages = s.pages.map(([src, full], k) => src ?
    `<a class="page" href="${esc(full || src)}" data-full="${esc(full || src)}" title="page ${k + 1}: full size"><img alt="${esc(s.id)} page ${k + 1}" src="${esc(src)}"></a>` :
    `<p class="bad">page ${k + 1} unavailable</p>`).join('') || '<p class="bad">image unavailable</p>';
  const flags = (s.truncated ? ' · <b>cut off at max_new_tokens</b>' : '') + (s.valid ? '' : ' · <b>invalid JSON</b>') +
    (s.conf !== null ? ` · confidence ${s.conf.toFixed(2)}` : '') + (s.review ? ' · <b class="rev">needs review</b>' : '');
  const base = s.base ? `<details><summary>base model: F1 ${s.base.f1.toFixed(2)}, edit distance ${s.base.ed.toFixed(2)}</summary><pre>${esc(s.base.raw)}</pre></details>` : '';
  return `<div class="sample" data-id="${esc(s.id)}"><div class="pages">${s.pages.length > 1 ? `<span class="muted">${s.pages.length} pages</span>` : ''}${pages}</div><div class="body">` +
    `<div class="meta">#${s.rank} · ${esc(s.names.join(', ') || s.id)} · ${esc(s.id)} · field F1 ${s.f1.toFixed(2)} · edit distance ${s.ed.toFixed(3)} · tree accuracy ${s.ted.toFixed(2)}${flags}</div>` +
    table(s) + `<details><summary>raw output</summary><pre>${esc(s.raw)}</pre></details>${base}</div></div>`;
}
function draw() {
  const pages = Math.max(1, Math.ceil(shown.length / D.page_size));
  page = Math.min(page, pages - 1);
  $('samples').innerHTML = shown.slice(page * D.page_size, (page + 1) * D.page_size).map(card).join('');
  const where = shown.length ? `page ${page + 1} of ${pages}` : 'no sample matches';
  $('where').textContent = $('where2').textContent = where;
  $('count').textContent = `${shown.length} of ${D.samples.length} samples`;
  for (const id of ['prev', 'prev2']) $(id).disabled = page === 0;
  for (const id of ['next', 'next2']) $(id).disabled = page >= pages - 1;
}
function refilter() { shown = D.samples.filter(matches); page = 0; draw(); }
for (const id of ['f-field', 'f-error', 'f-conf', 'f-review', 'f-name']) if ($(id)) $(id).addEventListener('input', refilter);
for (const id of ['prev', 'prev2']) $(id).addEventListener('click', () => { page--; draw(); window.scrollTo(0, $('filters').offsetTop); });
for (const id of ['next', 'next2']) $(id).addEventListener('click', () => { page++; draw(); window.scrollTo(0, $('filters').offsetTop); });
$('samples').addEventListener('click', (e) => {
  const a = e.target.closest('a.page'); if (!a) return;
  const full = a.dataset.full;
  if (/\.pdf(#|$)/i.test(full)) return;  // a PDF opens in the browser's own viewer
  e.preventDefault(); $('zoom').querySelector('img').src = full; $('zoom').hidden = false;
});
$('zoom').addEventListener('click', () => { $('zoom').hidden = true; });
document.addEventListener('keydown', (e) => { if (e.key === 'Escape') $('zoom').hidden = true; });
draw();
"""


def write_outputs(out_dir: Path, title: str, rows: Sequence[dict[str, Any]], options: dict[str, Any],
                  extra: dict[str, Any] | None = None, html_report: bool = True,
                  sources: dict[str, Sequence[Any]] | None = None, review_below: float = 0.0,
                  protocol: str = "both") -> dict[str, Any]:
    """Score ``rows`` and write every evaluation output into ``out_dir``; returns the metrics dict.

    ``sources`` (row id -> the document's ``Source``s) lets the report show pages held in a dataset table;
    without it the report reads each row's ``images`` as file paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, metrics = score_rows(rows, options, review_below)
    scored = prediction_rows(rows, scores)
    with _replacing(out_dir / "predictions.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in scored:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    result = {**(extra or {}), "options": options, "protocol": protocol, **metrics}
    with _replacing(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    write_fields_csv(out_dir / "fields.csv", metrics)
    if html_report and rows:
        png = field_chart_png(metrics)
        with _replacing(out_dir / "field_accuracy.png") as tmp:
            tmp.write_bytes(png)
        write_html(out_dir / "report.html", title, scored, metrics, png, options, (extra or {}).get("decoding"),
                   sources, review_below, protocol, not_scored=(extra or {}).get("problems", ()))
    return result


def read_predictions(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                rows.append({k: ({"raw": v["raw"], "truncated": v.get("truncated", False),
                                  **({"confidence": v["confidence"]} if "confidence" in v else {})}
                                 if k in MODELS else v)
                             for k, v in r.items()})
    return rows


def format_metrics(results: dict[str, Any]) -> str:
    """The console table of an evaluation: one column per decoded model, labelled with how it was decoded."""
    cols = [k for k in MODELS if k in results]
    w = 15
    lines = [f"{'metric':<18}" + "".join(f"{c:>{w}}" for c in cols), "-" * (18 + w * len(cols))]
    for m in shown_metrics(results.get("protocol", "both")):
        lines.append(f"{m:<18}" + "".join(f"{results[c][m]:>{w}.3f}" for c in cols))
    lines.append(f"{'samples':<18}" + "".join(f"{results[c]['n']:>{w}d}" for c in cols))
    problems = results.get("problems") or []
    if problems:
        lines.append(f"  not scored: {len(problems)} row(s) of the split could not be read (qwenvl-tune check lists "
                     f"them all):")
        lines += [f"    {p}" for p in problems[:5]] + (["    ..."] if len(problems) > 5 else [])
    for c, how in (results.get("decoding") or {}).items():
        lines.append(f"  {c}: {how}")
    for c in cols:
        cut = round(results[c]["truncated"] * results[c]["n"])
        if cut:
            limit = results.get("max_new_tokens")
            lines.append(f"  {c}: {cut} of {results[c]['n']} answers cut off at generate.max_new_tokens"
                         + (f" ({limit}); if the gold answers are that long, raise --generate.max_new_tokens" if limit
                            else ""))
    for c in cols:
        cal = results[c].get("calibration")
        if not cal:
            continue
        f, d = cal["fields"], cal["documents"]
        if not f["n"]:
            lines.append(f"  {c} confidence: no answer parsed, so no field has one")
            continue
        lines.append(f"  {c} confidence: calibration error (ECE) {f['ece']:.3f} over {f['n']} fields"
                     + (f", {d['ece']:.3f} over {d['n']} documents" if d["n"] else ""))
        if "review" in cal:
            r = cal["review"]
            lines.append(f"  {c} review below {r['threshold']:g}: {r['documents_flagged']} document(s) flagged "
                         f"({_pct(r['share_documents_flagged'])}), field accuracy of the rest "
                         f"{_pct(r['field_accuracy_unflagged'])} (flagged: {_pct(r['field_accuracy_flagged'])})")
    return "\n".join(lines)
