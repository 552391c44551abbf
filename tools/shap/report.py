"""Assemble the result dict, draw the plots and write the Markdown and self-contained HTML report.

Each report gets its own folder under ``<reports>/shap/<user>/``; the HTML embeds its images as
base64 so it can be mailed or uploaded as one file.
"""

from __future__ import annotations

import base64
import html
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tools.base import ToolContext, safe_segment
from tools.shap import plots
from tools.shap.narrative import fmt_metrics, narrative

TOP_LOCAL = 8


def _versions() -> dict[str, str]:
    import pandas
    import shap
    import sklearn
    import xgboost

    return {"python": platform.python_version(), "shap": shap.__version__, "xgboost": xgboost.__version__,
            "pandas": pandas.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def _value(v) -> Any:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "missing"
    return round(float(v), 4) if isinstance(v, (float, np.floating)) else str(v)


def _local(state: dict, fitted, X, ex, k: int | None) -> dict | None:
    pos = state["row_position"]
    if pos is None:
        return None
    values = ex.values[pos] if k is None else ex.values[pos, :, k]
    base = float(ex.base if k is None else np.asarray(ex.base)[k])
    order = np.argsort(-np.abs(values))
    items = [{"feature": fitted.features[j], "value": _value(X.iloc[pos][fitted.features[j]]),
              "shap": float(values[j])} for j in order[:TOP_LOCAL]]
    if len(order) > TOP_LOCAL:
        items.append({"feature": f"{len(order) - TOP_LOCAL} other features", "value": "",
                      "shap": float(values[order[TOP_LOCAL:]].sum())})
    output = base + float(values.sum())
    if state["task"] == "regression" or ex.output == "probability":
        prediction = f"{output:.4g}"
    elif k is None:
        prediction = f"P({state['classes'][-1]}) = {1 / (1 + np.exp(-output)):.1%}"
    else:
        prediction = f"{state['classes'][k]}"
    return {"row": str(state["row_label"]), "prediction": prediction, "base": base, "output": output,
            "class": state["classes"][k] if k is not None else None, "contributions": items}


def _focus_class(state: dict, ex) -> int | None:
    if ex.values.ndim != 3:
        return None
    if state["row_position"] is not None:
        raw = ex.values[state["row_position"]].sum(axis=0) + np.asarray(ex.base)
        return int(np.argmax(raw))
    return int(np.argmax(np.abs(ex.values).mean(axis=(0, 1))))


def build_result(state: dict, fitted, X, ex, ctx: ToolContext, *, draw: bool, timings: dict) -> dict:
    table, classes, task = state["table"], state["classes"], state["task"]
    k = _focus_class(state, ex)
    importance = state["importance"]
    for item in importance:
        if item["direction"] == "by class":
            item["top_class"] = max(state["per_class"], key=lambda c: next(
                r["mean_abs_shap"] for r in state["per_class"][c] if r["feature"] == item["feature"]))
    result: dict[str, Any] = {
        "task": task, "target": table.target, "rows": int(len(table.X)), "features": list(fitted.features),
        "classes": classes, "positive_class": classes[-1] if len(classes) == 2 else None,
        "metrics": state["metrics"], "baseline": state["baseline"], "scored_on": state["scored_on"],
        "importance": importance,
        "importance_by_class": state["per_class"] or None,
        "local": _local(state, fitted, X, ex, k),
        "warnings": state["warnings"], "notices": state["notices"], "leak_suspects": state["leaks"],
        "additivity_max_error": ex.additivity_max_error,
        "model": {"source": fitted.source, "kind": fitted.kind, "params": _jsonable(fitted.params)},
        "settings": {"data": table.name, "read": table.settings, "explained_rows": int(len(X)),
                     "explainer": ex.method, "shap_output": ex.output, "background_rows": ex.background_rows,
                     "focus_class": classes[k] if k is not None else None, "seed": 0, "threads": 1},
        "versions": _versions(), "plots": {}, "report": None, "report_md": None, "attachments": [],
    }
    result["summary"] = narrative(result, ctx.lang)
    t0 = time.perf_counter()
    if draw:
        _write(result, table, X, ex, k, ctx)
    timings["report"] = time.perf_counter()
    start = timings.pop("start")
    marks = ["read", "model", "explain"]
    result["timings"] = {m: round(timings[m] - (timings[marks[i - 1]] if i else start), 3)
                         for i, m in enumerate(marks)}
    result["timings"]["plots_and_report"] = round(timings["report"] - t0, 3)
    result["timings"]["total"] = round(timings["report"] - start, 3)
    return result


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}


