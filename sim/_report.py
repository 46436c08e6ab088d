"""The simulation's self-contained HTML report: the comparison table, quality and ε per round,
and the audit logs' verification. One file, no scripts, no external assets (inline SVG)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;color:#1d1d1f}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.25rem .7rem;text-align:right}
th{background:#f2f2f5}td:first-child,th:first-child{text-align:left}
tr.dp td{background:#f5faff}.ok{color:#11734b}.bad{color:#b3261e}
.note{color:#555;max-width:48rem}svg{background:#fafafa;border:1px solid #ddd}
"""
_COLOURS = ("#0b63ce", "#c2410c", "#15803d", "#7e22ce", "#a16207", "#0f766e")
_LABELS = {
    "random": "random order",
    "popularity": "most listened in training",
    "itemknn": "ItemKNN (cosine), central, no privacy",
    "ease": "EASE (closed form), central, no privacy",
    "local_only": "the device alone: its own history against public content, nothing shared",
    "federated": "collaborative model, federated, no DP",
    "federated_model_only": "the same model alone, without the device's blend with content",
    "federated_dp": "collaborative model, federated DP (central mode), user-level ε",
    "federated_dp_model_only": "the same DP model alone, without the device's blend with content",
}
_BLENDED = " (blended on the device with public content: {})"
_RERANKER_LABELS = {
    "random": "random order",
    "popularity": "most listened in training",
    "central": "centralized, pooled data, no privacy",
    "central_dp": "centralized DP-SGD (opacus), example-level ε",
    "federated": "federated (FedAvg), no privacy",
    "federated_global_only": "federated, without on-device personal features",
    "federated_dp": "federated DP, central mode (aggregator noise), user-level ε",
    "federated_dp_global_only": "federated DP central, without personal features",
    "federated_dp_local": "federated DP, local mode (device noise)",
    "federated_dp_local_global_only": "federated DP local, without personal features",
}


def write_report(results: dict[str, Any], path: Path) -> Path:
    """Write the report for ``results`` (as :func:`~sottovoce.sim.simulate` returns them)."""
    e = html.escape
    parts = [
        "<!doctype html><html lang=en><meta charset=utf-8>",
        f"<title>sottovoce simulation — {e(results['dataset'])}</title><style>{_STYLE}</style>",
        f"<h1>sottovoce simulation: {e(results['dataset'])}</h1>",
        f"<p class=note>{results['users']} users as devices, {results['evaluated_users']} "
        f"evaluated by full ranking: each one's held-out items ({results['split']} split) among "
        f"every item they did not train on; {results['items']} items; user-level "
        f"ε ≤ {results['epsilon']:.3g} at δ = {results['delta']:.2g}. Policy "
        f"sha256:{e(results['config']['policy'][:16])}…; seed {results['config']['seed']}.</p>",
        "<h2>Comparison (full ranking; 95 % bootstrap intervals over users)</h2>",
        *([f"<p class=note>{e(note)}</p>"] if (note := results.get("item_vectors_note")) else []),
        _comparison(results["metrics"]),
        *_reranker(results),
        "<h2>Privacy spent per round (ε, collaborative model)</h2>",
        _epsilon_chart(results),
        "<h2>Privacy, per pipeline and region (recompute it from these parameters)</h2>",
        _privacy(results["privacy"]),
        f"<p class=note>Noise: {e(results['noise'])}</p>",
        "<h2>Audit</h2>",
        _audit(results["audit"]),
        "<h2>Timings</h2>",
        _table(["phase", "seconds"], [[k, f"{v:g}"] for k, v in results["timings_s"].items()]),
        "</html>",
    ]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()) -> str:
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for n, row in enumerate(rows):
        cls = f" class={classes[n]}" if n < len(classes) and classes[n] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return "".join(out) + "</table>"


def _comparison(metrics: dict[str, dict[str, Any]]) -> str:
    rows, classes = [], []
    for name, values in metrics.items():
        text = values.get("note") or _LABELS.get(name, "")  # a note corrects the usual label
        if values.get("content"):
            text += _BLENDED.format(values["content"])
        label = f"<b>{html.escape(name)}</b><br><small>{html.escape(text)}</small>"
        low, high = values["ci"].get("ndcg@10", (values["ndcg@10"],) * 2)
        others = (f"{values[m]:.4f}" for m in ("recall@10", "hr@10", "mrr", "coverage"))
        rows.append([label, f"{values['ndcg@10']:.4f} <small>[{low:.4f}, {high:.4f}]</small>",
                     *others])  # fmt: skip
        classes.append("dp" if "dp" in name else "")
    return _table(["row", "NDCG@10", "Recall@10", "HR@10", "MRR", "coverage"], rows, classes)


