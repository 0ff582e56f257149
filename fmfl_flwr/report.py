"""`fmfl report <dir>`: every finished run under a folder as one table and a few plots.

A run is a folder with `summary.json` (see CONTRACT.md); its `config.json` says what it
was, and `cell.json` (written by `fmfl grid`) adds the number of simulated clients. Runs
that differ only in `seed` are one setting: the table gives their mean ± std, in the
paper's shape (a row per defense, a column per setting: system, threat, partition,
clients). Links to run folders are followed. Writes under `<dir>/report/` (or
`--out`):

- `runs.csv`: one row per run (tidy: settings, seed, final ACC/ASR, times);
- `table.csv` / `table.md`: mean and std over seeds per defense x setting;
- `curves-<setting>.png`: ACC and ASR per round, one line per defense;
- `final-asr.png`: final ASR per defense, one bar per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from fmfl_flwr.config import ExperimentConfig, complete_run_config
from fmfl_flwr.grid import CELL_FILE, NUM_SUPERNODES

SETTING = ["system", "threat", "partition", "clients", "variant"]
# keys that never make two runs different settings
IGNORED = {"seed", "output-dir", "run-name", "data-dir"}
# keys the setting and defense columns already show
SHOWN = {"fusion", "fm-attack", "client-attack", "partition", "dirichlet-alpha", "aggregation",
         "defense"}
# a key a later version added counts as the older runs ran without it (`complete_run_config`)
DEFAULTS = ExperimentConfig().to_run_config()


def load_runs(folder: Path) -> pd.DataFrame:
    """One row per finished run under `folder` (any depth), in grid order where known.

    Several grids' folders under `folder` come one grid after the other.
    """
    records = []
    for run_dir in _run_dirs(Path(folder)):
        config = json.loads((run_dir / "config.json").read_text())["run_config"]
        summary = json.loads((run_dir / "summary.json").read_text())
        cell = _read_json(run_dir / CELL_FILE)
        records.append({
            "run": run_dir.name, "path": str(run_dir), **describe(config),
            "order": cell.get("index", len(records)),
            "clients": cell.get(NUM_SUPERNODES, pd.NA), "seed": int(config.get("seed", 0)),
            "acc": float(summary["acc"]), "asr": float(summary["asr"]),
            "rounds": int(summary.get("rounds", 0)),
            "wall_time_s": float(summary.get("wall_time_s", float("nan"))),
            "note": "; ".join(filter(None, [check_phases(config, summary.get("phases_s", {})),
                                            check_replies(summary)])),
            "config": json.dumps({k: _canonical(v) for k, v in
                                  sorted(complete_run_config(config, DEFAULTS).items())
                                  if k not in IGNORED}, default=str),
        })
    runs = pd.DataFrame.from_records(records)
    if runs.empty:
        return runs
    runs["folder"] = runs["path"].map(lambda path: str(Path(path).parent))
    runs = runs.sort_values(["folder", "order", "run"]).drop(columns=["folder", "order"])
    runs["variant"] = _variants(runs)
    runs["clients"] = runs["clients"].astype("Int64")
    return runs.drop(columns="config")


def _canonical(value: Any) -> Any:
    """A whole float as an int: `--set key=1` and a default of 1.0 are one setting."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _run_dirs(folder: Path) -> list[Path]:
    """Folders under `folder` with a summary and a config, through symbolic links (a report
    folder of links to runs kept elsewhere), each real folder once (under the first name in
    sorted order), hidden ones skipped (e.g. the app copies in a grid's .flwr folder)."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a second link to a folder, or a link back up the tree
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        if "summary.json" in files and "config.json" in files:
            found.append(Path(root))
    return sorted(found)


def describe(config: dict[str, Any]) -> dict[str, str]:
    """Short names for a run's system, threat, partition and defense, as papers print them."""
    fusion = str(config.get("fusion", False)).lower() == "true"
    threats = [config.get(k, "none") for k in ("fm-attack", "client-attack")]
    partition = config.get("partition", "iid")
    if partition == "dirichlet":
        partition = f"dirichlet({config.get('dirichlet-alpha', '')})"
    defense = config.get("aggregation", "fedavg")
    if config.get("defense", "none") != "none":
        defense += f"+{config['defense']}"
    return {"system": "FM-FL" if fusion else "FL",
            "threat": "+".join(t for t in threats if t != "none") or "clean",
            "partition": partition, "defense": defense}