def _write(result: dict, table, X, ex, k: int | None, ctx: ToolContext) -> None:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = f"{safe_segment(Path(table.name).stem)[:40]}-{stamp}"
    folder = ctx.reports_dir / "shap" / safe_segment(ctx.user_id) / name
    folder.mkdir(parents=True, exist_ok=True)
    values = ex.values if k is None else ex.values[:, :, k]
    order = [r["feature"] for r in (result["importance_by_class"] or {}).get(result["settings"]["focus_class"],
                                                                              result["importance"])]
    about = f" (class {result['settings']['focus_class']})" if k is not None else ""
    target = result["target"]
    paths = {"beeswarm": plots.beeswarm(values, X, order, result["features"], folder / "beeswarm.png",
                                        f"How each feature moves the prediction of {target}{about}"),
             "bar": plots.bar(result["importance"], folder / "bar.png", f"Feature importance for {target}")}
    if result["local"]:
        loc = result["local"]
        paths["waterfall"] = plots.waterfall(loc["contributions"], loc["base"], loc["output"],
                                             folder / "waterfall.png", f"Why row {loc['row']}: {loc['prediction']}")
    top = order[0]
    paths["dependence"] = plots.dependence(X[top], values[:, result["features"].index(top)], top,
                                           folder / "dependence.png", f"{top}: value vs. SHAP value{about}")
    result["plots"] = {name: str(p) for name, p in paths.items()}
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(to_markdown(result), encoding="utf-8")
    page.write_text(to_html(result, paths), encoding="utf-8")
    result["report"], result["report_md"] = str(page), str(md)
    captions = {"beeswarm": "SHAP beeswarm", "bar": "Mean |SHAP| per feature", "waterfall": "This row, explained",
                "dependence": f"Dependence of the top feature ({top})"}
    result["attachments"] = [{"kind": "image", "path": str(p), "caption": captions[n]} for n, p in paths.items()]
    result["attachments"] += [{"kind": "file", "path": str(page), "caption": "SHAP report (HTML)"},
                              {"kind": "file", "path": str(md), "caption": "SHAP report (Markdown)"}]


def _sections(result: dict) -> list[tuple[str, list[str]]]:
    """Shared text of both formats: (heading, lines)."""
    rows = [f"{i + 1}. {r['feature']} — {r['mean_abs_shap']:.4f} ({r['direction']})"
            for i, r in enumerate(result["importance"])]
    metrics = [f"model: {fmt_metrics(result['metrics'])}",
               f"baseline ({result['baseline'].get('kind')}): {fmt_metrics(result['baseline'])}",
               f"scored on: {result['scored_on']}"]
    s = result["settings"]
    settings = [f"data: {s['data']} {s['read']}", f"model: {result['model']}", f"explainer: {s['explainer']}, "
                f"values in {s['shap_output']}, {s['explained_rows']} rows explained"
                + (f", background {s['background_rows']} rows" if s["background_rows"] else ""),
                f"additivity check: max |sum(SHAP) + base − model output| = {result['additivity_max_error']:.2e}",
                "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items())]
    out = [("Summary", [result["summary"]]), ("Metrics", metrics), ("Feature ranking (mean |SHAP|)", rows)]
    if result["local"]:
        loc = result["local"]
        out.append((f"Row {loc['row']}: {loc['prediction']}", [f"{c['feature']} = {c['value']}: {c['shap']:+.4f}"
                                                               for c in loc["contributions"]]))
    out += [("Warnings", result["warnings"] or ["none"]), ("Notes", result["notices"] or ["none"]),
            ("Settings and versions", settings)]
    return out


def to_markdown(result: dict) -> str:
    lines = [f"# SHAP report: {result['target']} ({result['task']})", ""]
    for head, body in _sections(result):
        lines += [f"## {head}", "", *(b if head == "Summary" else f"- {b}" for b in body), ""]
    lines += [f"![{name}]({name}.png)" for name in result["plots"]]
    return "\n".join(lines) + "\n"


def to_html(result: dict, paths: dict) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>SHAP report: {e(result['target'])}</title><style>body{{font-family:sans-serif;max-width:960px;"
             "margin:2em auto;line-height:1.5}img{max-width:100%}li{margin:.2em 0}</style></head><body>",
             f"<h1>SHAP report: {e(result['target'])} ({e(result['task'])})</h1>"]
    for head, body in _sections(result):
        parts.append(f"<h2>{e(head)}</h2><ul>" + "".join(f"<li>{e(b)}</li>" for b in body) + "</ul>")
    for name, path in paths.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src='data:image/png;base64,{data}'>")
    return "".join(parts) + "</body></html>\n"