def _reranker(results: dict[str, Any]) -> list[str]:
    """The session reranker's table and per-round chart (sampled protocol), when it ran."""
    sampled = results.get("metrics_sampled")
    if not sampled:
        return []
    rows, classes = [], []
    for name, values in sampled.items():
        label = (f"<b>{html.escape(name)}</b><br>"
                 f"<small>{html.escape(_RERANKER_LABELS.get(name, ''))}</small>")  # fmt: skip
        rows.append([label, *(f"{values[m]:.4f}" for m in ("hr@10", "ndcg@10", "mrr"))])
        classes.append("dp" if "dp" in name else "")
    series = {name: [r["ndcg@10"] for r in rounds] for name, rounds in results["rounds"].items()
              if rounds and "ndcg@10" in rounds[0]}  # fmt: skip
    lines = {k: sampled[k]["ndcg@10"] for k in ("central", "popularity")}
    return [
        "<h2>The session reranker (sampled: held-out items among never-touched ones)</h2>",
        f"<p class=note>{html.escape(results['protocol_sampled'])}</p>",
        _table(["row", "HR@10", "NDCG@10", "MRR"], rows, classes),
        "<h3>Reranker quality per round (NDCG@10, sampled)</h3>",
        _series_chart(series, lines, label="NDCG@10 after each round"),
    ]


def _series_chart(series: dict[str, list[float]], lines: dict[str, float], *, label: str) -> str:
    """A small line chart: one polyline per series over rounds, dashed reference lines."""
    width, height, pad = 640, 240, 36
    values = [v for s in series.values() for v in s] + list(lines.values())
    if not values:
        return "<p class=note>no rounds</p>"
    top = max(values) * 1.1 or 1.0
    rounds = max((len(s) for s in series.values()), default=1)

    def x(i: int) -> float:
        return pad + (width - 2 * pad) * (i / max(rounds - 1, 1))

    def y(v: float) -> float:
        return height - pad - (height - 2 * pad) * (v / top)

    svg = [f'<svg width={width} height={height} role=img aria-label="{html.escape(label)}">']
    svg.append(f"<text x={pad} y=16 font-size=11>{html.escape(label)} (max {top / 1.1:.3g})</text>")
    for n, (name, value) in enumerate(lines.items()):
        colour = "#888" if n % 2 else "#444"
        svg.append(f'<line x1={pad} x2={width - pad} y1={y(value):.1f} y2={y(value):.1f} '
                   f'stroke="{colour}" stroke-dasharray="4 3"/>')  # fmt: skip
        svg.append(f'<text x={width - pad - 150} y={y(value) - 3:.1f} font-size=10 '
                   f'fill="{colour}">{html.escape(name)}</text>')  # fmt: skip
    for n, (name, points) in enumerate(series.items()):
        colour = _COLOURS[n % len(_COLOURS)]
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(points))
        svg.append(f'<polyline fill=none stroke="{colour}" stroke-width=2 points="{path}"/>')
        svg.append(f'<text x={pad + 8} y={pad + 14 * n:.0f} font-size=11 '
                   f'fill="{colour}">{html.escape(name)}</text>')  # fmt: skip
    for i in range(rounds):
        svg.append(f"<text x={x(i) - 3:.1f} y={height - pad + 14} font-size=10>{i + 1}</text>")
    return "".join(svg) + "</svg>"


def _epsilon_chart(results: dict[str, Any]) -> str:
    series: dict[str, list[float]] = {}
    for record in results["rounds"].get("collaborative", []):
        for region, outcome in record.items():
            if isinstance(outcome, dict) and "epsilon_after" in outcome:
                series.setdefault(region, []).append(outcome["epsilon_after"])
    budgets = {f"{r} budget": p["epsilon_budget"]
               for r, p in results["regions"]["collaborative"].items()}  # fmt: skip
    return _series_chart(series, budgets, label="ε spent after each round, per region")


def _privacy(entries: list[dict[str, Any]]) -> str:
    rows = [[html.escape(p["pipeline"]), html.escape(p["region"]), html.escape(p["mode"]),
             f"{p['noise_multiplier']:.4f}", f"{p['sampling_rate']:g}",
             f"{p['sensitivity_factor']:.5f} C", str(p["rounds"]),
             f"{p['epsilon']:.3f} / {p['budget']:g}", f"{p['delta']:.1g}"]
            for p in entries]  # fmt: skip
    head = ["pipeline", "region", "mode", "noise z", "sampling q", "sensitivity", "rounds",
            "ε (ledger) / budget", "δ"]  # fmt: skip
    return _table(head, rows)


def _audit(audit: dict[str, dict[str, Any]]) -> str:
    rows = []
    for pipeline, logs in audit.items():
        for who, report in logs.items():
            ok = report.get("ok")
            mark = "<span class=ok>verified</span>" if ok else "<span class=bad>FAILED</span>"
            size = report.get("entries", 0)
            detail = (f"{report['devices']} device logs" if "devices" in report
                      else f"{report.get('checkpoints', 0)} signed checkpoints")  # fmt: skip
            rows.append([html.escape(pipeline), html.escape(who), str(size), detail, mark])
    return _table(["pipeline", "log", "entries", "", "verification"], rows)
