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


PERCENT_COLUMNS = ("acc", "asr", "client_acc")


def _cell(value: Any, percent: bool) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{100 * value:.2f}" if percent else f"{value:.1f}"
    return str(value)


def format_table(records: list[dict[str, Any]], columns: list[str],
                 header: dict[str, str] | None = None) -> str:
    """A Markdown table; ACC/ASR-like columns (shares in [0, 1]) shown as percentages."""
    header = header or {}
    names = [header.get(c, c.upper()) for c in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c, ""), c in PERCENT_COLUMNS) for c in columns)
              + " |" for r in records]
    return "\n".join(lines)
