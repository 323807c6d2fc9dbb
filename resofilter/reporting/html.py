"""Self-contained HTML reports: ``select/report.html`` (what a score means, on the samples) and
``table.html`` (the table and its plot). Plots are embedded as data URIs, so one file can be
mailed, attached to a W&B run or opened from a cluster's scratch space; no script runs.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resofilter._io import write_text_atomic

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.dropped td { background: #fdecea; } tr.kept td { background: #eaf6ea; }
pre { white-space: pre-wrap; margin: 0; font-size: .85em; max-width: 38em; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #555; font-size: .9em; }
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def num(x: Any, digits: int = 4) -> str:
    """A table cell's number: fixed digits, ``–`` for missing/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{float(x):.{digits}g}"


def distinct_digits(values: Sequence[float], least: int = 4, most: int = 15) -> int:
    """The fewest significant digits (at least ``least``) at which distinct values print distinctly.

    A ResoFilter score's relative spread is ~1e-4, so at 4 digits every row of a sample table
    reads ``9.999e-06``; the rows differ in the 5th–6th digit.
    """
    finite = {float(v) for v in values if v is not None and math.isfinite(float(v))}
    for digits in range(least, most + 1):
        if len({f"{v:.{digits}g}" for v in finite}) == len(finite):
            return digits
    return most


