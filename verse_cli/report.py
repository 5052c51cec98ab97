"""One static HTML page per dataset: snapshots, evaluation and variant ratings.

The page needs nothing but a browser: CSS and JavaScript are inline, and images are
linked by paths relative to the page (or embedded as data URIs with ``embed=True``,
for a single file to mail around). Its summary table sorts by any column on click
(numbers numerically, missing values last); ``report.html#sort=mean_dice`` opens it
sorted, ``#sort=-mean_dice`` in descending order.

Files read per subject ``sub-X`` anywhere under the derivatives folder:

* ``sub-X_seg-vert_snp.png`` (``verse snapshot``),
* ``sub-X_variants.json`` (``verse rate-variants``),
* ``sub-X_eval.json`` (``verse evaluate -o``; only where ground truth exists),
* ``sub-X_seg-subreg_ctd.json`` / ``sub-X_seg-vert_msk.nii.gz`` (listed as present or not).

Examples
--------
>>> from verse_cli.report import collect, render_html
>>> subjects = collect("derivatives")                  # doctest: +SKIP
>>> html = render_html(subjects, base=Path("."))        # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.errors import DataError, UsageError
from .core.io import read_json, write_text_atomic
from .core.progress import info

_SUBJECT_RE = re.compile(r"^(sub-[A-Za-z0-9]+)_")
_SNAPSHOT_SUFFIX = "_seg-vert_snp.png"
_EVAL_SUFFIXES = ("_eval.json", "_evaluation.json")


@dataclass
class Subject:
    """What the derivatives folder holds about one subject."""

    name: str
    snapshot: Path | None = None
    variants: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    files: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------- collecting
def collect(deriv_dir: str | os.PathLike) -> list[Subject]:
    """Every subject with at least one ``sub-X_*`` file under ``deriv_dir``, sorted by name."""
    root = Path(deriv_dir)
    if not root.exists():
        raise DataError("no such folder", root)
    if not root.is_dir():
        raise DataError("is not a folder; expected a derivatives folder", root)
    subjects: dict[str, Subject] = {}
    for path in sorted(p for p in root.rglob("sub-*") if p.is_file() and not p.name.startswith(".")):
        match = _SUBJECT_RE.match(path.name)
        if not match or path.parent.name.endswith("_patches"):
            continue
        subj = subjects.setdefault(match.group(1), Subject(match.group(1)))
        suffix = path.name[len(subj.name):]
        subj.files[suffix] = path
        if suffix == _SNAPSHOT_SUFFIX:
            subj.snapshot = path
        elif suffix == "_variants.json":
            subj.variants = _json_object(path)
        elif suffix in _EVAL_SUFFIXES:
            subj.evaluation = _case_evaluation(read_json(path), path)
    if not subjects:
        raise DataError("no sub-* files found; expected a VerSe derivatives folder", root)
    return [subjects[k] for k in sorted(subjects)]


def _json_object(path: Path) -> dict[str, Any]:
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DataError("expected a JSON object", path)
    return obj


def _case_evaluation(obj: Any, path: Path) -> dict[str, Any]:
    """The per-case block of a ``verse evaluate`` report (case mode, or one case of dataset mode)."""
    if isinstance(obj, dict) and isinstance(obj.get("case"), dict):
        return obj["case"]
    if isinstance(obj, dict) and isinstance(obj.get("cases"), list) and len(obj["cases"]) == 1:
        return obj["cases"][0]
    if isinstance(obj, dict) and "mean_dice" in obj:
        return obj
    raise DataError("not a 'verse evaluate' case report", path)


# --------------------------------------------------------------------------- summary rows
#: (key, header, kind) of the summary table; kind "num" sorts numerically.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("subject", "subject", "text"),
    ("fov", "field of view", "text"),
    ("n_vert", "vertebrae", "num"),
    ("counts", "C/T/L", "text"),
    ("flags", "enumeration", "text"),
    ("cervical_ribs", "cervical ribs", "num"),
    ("stump_ribs", "stump ribs", "num"),
    ("castellvi", "Castellvi", "text"),
    ("mean_dice", "mean Dice", "num"),
    ("id_rate", "id rate", "num"),
    ("loc_mm", "loc. error mm", "num"),
    ("mean_hd_mm", "mean HD mm", "num"),
    ("missed", "missed / extra / mislabelled", "text"),
)


def summary_row(subj: Subject) -> dict[str, Any]:
    """The values of one summary-table row (``None`` where unknown)."""
    v = subj.variants or {}
    e = subj.evaluation or {}
    fov = v.get("field_of_view") or {}
    counts = v.get("counts") or {}
    enum = v.get("enumeration") or {}
    cerv = v.get("cervical_ribs") or {}
    cast = v.get("castellvi") or {}
    visible = fov.get("visible") or []
    problems = [f"{k}: {', '.join(e[k])}" for k in ("missed", "extra", "mislabelled") if e.get(k)]
    return {
        "subject": subj.name,
        "fov": f"{fov['first']}–{fov['last']}" if fov.get("first") and fov.get("last") else None,
        "n_vert": len(visible) if visible else None,
        "counts": "/".join(str(counts.get(k, "?")) for k in ("cervical", "thoracic", "lumbar")) if counts else None,
        "flags": (", ".join(enum.get("flags") or []) or ("normal" if enum.get("complete") else "incomplete"))
        if enum else None,
        "cervical_ribs": cerv.get("count"),
        "stump_ribs": len(v["stump_ribs"]) if isinstance(v.get("stump_ribs"), list) else None,
        "castellvi": (f"{cast.get('grade')} ({cast.get('vertebra')})" if cast.get("grade") else None),
        "mean_dice": e.get("mean_dice"),
        "id_rate": e.get("id_rate"),
        "loc_mm": e.get("loc_mm"),
        "mean_hd_mm": e.get("mean_hd_mm"),
        "missed": "; ".join(problems) if problems else ("none" if e else None),
    }


def dataset_summary(subjects: list[Subject]) -> dict[str, Any]:
    """Counts and pooled metrics over the evaluated subjects."""
    evaluated = [s.evaluation for s in subjects if s.evaluation]
    dices = [e["mean_dice"] for e in evaluated if isinstance(e.get("mean_dice"), (int, float))]
    hits = sum(int(e.get("hits") or 0) for e in evaluated)
    n_gt = sum(int(e.get("n_gt") or 0) for e in evaluated)
    return {
        "n_subjects": len(subjects),
        "n_evaluated": len(evaluated),
        "n_rated": sum(1 for s in subjects if s.variants),
        "mean_dice": sum(dices) / len(dices) if dices else None,
        "id_rate": hits / n_gt if n_gt else None,
        "hits": hits,
        "n_gt": n_gt,
    }


# --------------------------------------------------------------------------- HTML
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(value: Any, kind: str) -> str:
    sort = "" if value is None else (f"{float(value):.6g}" if kind == "num" else str(value))
    return f'<td data-v="{html.escape(sort)}">{html.escape(_fmt(value))}</td>'


def _image_src(path: Path, base: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _summary_table(subjects: list[Subject]) -> str:
    head = "".join(f'<th data-key="{k}" data-kind="{kind}" title="sort by {html.escape(h)}">{html.escape(h)}</th>'
                   for k, h, kind in COLUMNS)
    rows = []
    for subj in subjects:
        row = summary_row(subj)
        cells = []
        for key, _, kind in COLUMNS:
            if key == "subject":
                cells.append(f'<td data-v="{html.escape(subj.name)}"><a href="#{html.escape(subj.name)}">'
                             f"{html.escape(subj.name)}</a></td>")
            else:
                cells.append(_cell(row[key], kind))
        rows.append(f'<tr data-subject="{html.escape(subj.name)}">{"".join(cells)}</tr>')
    return (f'<table id="summary" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _evaluation_block(e: dict[str, Any]) -> str:
    rows = []
    for r in e.get("vertebrae") or []:
        cls = "" if r.get("hit") in (True, None) else ' class="bad"'
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_fmt(r.get(k), 2 if k != 'dice' else 3))}</td>"
                                           for k in ("name", "dice", "hd_mm", "assd_mm", "loc_mm", "hit",
                                                     "vol_diff_pct")) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("vertebra", "Dice", "HD mm", "ASSD mm", "loc. mm", "identified",
                                              "vol. diff %"))
    facts = (f"mean Dice {_fmt(e.get('mean_dice'))}, binary Dice {_fmt(e.get('binary_dice'))}, "
             f"id rate {_fmt(e.get('id_rate'))} ({_fmt(e.get('hits'))}/{_fmt(e.get('n_gt'))}), "
             f"mean localisation error {_fmt(e.get('loc_mm'), 2)} mm")
    return (f"<h3>Evaluation against ground truth</h3><p>{html.escape(facts)}</p>"
            f'<table class="detail"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _variants_block(v: dict[str, Any]) -> str:
    items = []
    counts = v.get("counts") or {}
    if counts:
        items.append("vertebrae in the anatomy: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    enum = v.get("enumeration") or {}
    if enum:
        determinable = ", ".join(f"{k} {_fmt(enum.get(k))}" for k in ("cervical", "thoracic", "lumbar"))
        flags = ", ".join(enum.get("flags") or []) or "none"
        items.append(f"enumeration: {determinable}; complete: {_fmt(enum.get('complete'))}; anomalies: {flags}")
    fov = v.get("field_of_view") or {}
    if fov:
        cut = ", ".join(fov.get("cut") or []) or "none"
        items.append(f"field of view: {_fmt(fov.get('first'))} to {_fmt(fov.get('last'))}; cut: {cut}")
    cerv = v.get("cervical_ribs") or {}
    if cerv:
        items.append(f"cervical ribs: left {_fmt(cerv.get('left'))}, right {_fmt(cerv.get('right'))}")
    stumps = v.get("stump_ribs")
    if isinstance(stumps, list):
        items.append("stump ribs: " + (", ".join(f"{s.get('vertebra')} {s.get('side')} {_fmt(s.get('length_mm'), 1)} mm"
                                                  for s in stumps) or "none"))
    cast = v.get("castellvi") or {}
    if cast:
        items.append(f"Castellvi ({_fmt(cast.get('vertebra'))}): grade {_fmt(cast.get('grade'))} "
                     f"(left {_fmt(cast.get('left'))}, right {_fmt(cast.get('right'))})")
    for key in ("warnings", "notes"):
        for text in v.get(key) or []:
            items.append(f"{key[:-1]}: {text}")
    ribs = v.get("ribs") or {}
    rib_rows = "".join(
        f"<tr><td>{html.escape(str(name))}</td><td>{html.escape(_fmt(r.get('left_mm'), 1))}</td>"
        f"<td>{html.escape(_fmt(r.get('left_status')))}</td><td>{html.escape(_fmt(r.get('right_mm'), 1))}</td>"
        f"<td>{html.escape(_fmt(r.get('right_status')))}</td></tr>"
        for name, r in ribs.items() if isinstance(r, dict))
    out = "<h3>Variant ratings</h3><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"
    if rib_rows:
        out += ('<table class="detail"><thead><tr><th>rib</th><th>left mm</th><th>left</th><th>right mm</th>'
                f"<th>right</th></tr></thead><tbody>{rib_rows}</tbody></table>")
    return out


def _subject_section(subj: Subject, base: Path, embed: bool) -> str:
    parts = [f'<section id="{html.escape(subj.name)}"><h2>{html.escape(subj.name)}</h2>']
    if subj.snapshot is not None:
        src = _image_src(subj.snapshot, base, embed)
        parts.append(f'<a href="{html.escape(src)}"><img class="snap" src="{html.escape(src)}" '
                     f'alt="QC snapshot of {html.escape(subj.name)}"></a>')
    else:
        parts.append('<p class="missing">no snapshot (run <code>verse snapshot</code>)</p>')
    if subj.evaluation:
        parts.append(_evaluation_block(subj.evaluation))
    if subj.variants:
        parts.append(_variants_block(subj.variants))
    else:
        parts.append('<p class="missing">no variant ratings (run <code>verse rate-variants</code>)</p>')
    files = ", ".join(html.escape(k.lstrip("_")) for k in sorted(subj.files))
    parts.append(f'<p class="files">files: {files}</p><p><a href="#top">back to the table</a></p></section>')
    return "".join(parts)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 2em 3em;color:#222}
h1{margin:.6em 0 .2em} h2{border-top:2px solid #ccc;padding-top:.6em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,th:first-child{text-align:left;white-space:nowrap}
table.sortable th{cursor:pointer;background:#f2f2f2;user-select:none}
table.sortable th.asc::after{content:" \\25B2"} table.sortable th.desc::after{content:" \\25BC"}
tr.bad td{background:#fde8e8} img.snap{max-width:100%;background:#000}
.missing{color:#a33} .files{color:#666;font-size:12px} .facts span{margin-right:1.5em}
"""