def check_phases(config: dict[str, Any], phases: dict[str, float]) -> str:
    """Flag a run whose config asks for fusion or a defense that took no time at all.

    An app that accepts a key but does not act on it yet would otherwise fill the table
    with undefended numbers under a defense's name.
    """
    notes = []
    if str(config.get("fusion", False)).lower() == "true" and phases.get("fusion_s") == 0:
        notes.append("fusion did not run")
    if config.get("defense", "none") != "none" and phases.get("defense_s") == 0:
        notes.append(f"defense {config['defense']} did not run")
    return "; ".join(notes)


def check_replies(summary: dict[str, Any]) -> str:
    """Flag a run whose server set client replies aside: its numbers rest on fewer clients.

    Malicious or broken updates are rejected by design, but so are the replies of clients
    the machine killed (stop 27: out of memory, 9 of 10 replies lost, ACC and ASR moved).
    """
    rejected = int(summary.get("rejected_replies", 0))
    return f"{rejected} client replies rejected (see the run's log)" if rejected else ""


def _variants(runs: pd.DataFrame) -> pd.Series:
    """Keys that tell apart runs the other columns would lump together (e.g. `lr=0.01`).

    Every run shows its values of all such keys, not only the runs they tell apart: a
    defense run alone in its row then shares the column of the undefended runs of its
    setting (a CIFAR-10 run beside two undefended ones, CIFAR-10 and Fashion-MNIST, sat
    in a column of its own). A key missing from a run's config (an older version's run)
    counts as that version ran without it (`complete_run_config`).
    """
    configs = runs["config"].map(json.loads)
    keys: set[str] = set()
    for _, group in runs.groupby(["system", "threat", "partition", "clients", "defense"],
                                 dropna=False):
        members = configs[group.index]
        keys |= {k for c in members for k in c
                 if len({json.dumps(m.get(k)) for m in members}) > 1}
    shown = sorted(keys - SHOWN)
    return configs.map(lambda c: " ".join(f"{k}={c.get(k)}" for k in shown))


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (over seeds) of final ACC and ASR per setting and defense."""
    keys = [*SETTING, "defense"]
    grouped = runs.groupby(keys, dropna=False, sort=False)
    table = grouped.agg(acc_mean=("acc", "mean"), acc_std=("acc", "std"),
                        asr_mean=("asr", "mean"), asr_std=("asr", "std"),
                        seeds=("seed", "nunique"), rounds=("rounds", "max"),
                        wall_time_s=("wall_time_s", "mean"),
                        note=("note", lambda notes: "; ".join(sorted(set(notes) - {""})))
                        ).reset_index()
    return table


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.2f}" + ("" if pd.isna(std) else f" ± {100 * std:.2f}")


def markdown_table(table: pd.DataFrame) -> str:
    """The paper's shape: a row per defense, a column per setting, `ACC / ASR` in %."""
    shown = [c for c in SETTING if table[c].astype(str).nunique() > 1] or ["threat"]
    settings = table[shown].map(lambda v: "" if pd.isna(v) else str(v)).agg(" / ".join, axis=1)
    cells = table.assign(setting=settings, value=[
        f"{_pm(r.acc_mean, r.acc_std)} / {_pm(r.asr_mean, r.asr_std)}"
        for r in table.itertuples()])
    wide = cells.pivot(index="defense", columns="setting", values="value")
    wide = wide.reindex(index=list(dict.fromkeys(cells["defense"])),
                        columns=list(dict.fromkeys(cells["setting"]))).fillna("")
    header = ["defense \\ " + " / ".join(shown), *wide.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([name, *row]) + " |" for name, row in wide.iterrows()]
    seeds = sorted(set(table["seeds"]))
    text = ("ACC % / ASR % (final round; mean ± std over seeds: "
            + ", ".join(map(str, seeds)) + ")\n\n" + "\n".join(lines))
    flagged = table[table["note"] != ""]
    warnings = [f"WARNING: {row['defense']}, {_setting_text_row(row)}: {row['note']}"
                for _, row in flagged.iterrows()]
    return "\n\n".join([text, *warnings])


