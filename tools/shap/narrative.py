"""Words for the report, in English or Chinese: the plain-language narrative and the chat answer.

Example:
    >>> phrase({"feature": "tenure", "direction": "down"}, "classification", "churn", "Yes", "en")
    'rows with lower tenure are more likely to have churn = Yes'
"""

from __future__ import annotations

import unicodedata

_PHRASES = {
    "en": {
        ("classification", "up"): "rows with higher {f} are more likely to have {t} = {p}",
        ("classification", "down"): "rows with lower {f} are more likely to have {t} = {p}",
        ("regression", "up"): "higher {f} raises the predicted {t}",
        ("regression", "down"): "higher {f} lowers the predicted {t}",
        "mixed": "its effect goes both ways (it depends on the other features)",
        "by category": "{f} = {hi} pushes the prediction up the most and {f} = {lo} down the most",
        "by class": "it matters most for telling apart class {c}",
    },
    "zh": {
        ("classification", "up"): "{f} 越高，{t} = {p} 的可能性越大",
        ("classification", "down"): "{f} 越低，{t} = {p} 的可能性越大",
        ("regression", "up"): "{f} 越高，预测的 {t} 越高",
        ("regression", "down"): "{f} 越高，预测的 {t} 越低",
        "mixed": "影响方向不一（取决于其他特征）",
        "by category": "{f} = {hi} 时预测值被推高最多，{f} = {lo} 时被压低最多",
        "by class": "它主要用来区分类别 {c}",
    },
}
_DIRECTION = {"en": {"up": "higher → up", "down": "higher → down", "mixed": "mixed",
                     "by category": "by category", "by class": "by class"},
              "zh": {"up": "越高越大", "down": "越高越小", "mixed": "不一", "by category": "看类别",
                     "by class": "看类别"}}
_METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "roc_auc": "ROC-AUC", "r2": "R²", "mae": "MAE"}
_WORDS = {
    "en": {"trained": "I trained XGBoost to predict {t} ({task}) from {n} features on {rows:,} rows.",
           "loaded": "I explained your model {src} predicting {t} ({task}) from {n} features on {rows:,} rows.",
           "scores": "On the {on} it scores {m}; always guessing {kind} would score {b}.",
           "top": "The strongest driver is {f}: {ph}.", "ratio": "{f1} matters about {r:.1f} times as much as {f2}",
           "same": "{f1} and {f2} matter about equally", "then": "; {f2}: {ph}.", "next": "Next come {names}.",
           "weak": "{f} barely matters.", "warn": "Read the {n} warning(s) below before trusting this.",
           "classification": "classification", "regression": "regression", "and": " and ",
           "features": "Top features (mean |SHAP|, direction):", "metrics": "Metrics on the {on}:",
           "baseline": "baseline", "warnings": "Warnings:", "notices": "Notes:", "report": "Full report: {html}",
           "md": "(Markdown: {md})", "row": "Row {row}: the model says {pred}; the biggest pushes:",
           "mean": "the mean", "majority": "the majority class"},
    "zh": {"trained": "我用 XGBoost 在 {rows:,} 行、{n} 个特征上训练了一个模型来预测 {t}（{task}）。",
           "loaded": "我解释了你的模型 {src}：它用 {n} 个特征预测 {t}（{task}），共 {rows:,} 行。",
           "scores": "在{on}上得分 {m}；一直猜{kind}的得分是 {b}。",
           "top": "影响最大的是 {f}：{ph}。", "ratio": "{f1} 的重要性大约是 {f2} 的 {r:.1f} 倍",
           "same": "{f1} 和 {f2} 的重要性差不多", "then": "；{f2}：{ph}。", "next": "其次是 {names}。",
           "weak": "{f} 几乎没有影响。", "warn": "请先看下面的 {n} 条警告，再相信这个结果。",
           "classification": "分类", "regression": "回归", "and": "、",
           "features": "最重要的特征（平均 |SHAP|，方向）：", "metrics": "{on}上的指标：", "baseline": "基线",
           "warnings": "警告：", "notices": "说明：", "report": "完整报告：{html}", "md": "（Markdown：{md}）",
           "row": "第 {row} 行：模型的预测是 {pred}；推动最大的特征：", "mean": "平均值", "majority": "多数类"},
}