_JS = r"""
(function(){
  var table=document.getElementById('summary');
  function key(td,kind){var v=td.getAttribute('data-v');if(v===''||v===null)return null;
    return kind==='num'?parseFloat(v):v.toLowerCase();}
  function sortBy(col,desc){
    var th=table.tHead.rows[0].cells[col],kind=th.getAttribute('data-kind');
    var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=key(a.cells[col],kind),y=key(b.cells[col],kind);
      if(x===null&&y===null)return 0; if(x===null)return 1; if(y===null)return -1;
      var c=x<y?-1:(x>y?1:0); return desc?-c:c;});
    rows.forEach(function(r){body.appendChild(r);});
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.classList.remove('asc','desc');});
    th.classList.add(desc?'desc':'asc');
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    th.addEventListener('click',function(){sortBy(i,th.classList.contains('asc'));});});
  var m=/sort=(-?)([a-z_]+)/.exec(location.hash);
  if(m){Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    if(th.getAttribute('data-key')===m[2])sortBy(i,m[1]==='-');});}
  window.addEventListener('load',function(){
    var broken=Array.prototype.filter.call(document.images,function(i){return i.complete&&i.naturalWidth===0;});
    document.body.setAttribute('data-broken-images',String(broken.length));});
  document.body.setAttribute('data-ready','1');
})();
"""


