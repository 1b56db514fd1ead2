"""The HTML page of `kledger report`: one self-contained file (inline CSS, SVG and script; nothing
fetched, no server). The data (kledger.report.collect) is embedded as JSON; the commit and fact
tables are drawn a page at a time from it by the script, so a ledger of 10,000 facts gives a page
of a few megabytes and a small document tree. The conflict graph and the metric plots are SVG made
here. Every text from the ledger reaches the page escaped (html.escape here, textContent in the
script): a fact's text cannot inject markup."""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

PAGE_ROWS = 50
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .sub{color:#b8c0cc;font-size:13px;word-break:break-all}
nav{padding:8px 24px;background:#e8ebf0;position:sticky;top:0;z-index:2}nav a{margin-right:18px;color:#1d4ed8}
main{padding:0 24px 40px}section{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:18px 0;padding:12px 16px}
h2{font-size:17px;margin:4px 0 10px}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #dde1e7;border-radius:6px;padding:6px 12px;min-width:110px;background:#fafbfc}
.card b{display:block;font-size:18px}.card span{color:#5b6575;font-size:12px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:0 8px;border-bottom:1px solid #eef0f3;vertical-align:top}
th{background:#fafbfc;font-weight:600;line-height:30px}
.rows td{height:30px;line-height:30px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;max-width:420px}
.facts td{line-height:20px;padding:5px 8px}
code,.id{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}.id{color:#9a6700}
.ref{background:#dbeafe;color:#1e3a8a;border-radius:9px;padding:0 7px;margin-right:4px;font-size:12px}
.add{color:#15803d}.ret{color:#b91c1c}.muted{color:#6b7280}.ev{font-size:12.5px;white-space:normal}
.tools{display:flex;gap:10px;align-items:center;margin:6px 0 10px;flex-wrap:wrap}
input[type=search]{padding:4px 8px;width:320px;border:1px solid #c5cbd3;border-radius:4px}
button{padding:3px 10px;border:1px solid #c5cbd3;background:#fff;border-radius:4px;cursor:pointer}
button:disabled{opacity:.4;cursor:default}.graphrow{display:flex}.graphrow svg{flex:none}
.graphrow table{flex:1;table-layout:fixed}.state-in{color:#15803d}.state-out{color:#b91c1c}
.plot{margin:6px 0 14px}.legend{font-size:12px}.note{color:#5b6575;font-size:13px}
"""

SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("kledger-data").textContent);
const PAGE = %(page)d, ROW = 30, LANE = 14;
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
function svgEl(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}
const short = id => id ? id.slice(0, 10) : "";
const firstLine = m => (m || "").split("\n")[0];
function pager(name, total, render) {
  const box = document.getElementById(name + "-pager");
  const state = {page: 0};
  const info = el("span", {"class": "muted"});
  const prev = el("button", {"type": "button", "id": name + "-prev"}, "‹ previous");
  const next = el("button", {"type": "button", "id": name + "-next"}, "next ›");
  function show() {
    const n = total(), pages = Math.max(1, Math.ceil(n / PAGE));
    state.page = Math.min(state.page, pages - 1);
    info.textContent = n ? `${state.page * PAGE + 1}–${Math.min(n, (state.page + 1) * PAGE)} of ${n}` : "none";
    prev.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
    render(state.page * PAGE, Math.min(n, (state.page + 1) * PAGE));
  }
  prev.onclick = () => { state.page--; show(); };
  next.onclick = () => { state.page++; show(); };
  box.replaceChildren(prev, info, next);
  state.show = () => { state.page = 0; show(); };
  show();
  return state;
}
// ---------------------------------------------------------------- commits
let commitRows = DATA.commits.map((c, i) => i);
function drawGraph(svg, lo, hi) {
  const width = DATA.lanes * LANE + 6;
  svg.setAttribute("width", width); svg.setAttribute("height", (hi - lo) * ROW + ROW);
  const x = c => 8 + c * LANE, y = r => ROW + (r - lo) * ROW + ROW / 2;
  for (const [child, parent, lane] of DATA.edges) {
    if (parent < lo || child >= hi) continue;
    const cc = DATA.commits[child].col, pc = DATA.commits[parent].col;
    const pts = [[x(cc), y(child)], [x(lane), y(Math.min(child + 1, parent))],
                 [x(lane), y(Math.max(parent - 1, child + 1))], [x(pc), y(parent)]];
    svg.append(svgEl("polyline", {points: pts.map(p => p.join(",")).join(" "), fill: "none",
                                  stroke: "#8792a2", "stroke-width": 2}));
  }
  for (let r = lo; r < hi; r++) {
    const c = DATA.commits[r];
    const merge = c.parents.length > 1;
    svg.append(svgEl("circle", {cx: x(c.col), cy: y(r), r: merge ? 6 : 5, fill: merge ? "#fff" : "#1d4ed8",
                                stroke: "#1d4ed8", "stroke-width": 2}));
  }
}
function renderCommits(lo, hi) {
  const body = document.getElementById("commits-body");
  const svg = document.getElementById("commits-graph");
  svg.replaceChildren();
  const filtered = commitRows.length !== DATA.commits.length;
  svg.style.display = filtered ? "none" : "";
  if (!filtered) drawGraph(svg, lo, hi);
  body.replaceChildren(...commitRows.slice(lo, hi).map(i => {
    const c = DATA.commits[i];
    const refs = c.refs.map(r => el("span", {"class": "ref"}, r));
    return el("tr", {"class": "commit", "id": "c-" + c.id},
      el("td", {}, el("span", {"class": "id", "title": c.id}, short(c.id))),
      el("td", {"title": c.message}, ...refs, firstLine(c.message)),
      el("td", {}, el("span", {"class": "add"}, "+" + c.added), " ", el("span", {"class": "ret"}, "−" + c.retracted),
         c.resolved ? el("span", {"class": "muted"}, ` · ${c.resolved} decided`) : ""),
      el("td", {"title": c.author}, c.author), el("td", {}, c.date.replace("T", " ").slice(0, 16)));
  }));
}
const commitPager = pager("commits", () => commitRows.length, renderCommits);
document.getElementById("commit-filter").addEventListener("input", ev => {
  const q = ev.target.value.trim().toLowerCase();
  const hit = c => [c.id, c.message, c.author].some(s => s.toLowerCase().includes(q));
  commitRows = DATA.commits.map((c, i) => i).filter(i => !q || hit(DATA.commits[i]));
  commitPager.show();
});
// ---------------------------------------------------------------- facts
let factRows = DATA.facts.map((f, i) => i);
function factEvent([row, op, other]) {
  const c = DATA.commits[row];
  let verb = op === "add" ? "added" : "retracted";
  if (other && other.length) verb = op === "add" ? `changed from ${other.join(", ")}` : `changed to ${other.join(", ")}`;
  return el("div", {"class": "ev"}, el("span", {"class": op === "add" ? "add" : "ret"}, verb), " in ",
    el("a", {"class": "id", "href": "#c-" + c.id, "title": c.id}, short(c.id)), ` by ${c.author}, ${c.date.slice(0, 10)}: `,
    el("span", {"class": "muted"}, firstLine(c.message)));
}
function renderFacts(lo, hi) {
  document.getElementById("facts-body").replaceChildren(...factRows.slice(lo, hi).map(i => {
    const f = DATA.facts[i];
    return el("tr", {"class": "fact"},
      el("td", {}, f.subject), el("td", {}, f.relation),
      el("td", {}, f.prompt + " ", el("b", {}, f.target), f.target_true ? el("span", {"class": "muted"}, ` (was ${f.target_true})`) : ""),
      el("td", {"class": f.in_force ? "state-in" : "state-out"}, f.in_force ? "in force" : "not in force"),
      el("td", {}, ...f.events.map(factEvent)));
  }));
}
const factPager = pager("facts", () => factRows.length, renderFacts);
function filterFacts() {
  const q = document.getElementById("fact-filter").value.trim().toLowerCase();
  const st = document.getElementById("fact-state").value;
  factRows = DATA.facts.map((f, i) => i).filter(i => {
    const f = DATA.facts[i];
    if (st === "in" && !f.in_force) return false;
    if (st === "out" && f.in_force) return false;
    return !q || [f.subject, f.relation, f.prompt, f.target, f.id].some(s => s.toLowerCase().includes(q));
  });
  factPager.show();
}
document.getElementById("fact-filter").addEventListener("input", filterFacts);
document.getElementById("fact-state").addEventListener("change", filterFacts);
document.body.dataset.ready = "1";
"""


def render(data: dict[str, Any]) -> str:
    """The whole page as one string."""
    title = f"kledger report · {data['ledger']}"
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:\">",
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        _header(data),
        _commits_section(data), _facts_section(data), _conflicts_section(data), _metrics_section(data),
        "</main>", f'<script type="application/json" id="kledger-data">{blob}</script>',
        f"<script>{SCRIPT % {'page': PAGE_ROWS}}</script></body></html>",
    ]
    return "\n".join(parts)


def _header(d: dict) -> str:
    rev = d["revision"]
    where = ("all branches" if d["all"] else f"revision {rev[:10]}") if rev else "no commits yet"
    cards = [("commits", len(d["commits"])), ("facts in force", d["in_force"]), ("facts in history", len(d["facts"])),
             ("open conflicts", len(d["conflicts"]["open"])), ("decided conflicts", len(d["conflicts"]["decided"]))]
    return (f"<header><h1>kledger report</h1><div class=\"sub\">{escape(d['ledger'])} · model "
            f"{escape(str(d['model']))} · branch {escape(str(d['branch'] or '(detached)'))} · {escape(where)} · "
            f"made {escape(d['generated'])} by kledger {escape(d['kledger'])}</div></header>"
            '<nav><a href="#commits">Commits</a><a href="#facts">Facts</a><a href="#conflicts">Conflicts</a>'
            '<a href="#metrics">Metrics</a></nav><main><section id="summary"><div class="cards">'
            + "".join(f'<div class="card"><b>{v}</b><span>{escape(k)}</span></div>' for k, v in cards)
            + "</div></section>")


def _commits_section(d: dict) -> str:
    return ('<section id="commits"><h2>Commits</h2><div class="tools">'
            '<input type="search" id="commit-filter" placeholder="Filter by id, message or author" aria-label="Filter commits">'
            '<span id="commits-pager"></span></div><div class="graphrow"><svg id="commits-graph" aria-label="Commit graph"></svg>'
            '<table class="rows"><colgroup><col style="width:110px"><col><col style="width:150px"><col style="width:160px">'
            '<col style="width:150px"></colgroup><thead><tr><th>commit</th><th>message</th><th>facts</th><th>author</th>'
            '<th>date</th></tr></thead><tbody id="commits-body"></tbody></table></div></section>')


def _facts_section(d: dict) -> str:
    return ('<section id="facts"><h2>Facts and their history</h2><div class="tools">'
            '<input type="search" id="fact-filter" placeholder="Filter by subject, relation, prompt or object" '
            'aria-label="Filter facts"><select id="fact-state" aria-label="Which facts"><option value="all">all facts'
            '</option><option value="in">in force</option><option value="out">not in force</option></select>'
            '<span id="facts-pager"></span></div><table class="facts"><thead><tr><th>subject</th><th>relation</th>'
            '<th>prompt → object</th><th>state</th><th>history (oldest first)</th></tr></thead>'
            '<tbody id="facts-body"></tbody></table></section>')


def _conflicts_section(d: dict) -> str:
    c = d["conflicts"]
    rows = []
    for x in c["open"]:
        who = "; ".join(f"{f['target']} ({(f.get('commit') or 'staged')[:10]}, {f.get('author') or ''})" for f in x["facts"])
        rows.append(f"<tr class=\"open-conflict\"><td>{escape(x['subject'])}</td><td>{escape(x['relation'])}</td>"
                    f"<td>{escape(x['kind'])}</td><td>{escape(who or ', '.join(x['objects']))}</td>"
                    f"<td class=\"id\">{escape(x['conflict'][:10])}</td></tr>")
    open_table = ("<p class=\"note\">No open conflicts at this revision.</p>" if not rows else
                  "<table><thead><tr><th>subject</th><th>relation</th><th>kind</th><th>claims (commit, author)</th>"
                  "<th>conflict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    drows = [f"<tr class=\"decided-conflict\"><td>{escape(str(x['subject']))}</td><td>{escape(str(x['relation']))}</td>"
             f"<td>{escape(', '.join(x['keep']))}</td><td>{escape(', '.join(o for o in x['objects'] if o not in x['keep']))}</td>"
             f"<td>{escape(str(x['by']))}{' (remembered)' if x['remembered'] else ''}</td><td>{escape(str(x['at'])[:16])}</td>"
             f"<td><a class=\"id\" href=\"#c-{escape(x['commit'])}\">{escape(x['commit'][:10])}</a></td></tr>"
             for x in c["decided"]]
    decided = ("<p class=\"note\">No decisions recorded in this history.</p>" if not drows else
               "<table><thead><tr><th>subject</th><th>relation</th><th>kept</th><th>dropped</th><th>decided by</th>"
               "<th>when</th><th>commit</th></tr></thead><tbody>" + "".join(drows) + "</tbody></table>")
    return (f'<section id="conflicts"><h2>Conflicts</h2><h3>Open ({len(c["open"])})</h3>{open_table}'
            f'<h3>Decided ({len(c["decided"])})</h3>{decided}<h3>Contradiction graph</h3>{conflict_svg(d["graph"])}</section>')


def conflict_svg(g: dict) -> str:
    """Facts as dots, contradictions as lines: open ones red, decided ones grey and dashed."""
    if not g["nodes"]:
        return '<p class="note">No contradictions to draw.</p>'
    pos = {n["id"]: n for n in g["nodes"]}
    w = max(n["x"] for n in g["nodes"]) + 130
    h = max(n["y"] for n in g["nodes"]) + 60
    out = [f'<svg id="conflict-graph" width="{w:.0f}" height="{h:.0f}" viewBox="-20 -10 {w + 20:.0f} {h + 10:.0f}" '
           'role="img" aria-label="Contradiction graph">']
    for e in g["edges"]:
        a, b = pos[e["a"]], pos[e["b"]]
        style = ('stroke="#dc2626" stroke-width="2.5"' if e["state"] == "open"
                 else 'stroke="#9ca3af" stroke-width="2" stroke-dasharray="5 4"')
        out.append(f'<line class="edge-{e["state"]}" x1="{a["x"]}" y1="{a["y"]}" x2="{b["x"]}" y2="{b["y"]}" {style}>'
                   f'<title>{escape(e["kind"])} contradiction ({escape(e["state"])})</title></line>')
    for n in g["nodes"]:
        label = n["label"] if len(n["label"]) <= 34 else n["label"][:33] + "…"
        fill = "#fee2e2" if n["open"] else "#f3f4f6"
        out.append(f'<g class="node"><circle cx="{n["x"]}" cy="{n["y"]}" r="7" fill="{fill}" stroke="#374151"/>'
                   f'<text x="{n["x"]}" y="{n["y"] + 20}" text-anchor="middle" font-size="11">{escape(label)}</text>'
                   f'<title>{escape(n["label"])} ({escape(n["id"][:10])})</title></g>')
    out.append("</svg>")
    more = (f'<p class="note">{g["shown"]} of {g["groups"]} groups drawn; the tables above list every conflict.</p>'
            if g["shown"] < g["groups"] else "")
    legend = ('<p class="legend"><span style="color:#dc2626">━ open</span> &nbsp; '
              '<span style="color:#9ca3af">╍ decided</span> &nbsp; each dot is a fact</p>')
    return legend + "".join(out) + more


def _metrics_section(d: dict) -> str:
    m = d["metrics"]
    if not m["points"]:
        body = ('<p class="note">No evaluation results were given. Run <code>kledger eval --plot FILE.png --json '
                '&gt; eval.json</code> and make the report with <code>--eval eval.json</code> to plot the metrics '
                'along the history.</p>')
    else:
        labels = [p["label"] for p in m["points"]]
        rates = [s for s in m["series"] if s["unit"] == "rate"]
        body = line_plot("metrics-rates", labels, rates, 0.0, 1.0, "rate / probability") if rates else ""
        for s in m["series"]:
            if s["unit"] != "rate":
                ys = [y for y in s["ys"] if y is not None]
                body += line_plot(f"metrics-{s['name']}", labels, [s], min(ys), max(ys), s["name"])
        if m["skipped"]:
            body += f'<p class="note">{m["skipped"]} point(s) of commits outside this history left out.</p>'
    return f'<section id="metrics"><h2>Evaluation along the history</h2>{body}</section>'


def line_plot(pid: str, labels: list[str], series: list[dict], lo: float, hi: float, ylabel: str) -> str:
    """An SVG line plot: one x position per label, each series a coloured line with dots."""
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    left, top, pw, ph = 56, 14, max(260, 46 * len(labels)), 200
    x = [left + (pw * i / max(1, len(labels) - 1) if len(labels) > 1 else pw / 2) for i in range(len(labels))]

    def y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    out = [f'<svg class="plot" id="{escape(pid)}" width="{left + pw + 250}" height="{top + ph + 70}" role="img" '
           f'aria-label="{escape(ylabel)}">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafbfc" stroke="#c5cbd3"/>']
    places = max(0, 1 - math.floor(math.log10((hi - lo) / 4)))  # enough to tell the ticks apart
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eef0f3"/>'
                   f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.{places}f}</text>')
    for i, lab in enumerate(labels):
        out.append(f'<text x="{x[i]:.1f}" y="{top + ph + 16}" text-anchor="end" font-size="11" '
                   f'transform="rotate(-40 {x[i]:.1f} {top + ph + 16})">{escape(lab)}</text>')
    for si, s in enumerate(series):
        colour = COLOURS[si % len(COLOURS)]
        pts = [(x[i], y(v)) for i, v in enumerate(s["ys"]) if v is not None]
        out.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" '
                   f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"><title>{escape(s["name"])}</title></polyline>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in pts]
        out.append(f'<text x="{left + pw + 12}" y="{top + 12 + 15 * si}" font-size="11" fill="{colour}">'
                   f'━ {escape(s["name"])}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" font-size="11" transform="rotate(-90 14 {top + ph / 2})" '
               f'text-anchor="middle">{escape(ylabel)}</text></svg>')
    return "".join(out)
