"""One self-contained HTML report per run: what was done, what it cost, what was gained or lost.

`build_report(facts)` takes the plain dict the pipeline collected (report.json holds the same)
and returns the HTML text; plots are matplotlib PNGs embedded as base64, so the file opens
anywhere without its folder.
"""

from __future__ import annotations

import base64
import html
import io

from asft_ray.report.cost import cost_lines


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_sparsity_plot(layers: list[float]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(range(len(layers)), [100 * s for s in layers], color="#4c72b0")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-layer sparsity of the final model")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def stage_curve_plot(decisions: list[dict]) -> str | None:
    """Validation ppl against achieved sparsity for every evaluated stage, coloured by verdict."""
    points = [d for d in decisions if d.get("value") is not None and d.get("achieved") is not None
              and d.get("event") in ("dense", "stage", "retry")]
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    kept = sorted((100 * d["achieved"], d["value"]) for d in points if d["verdict"] in ("baseline", "pass", "approved", "pending"))
    if kept:
        ax.plot(*zip(*kept), color="#4c72b0", marker="o", label="kept")
    failed = [(100 * d["achieved"], d["value"]) for d in points if d["verdict"] in ("fail", "rejected")]
    if failed:
        ax.scatter(*zip(*failed), color="#c44e52", marker="x", s=60, zorder=3, label="rolled back")
    thresholds = [d["threshold"] for d in points if d.get("threshold")]
    if thresholds:
        ax.axhline(min(thresholds), color="#999999", linestyle="--", linewidth=1, label="gate")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("validation ppl")
    ax.set_yscale("log")
    ax.set_title("Quality after each pruning stage")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _png(fig)


def recovery_plot(evals: list[dict]) -> str | None:
    if not evals or len(evals) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([e["step"] for e in evals], [e["ppl"] for e in evals], marker="o", color="#55a868")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation ppl")
    ax.set_title("Recovery fine-tuning")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def zeroshot_plot(zeroshot: dict) -> str | None:
    """Accuracy per task, one bar per model."""
    models = [m for m, r in zeroshot.items() if r]
    if not models:
        return None
    tasks = sorted(set.intersection(*(set(zeroshot[m]["tasks"]) for m in models)))
    if not tasks:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(models)
    for k, m in enumerate(models):
        ax.bar([i + k * width for i in range(len(tasks))], [zeroshot[m]["tasks"][t]["acc"] for t in tasks], width, label=m)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Zero-shot accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _png(fig)


def tradeoff_plot(candidates: list[dict], ppl_bound: float, recommended: str | None) -> str | None:
    """Cost per generated token against test ppl (and mean zero-shot accuracy, when measured) for
    every candidate, the quality tolerance drawn in, the recommended model ringed."""
    points = [c for c in candidates if c.get("relative_cost") is not None and c.get("ppl") is not None]
    if len(points) < 2:
        return None
    priced = all(c.get("cost_per_million") is not None for c in points)
    xs = [c["cost_per_million"] if priced else 100 * c["relative_cost"] for c in points]
    with_acc = all(c.get("mean_acc") is not None for c in points)
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(10 if with_acc else 6, 3.4), squeeze=False)
    panels = [("ppl", "WikiText-2 test ppl")] + ([("mean_acc", "mean zero-shot accuracy")] if with_acc else [])
    for ax, (key, label) in zip(axes[0], panels):
        for c, x in zip(points, xs):
            ok = c.get("meets_tolerance") or c["name"] == "dense"
            ax.scatter(x, c[key], color="#4c72b0" if ok else "#c44e52", zorder=3)
            ax.annotate(c["name"], (x, c[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
            if c["name"] == recommended:
                ax.scatter(x, c[key], s=220, facecolors="none", edgecolors="#55a868", linewidths=2, zorder=4,
                           label="recommended")
        if key == "ppl":
            values = [c["ppl"] for c in points] + [ppl_bound]
            if max(values) > 10 * min(values):  # a log axis only when the candidates span a decade
                from matplotlib.ticker import ScalarFormatter

                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.axhline(ppl_bound, color="#dd8452", linestyle="--", label=f"tolerance ({ppl_bound:.1f})")
        ax.set_xlabel("cost per million generated tokens" if priced else "cost per generated token (% of dense)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Cost against quality: every candidate, measured in this run")
    fig.tight_layout()
    return _png(fig)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _decode_speed(tokens_per_s: float | None, predicted: bool | None) -> str | float | None:
    """A decode speed cell: the number, with "predicted" after it when the decode-cost model gave it."""
    return f"{_fmt(tokens_per_s)} (predicted)" if predicted and tokens_per_s is not None else tokens_per_s


def _img(data: str | None, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>' if data else ""


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.summary{background:#f4f7fb;border-left:4px solid #4c72b0;padding:.8em 1em;margin:1em 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f0f0f0} td:first-child,th:first-child,td:last-child{text-align:left}
figure{margin:.8em 0} img{max-width:100%} .muted{color:#666;font-size:.9em}
"""


def _recommendation_parts(facts: dict) -> list[str]:
    rec = facts.get("recommendation")
    if not rec:
        return []
    rows = [[c["name"], c.get("ppl"), c.get("mean_acc"), _decode_speed(c.get("decode_tok_s"), c.get("speed_predicted")),
             None if c.get("relative_cost") is None else f"{100 * c['relative_cost']:.1f} %", c.get("cost_per_million"),
             "yes" if c.get("meets_tolerance") else "no", "yes" if c.get("measurably_cheaper") else "no"]
            for c in rec["candidates"]]
    chosen = (rec.get("recommended") or {}).get("name")
    return ["<h2>Recommendation</h2>", f"<div class=summary>{html.escape(rec['verdict'])}</div>",
            _table(["candidate", "test ppl", "mean zero-shot acc", "decode (tokens/s)", "cost per token vs dense",
                    "cost per million tokens", "meets tolerance", "measurably cheaper"], rows),
            _img(tradeoff_plot(rec["candidates"], rec["ppl_bound"], chosen), "cost against quality")]


def build_report(facts: dict) -> str:
    models = facts["models"]  # {"dense": {...}, "pruned": {...}, "recovered": {...}} each with ppl, speed, zeroshot
    final = facts["final_model"]
    cost = cost_lines(facts.get("price_per_hour"), models["dense"].get("speed"), models[final].get("speed"))
    ppl_rows = [[name, m.get("sparsity"), m.get("ppl"), m.get("ppl_windows")] for name, m in models.items()]
    speed_rows = []
    for name, m in models.items():
        s = m.get("speed") or {}
        speed_rows.append([name, s.get("prefill_ms"), _decode_speed(s.get("decode_tok_s"), s.get("predicted")),
                           s.get("weights_mb"), s.get("peak_mem_mb"),
                           m.get("disk_mb")])
    zs = {name: m.get("zeroshot") for name, m in models.items() if m.get("zeroshot")}
    zs_rows = []
    if zs:
        tasks = sorted(set.union(*(set(r["tasks"]) for r in zs.values())))
        for t in tasks:
            zs_rows.append([t] + [zs[m]["tasks"].get(t, {}).get("acc") for m in zs])
        zs_rows.append(["mean acc"] + [zs[m]["mean_acc"] for m in zs])
    decisions = facts.get("decisions", [])
    decision_rows = [[d.get("stage"), d.get("event"), d.get("target"), d.get("achieved"), d.get("value"), d.get("threshold"),
                      d.get("verdict"), d.get("reason")] for d in decisions]
    dense, last = models["dense"], models[final]
    what = facts.get("what") or f"pruned with {facts['method']} to {100 * (last.get('sparsity') or 0):.1f} % sparsity"
    headline = (f"{facts['model']} {what} ({final}): WikiText-2 test perplexity {_fmt(dense.get('ppl'))} → "
                f"{_fmt(last.get('ppl'))}. {cost['headline']}")
    if facts.get("recommendation"):
        headline += " " + facts["recommendation"]["verdict"]
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>asft-ray report: {html.escape(facts['run'])}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>asft-ray run report</h1><p class=muted>{html.escape(facts['run'])} · {html.escape(facts.get('created', ''))} · "
        f"{html.escape(facts.get('machine', ''))}</p>",
        f"<div class=summary>{html.escape(headline)}</div>",
        "<h2>What was done</h2><ol>" + "".join(f"<li>{html.escape(step)}</li>" for step in facts.get("steps", [])) + "</ol>",
        "<h2>Quality</h2>",
        f"<p class=muted>Perplexity on WikiText-2 {html.escape(facts.get('ppl_split', 'test'))}, windows of "
        f"{facts.get('ppl_seqlen')} tokens.</p>",
        _table(["model", "sparsity", "ppl", "windows"], ppl_rows),
        _img(stage_curve_plot(decisions), "validation ppl per stage"),
        _img(recovery_plot(facts.get("recovery_evals") or []), "recovery curve"),
    ]
    if zs_rows:
        parts += ["<h3>Zero-shot</h3>", f"<p class=muted>{html.escape(facts.get('zeroshot_note', ''))}</p>",
                  _table(["task", *zs], zs_rows), _img(zeroshot_plot(zs), "zero-shot accuracy")]
    parts += [
        "<h2>Per-layer sparsity</h2>", _img(layer_sparsity_plot(last.get("sparsity_layers") or []), "per-layer sparsity"),
        "<h2>Speed, memory and cost</h2>",
        f"<p class=muted>{html.escape(facts.get('speed_note', ''))}</p>",
        _table(["model", "prefill (ms)", "decode (tokens/s)", "weights in memory (MB)", "peak process memory (MB)",
                "safetensors on disk (MB)"], speed_rows),
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in cost["lines"]) + "</ul>",
        *_recommendation_parts(facts),
        "<h2>Decision log</h2>",
        _table(["stage", "event", "target", "achieved", "val ppl", "threshold", "verdict", "reason"], decision_rows),
        f"<p class=muted>asft-ray {html.escape(facts.get('version', ''))}. Raw numbers: report.json.</p></body></html>",
    ]
    return "\n".join(p for p in parts if p)
