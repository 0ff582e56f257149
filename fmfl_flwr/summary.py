"""Turning a run's per-round rows into its summary and a printable table."""

from __future__ import annotations

import math
from typing import Any

PHASES = {
    "pretrain-time": "pretraining_s",
    "client-train-time": "client_training_s",
    "aggregation-time": "aggregation_s",
    "fusion-time": "fusion_s",
    "defense-time": "defense_s",
    "eval-time": "evaluation_s",
}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final ACC/ASR and each phase's total time over the rounds (round 0 included)."""
    if not rows:
        return {}
    last = rows[-1]
    summary: dict[str, Any] = {"rounds": int(last["round"]), "acc": last["acc"],
                               "asr": last["asr"]}
    if "client-acc" in last:
        summary["client_acc"] = last["client-acc"]
    summary["phases_s"] = {name: round(sum(float(r.get(col, 0.0) or 0.0) for r in rows), 3)
                           for col, name in PHASES.items()}
    summary["rounds_s"] = round(sum(float(r.get("round-time", 0.0)) for r in rows[1:]), 3)
    summary["rejected_replies"] = int(sum(float(r.get("rejected-replies", 0)) for r in rows))
    return summary


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{100 * value:.2f}"
    return str(value)


def format_table(records: list[dict[str, Any]], columns: list[str],
                 header: dict[str, str] | None = None) -> str:
    """A Markdown table; floats in [0, 1] metrics are shown as percentages."""
    header = header or {}
    names = [header.get(c, c.upper()) for c in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in records]
    return "\n".join(lines)