def render_html(subjects: list[Subject], base: Path, title: str = "verse-cli dataset report",
                embed: bool = False) -> str:
    """The whole page; image paths are made relative to ``base`` (the page's folder)."""
    s = dataset_summary(subjects)
    facts = [f"{s['n_subjects']} subjects", f"{s['n_rated']} with variant ratings",
             f"{s['n_evaluated']} evaluated against ground truth"]
    if s["mean_dice"] is not None:
        facts.append(f"mean Dice {_fmt(s['mean_dice'])}")
    if s["id_rate"] is not None:
        facts.append(f"identification rate {_fmt(s['id_rate'])} ({s['hits']}/{s['n_gt']})")
    sections = "".join(_subject_section(subj, base, embed) for subj in subjects)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><a id=\"top\"></a><h1>{html.escape(title)}</h1>"
        f"<p class=\"facts\">{''.join(f'<span>{html.escape(f)}</span>' for f in facts)}</p>"
        "<p>Click a column header to sort; click a subject to see its pictures and details.</p>"
        f"{_summary_table(subjects)}{sections}<script>{_JS}</script></body></html>\n"
    )


def write_report(deriv_dir: str | os.PathLike, output: str | os.PathLike, embed: bool = False,
                 title: str | None = None) -> Path:
    """Collect ``deriv_dir`` and write the page atomically to ``output``; returns ``output``."""
    output = Path(output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"output must end in .html: {output}")
    subjects = collect(deriv_dir)
    page = render_html(subjects, base=output.parent if str(output.parent) else Path("."),
                       title=title or f"verse-cli report: {Path(deriv_dir).resolve().parent.name or 'dataset'}",
                       embed=embed)
    write_text_atomic(output, page)
    info(f"report of {len(subjects)} subjects: {output}")
    return output