def image(path: Path, alt: str) -> str:
    """``<img>`` with the PNG inlined; a note when the plot is missing."""
    if not path.exists():
        return f'<p class="note">({esc(path.name)} was not drawn)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] | None = None,
          table_id: str | None = None) -> str:
    """An HTML table; numeric cells right-aligned. Cells that are already HTML are wrapped in ``Raw``."""
    out = [f'<table{f" id={chr(34)}{table_id}{chr(34)}" if table_id else ""}><thead><tr>'
           + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes else ""
        cells = []
        for c in row:
            if isinstance(c, Raw):
                cells.append(f"<td>{c}</td>")
            elif isinstance(c, Formatted):
                cells.append(f'<td class="num">{esc(c)}</td>')
            elif c is None or (isinstance(c, float) and math.isnan(c)):
                cells.append('<td class="num">–</td>')
            elif isinstance(c, (int, float)) and not isinstance(c, bool):
                cells.append(f'<td class="num">{num(c)}</td>')
            else:
                cells.append(f"<td>{esc(c)}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class Raw(str):
    """Already-escaped HTML for a table cell."""


class Formatted(str):
    """A number already written out (its digits chosen by the caller), right-aligned like numbers."""


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{body}</section>'


def page(path: Path, title: str, sections: Sequence[str], subtitle: str = "") -> None:
    doc = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
           f"<h1>{esc(title)}</h1>" + (f'<p class="note">{esc(subtitle)}</p>' if subtitle else "")
           + "".join(sections) + "</body></html>\n")
    write_text_atomic(path, doc)


def excerpt(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def selection_report(out_dir: Path, *, scorer: str, summary: dict[str, Any], diag: dict[str, Any] | None,
                     samples: list[dict[str, Any]], k: int, excerpt_chars: int, n_ranked: int | None = None,
                     score_median: float | None = None) -> Path:
    """``report.html`` of one selection.

    ``samples``: every ranked sample as ``{sample_id, query, response, score, badness, loss,
    n_tokens, label, kind, kept}`` — at least the k highest- and k lowest-badness ones of the
    ``n_ranked`` samples (the caller need not build the rest); the report shows the k with the
    highest badness (dropped first) and the k with the lowest (kept first). Scores are printed with
    as many significant digits as the shown rows need to differ (:func:`distinct_digits`), and
    beside them relative to ``score_median`` (the median over all ranked samples), when given.
    """
    path = out_dir / "report.html"
    sections = [section("summary", "Counts", table(["", ""], [[k_, v] for k_, v in summary.items()]))]
    sections.append(section("histogram", "Score distribution and the cut",
                            "<p class=\"note\">The score oriented so that higher is dropped first; the dashed "
                            "line is the keep/drop boundary.</p>" + image(out_dir / "score_hist.png", "histogram")))
    if diag and "scorers" in diag:
        sel = diag.get("selected_scorer", {})
        rows = [[name, v["auroc"], v.get("auprc")] for name, v in
                sorted(diag["scorers"].items(), key=lambda kv: -(kv[1]["auroc"] if kv[1]["auroc"] == kv[1]["auroc"]
                                                                  else 0))]
        kinds = sel.get("dropped_share_by_kind") or {}
        by_kind = table(["noise kind", "share dropped", "AUROC vs clean"],
                        [[kind, share, (sel.get("auroc_by_kind") or {}).get(kind)] for kind, share in kinds.items()])
        body = (f"<p>{esc(scorer)}: noise AUROC {num(sel.get('auroc'), 3)}, dropped-set precision "
                f"{num(sel.get('precision'), 3)}, recall {num(sel.get('recall'), 3)}; noise left in the kept set "
                f"{num(sel.get('noise_rate_kept'), 3)} (pool {num(diag.get('noise_rate'), 3)}).</p>"
                + (f"<h3>Per noise kind</h3>{by_kind}" if kinds else "")
                + image(out_dir / "roc.png", "ROC curves")
                + "<h3>Every scorer of the panel</h3>" + table(["scorer", "AUROC", "AUPRC"], rows, table_id="panel"))
        sections.append(section("noise", "Which samples are noise (labels)", body))
    if diag and diag.get("groups"):
        rows = [[field, value, g["n"], g["kept"]] for field, values in diag["groups"].items()
                for value, g in values.items()]
        sections.append(section("groups", "Kept fraction per metadata group",
                                table(["field", "value", "samples", "kept fraction"], rows)))
    if diag and diag.get("selected_confounds"):
        rows = [[cov, rho] for cov, rho in diag["selected_confounds"].items()]
        sections.append(section("confounds", "What the score ranks by",
                                "<p class=\"note\">Spearman ρ of the score's badness with response length and "
                                "the base model's loss: |ρ| near 1 means ranking by the score is nearly ranking by "
                                "that.</p>" + table(["covariate", "Spearman ρ"], rows)
                                + image(out_dir / "confounds.png", "confounds")))
    ranked = sorted(samples, key=lambda s: -s["badness"])
    shown = ranked[:k] + ranked[::-1][:k]
    digits = distinct_digits([s["score"] for s in shown])
    relative = score_median is not None and math.isfinite(score_median) and score_median != 0
    header = ["rank", "sample", "score", *(["score / median − 1"] if relative else []), "loss", "tokens", "label",
              "kept", "query", "response"]

    def score_cells(score: float) -> list[Any]:
        if score is None or not math.isfinite(score):
            return [None, *([None] if relative else [])]
        cells: list[Any] = [Formatted(f"{score:.{digits}g}")]
        if relative:
            cells.append(Formatted(f"{score / score_median - 1:+.3g}"))
        return cells

    def rows_of(chosen: list[dict[str, Any]], first_rank: int, step: int) -> tuple[list[list[Any]], list[str]]:
        rows, classes = [], []
        for i, s in enumerate(chosen):
            label = "–" if s.get("label") is None else (s.get("kind") or ("noisy" if s["label"] else "clean"))
            rows.append([first_rank + step * i, s["sample_id"], *score_cells(s["score"]), s["loss"], s["n_tokens"],
                         label, "kept" if s["kept"] else "dropped",
                         Raw(f"<pre>{esc(excerpt(s['query'], excerpt_chars))}</pre>"),
                         Raw(f"<pre>{esc(excerpt(s['response'], excerpt_chars))}</pre>")])
            classes.append("kept" if s["kept"] else "dropped")
        return rows, classes

    top, top_cls = rows_of(ranked[:k], 1, 1)
    bottom, bottom_cls = rows_of(ranked[::-1][:k], n_ranked or len(ranked), -1)
    sections.append(section("highest", f"The {len(top)} samples dropped first (highest badness)",
                            table(header, top, top_cls, table_id="highest-samples")))
    sections.append(section("lowest", f"The {len(bottom)} samples kept first (lowest badness)",
                            table(header, bottom, bottom_cls, table_id="lowest-samples")))
    page(path, f"Selection report: {scorer}", sections,
         f"rank 1 = dropped first; red rows were dropped, green rows kept; excerpts cut at {excerpt_chars} "
         "characters")
    return path


def table_report(out: Path, markdown_table: str, summary_rows: list[dict[str, Any]], columns: list[str],
                 root: str) -> Path:
    """``table.html``: the table (the columns of ``table.csv`` that a reader needs), ``table.png`` and, when the
    runs span several budgets, ``budget.png``."""
    path = out / "table.html"
    rows = [[r.get(c) for c in columns] for r in summary_rows]
    notes = "".join(f'<p class="note">{esc(line)}</p>' for line in markdown_table.splitlines()
                    if line and not line.startswith("|"))
    sections = [section("table", "Rows", table(columns, rows, table_id="results") + notes),
                section("plot", "Accuracy against keep ratio", image(out / "table.png", "table plot"))]
    if (out / "budget.png").exists():
        sections.append(section("budget", "Accuracy against the training budget",
                                image(out / "budget.png", "budget curve")))
    page(path, f"resofilter table: {root}", sections)
    return path