def round_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-round ACC and ASR of every run, with its setting and defense, tidy."""
    frames = []
    for run in runs.itertuples():
        metrics = pd.read_csv(Path(run.path) / "metrics.csv", usecols=["round", "acc", "asr"])
        frames.append(metrics.assign(**{c: getattr(run, c) for c in [*SETTING, "defense",
                                                                      "seed"]}))
    return pd.concat(frames, ignore_index=True)


def plot(runs: pd.DataFrame, table: pd.DataFrame, out: Path) -> list[Path]:
    """ACC/ASR per round for each setting, and the final-ASR bar chart; the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    curves = round_curves(runs)
    for setting, group in curves.groupby(SETTING, dropna=False, sort=False):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
        mean = group.groupby(["defense", "round"], sort=False)[["acc", "asr"]].mean()
        for defense in dict.fromkeys(group["defense"]):  # mean over seeds
            for ax, metric in zip(axes, ("acc", "asr"), strict=True):
                ax.plot(mean.loc[defense].index, 100 * mean.loc[defense][metric], marker="o",
                        markersize=3, label=defense)
        for ax, metric in zip(axes, ("ACC", "ASR"), strict=True):
            ax.set(xlabel="round", ylabel=f"{metric} %", ylim=(0, 100), title=metric)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        title = _setting_text(setting)
        fig.suptitle(title)
        fig.tight_layout()
        written.append(out / f"curves-{_slug(title)}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    labels = table[SETTING].astype(str).agg(_setting_text_row, axis=1)
    bars = table.assign(setting=labels, asr_std=table["asr_std"].fillna(0.0)).pivot_table(
        index="defense", columns="setting", values=["asr_mean", "asr_std"], sort=False)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars) * max(1, labels.nunique()) / 2), 4))
    (100 * bars["asr_mean"]).plot.bar(ax=ax, yerr=100 * bars["asr_std"], capsize=2, rot=30)
    ax.set(ylabel="final ASR %", xlabel="", ylim=(0, 100), title="Final ASR per defense")
    ax.legend(fontsize=8, title=None)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    written.append(out / "final-asr.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def _setting_text(setting: tuple) -> str:
    return ", ".join(f"{v} clients" if k == "clients" else str(v)
                     for k, v in zip(SETTING, setting, strict=True)
                     if not pd.isna(v) and str(v) not in ("", "<NA>"))


def _setting_text_row(row: pd.Series) -> str:
    return _setting_text(tuple(row[c] for c in SETTING))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(folder: Path, out: Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """All of the report's files for the runs under `folder`; the summary table and paths."""
    out = Path(out) if out else Path(folder) / "report"
    runs = load_runs(folder)
    if runs.empty:
        raise FileNotFoundError(f"no finished runs (folders with summary.json) under {folder}")
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs)
    runs.drop(columns="path").to_csv(out / "runs.csv", index=False)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(markdown_table(table) + "\n")
    written = [out / "runs.csv", out / "table.csv", out / "table.md", *plot(runs, table, out)]
    return table, written


def cmd_report(args: argparse.Namespace) -> int:
    """Tables (CSV, Markdown) and plots of every finished run under a results folder."""
    table, written = write_report(Path(args.folder), Path(args.out) if args.out else None)
    print(markdown_table(table))
    print("\n" + "\n".join(f"wrote {path}" for path in written))
    return 0


def add_report_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `fmfl report` on the project's console script."""
    report = subparsers.add_parser("report", help="tables and plots of a results folder",
                                   description=cmd_report.__doc__)
    report.add_argument("folder", help="results folder, e.g. results/quick")
    report.add_argument("--out", default="", help="where to write (default: <folder>/report)")
    report.set_defaults(func=cmd_report)