def phrase(item: dict, task: str, target: str, positive: str, lang: str) -> str:
    """One feature's effect in words."""
    table = _PHRASES["zh" if lang == "zh" else "en"]
    d = item["direction"]
    tpl = table.get((task, d)) or table.get(d) or table["mixed"]
    return tpl.format(f=item["feature"], t=target, p=positive, hi=item.get("highest"), lo=item.get("lowest"),
                      c=item.get("top_class"))


def fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{_METRIC_NAMES[k]} {v:.3f}" for k, v in metrics.items() if k in _METRIC_NAMES and v is not None)


def narrative(result: dict, lang: str) -> str:
    """A few sentences a non-specialist can act on."""
    lang = "zh" if lang == "zh" else "en"
    w = _WORDS[lang]
    imp, task, target = result["importance"], result["task"], result["target"]
    positive = result.get("positive_class") or ""
    head = w["trained" if result["model"]["source"] == "trained" else "loaded"].format(
        t=target, task=w[task], n=len(result["features"]), rows=result["rows"], src=result["model"]["source"])
    on = result["scored_on"] if lang == "en" else ("留出集" if result["model"]["source"] == "trained" else "全部数据")
    kind = w["mean"] if task == "regression" else w["majority"]
    out = [head, w["scores"].format(on=on.split(" (")[0], m=fmt_metrics(result["metrics"]),
                                    b=fmt_metrics(result["baseline"]), kind=kind)]
    if imp:
        out.append(w["top"].format(f=imp[0]["feature"], ph=phrase(imp[0], task, target, positive, lang)))
    if len(imp) >= 2 and imp[1]["mean_abs_shap"] > 0:
        r = imp[0]["mean_abs_shap"] / imp[1]["mean_abs_shap"]
        key = "ratio" if r >= 1.25 else "same"
        out.append(w[key].format(f1=imp[0]["feature"], f2=imp[1]["feature"], r=r)
                   + w["then"].format(f2=imp[1]["feature"], ph=phrase(imp[1], task, target, positive, lang)))
    if len(imp) >= 4:
        out.append(w["next"].format(names=w["and"].join(i["feature"] for i in imp[2:4])))
    if len(imp) >= 3:
        total = sum(i["mean_abs_shap"] for i in imp) or 1.0
        if imp[-1]["mean_abs_shap"] / total < 0.02:
            out.append(w["weak"].format(f=imp[-1]["feature"]))
    if result["warnings"]:
        out.append(w["warn"].format(n=len(result["warnings"])))
    return " ".join(out) if lang == "en" else "".join(out)


def _cells(text: str) -> int:
    return sum(1 + (unicodedata.east_asian_width(c) in "WF") for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _cells(text))


def render(result: dict, lang: str = "en") -> str:
    """The chat answer: narrative, a short feature table, metrics vs baseline, warnings, the report's path."""
    lang = "zh" if lang == "zh" else "en"
    w = _WORDS[lang]
    lines = [narrative(result, lang), "", w["features"]]
    top = result["importance"][:8]
    width = min(28, max((_cells(i["feature"]) for i in top), default=8)) + 2
    for n, item in enumerate(top, 1):
        lines.append(f"{n:>2}. {_pad(item['feature'][:28], width)}{item['mean_abs_shap']:>9.4f}  "
                     f"{_DIRECTION[lang].get(item['direction'], item['direction'])}")
    on = result["scored_on"] if lang == "en" else ("留出集" if result["model"]["source"] == "trained" else "全部数据")
    lines += ["", w["metrics"].format(on=on)]
    for key, value in result["metrics"].items():
        if key in _METRIC_NAMES and value is not None:
            base = result["baseline"].get(key)
            lines.append(f"- {_METRIC_NAMES[key]}: {value:.3f}" + (f" ({w['baseline']} {base:.3f})"
                                                                    if base is not None else ""))
    local = result.get("local")
    if local:
        lines += ["", w["row"].format(row=local["row"], pred=local["prediction"])]
        lines += [f"- {c['feature']} = {c['value']}: {c['shap']:+.3f}" for c in local["contributions"][:5]]
    if result["warnings"]:
        lines += ["", w["warnings"], *(f"⚠ {x}" for x in result["warnings"])]
    if result["notices"]:
        lines += ["", w["notices"], *(f"- {x}" for x in result["notices"][:6])]
    if result.get("report"):
        lines += ["", w["report"].format(html=result["report"]), w["md"].format(md=result["report_md"])]
    return "\n".join(lines)
