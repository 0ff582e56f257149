"""`fmfl grid <file.toml>`: many Flower runs from one file, one result folder per cell.

The file holds the settings shared by every run and the lists to cross::

    num-supernodes = 10                  # simulated clients (also allowed in [grid])
    [base]                               # run-config values of every cell
    dataset = "fashion-mnist"
    [grid]                               # the cells are the cross product, in file order
    threat = [{label = "clean"},         # a list of tables: settings that go together
              {label = "badnets", client-attack = "badnets", malicious-fraction = 0.2}]
    aggregation = ["fedavg", "median"]
    seed = [0, 1]

Each cell is one `flwr run` (`launch.run_simulation`) named after its values
(`badnets-median-seed0`), writing `<out>/<cell>/`. A folder with `summary.json` is a
finished cell and is skipped, so an interrupted grid resumes where it stopped; a failed cell
is recorded in `<out>/grid-status.csv` with its log and the grid goes on. Every cell's
configuration is checked before the first run, so a typo never costs a half-done grid.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import functools
import itertools
import json
import re
import shutil
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fmfl_flwr.config import ConfigError
from fmfl_flwr.launch import run_simulation, stop_processes_under
from fmfl_flwr.results import resolve_output_dir, write_json

NUM_SUPERNODES = "num-supernodes"
LABEL = "label"
SET_BY_GRID = ("output-dir", "run-name")
PATH_KEYS = ("data-dir", "fm", "trigger-image")
TOP_LEVEL = ("base", "grid", NUM_SUPERNODES, "cpus-per-client", "description")
STATUS_FILE = "grid-status.csv"
CELL_FILE = "cell.json"
TIMEOUT_EXIT = 124  # as coreutils' timeout


class Runner(Protocol):
    """Runs one cell; returns its exit code. Injected so tests need no Flower."""

    def __call__(self, run_config: dict[str, Any], num_supernodes: int, flwr_home: Path,
                 log_path: Path) -> int: ...


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its name, what it varies, and its full overrides."""

    name: str
    labels: dict[str, str]
    run_config: dict[str, Any]
    num_supernodes: int


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid file."""

    source: Path
    cells: list[Cell]
    cpus_per_client: int = 1


def load_grid(path: Path, overrides: dict[str, Any] | None = None) -> GridSpec:
    """Read and expand a grid file; every problem is a ConfigError naming the key.

    `overrides` (`--set`) win over the file everywhere, e.g. one round for a smoke test.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"grid file {path}: {err}") from err
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"grid file {path}: unknown top-level keys {unknown}; "
                          f"accepted: {', '.join(TOP_LEVEL)}")
    cells = expand(data.get("base", {}), data.get("grid", {}),
                   int(data.get(NUM_SUPERNODES, 10)), overrides)
    return GridSpec(path, cells, int(data.get("cpus-per-client", 1)))


def expand(base: dict[str, Any], grid: dict[str, list[Any]], num_supernodes: int = 10,
           overrides: dict[str, Any] | None = None) -> list[Cell]:
    """The cross product of `grid`'s lists over `base`, in file order, each cell named."""
    overrides = overrides or {}
    for key in SET_BY_GRID:
        if key in overrides:
            raise ConfigError(f"--set {key}: set by the grid itself (use --out)")
    for key in (*SET_BY_GRID, NUM_SUPERNODES):
        if key in base:
            where = "top level or [grid]" if key == NUM_SUPERNODES else "the grid (--out)"
            raise ConfigError(f"[base] {key}: set by {where}, not in [base]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[grid] {key}: expected a non-empty list, got {values!r}")
        if key in SET_BY_GRID:
            raise ConfigError(f"[grid] {key}: set by the grid itself")
    cells = []
    for combo in itertools.product(*grid.values()):
        settings: dict[str, Any] = dict(base)
        labels = {}
        for key, value in zip(grid, combo, strict=True):
            labels[key] = _label(key, value)
            settings.update(_settings(key, value))
        settings.update(overrides)
        clients = int(settings.pop(NUM_SUPERNODES, num_supernodes))
        run_config = {k: _absolute_path(k, v) for k, v in settings.items()}
        name = "-".join(labels.values()) or "run"
        cells.append(Cell(name, labels, run_config, clients))
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"cells share the names {duplicates}: give the tables in [grid] "
                          f"distinct '{LABEL}' values")
    return cells


def _settings(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        bad = sorted(k for k in value if k in SET_BY_GRID)
        if bad:
            raise ConfigError(f"[grid] {key}: {bad} are set by the grid itself")
        return {k: v for k, v in value.items() if k != LABEL}
    return {key: value}


def _label(key: str, value: Any) -> str:
    """Text values name themselves (`median`); numbers carry their key (`seed0`)."""
    if isinstance(value, dict):
        text = str(value.get(LABEL) or "_".join(_label(k, v) for k, v in value.items()))
    elif isinstance(value, str):
        text = value
    else:
        text = f"{key}{str(value).lower()}"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("_") or "none"


def _absolute_path(key: str, value: Any) -> Any:
    """Relative paths that exist here are made absolute: Flower runs the app elsewhere."""
    if key in PATH_KEYS and isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def validate(cells: list[Cell]) -> None:
    """Check every cell as the ServerApp will (`parse_app_config`), before any run starts."""
    from fmfl_flwr.app_config import parse_app_config
    from fmfl_flwr.defense import DEFENSES

    for cell in cells:
        try:
            config = parse_app_config(cell.run_config)
            DEFENSES.check(config.defense)
        except ValueError as err:
            raise ConfigError(f"cell {cell.name}: {err}") from err
        if cell.num_supernodes < 1:
            raise ConfigError(f"cell {cell.name}: {NUM_SUPERNODES}={cell.num_supernodes} "
                              "must be >= 1")


def is_finished(out: Path, cell: Cell) -> bool:
    return (out / cell.name / "summary.json").is_file()


def check_finished_match(out: Path, cells: list[Cell]) -> None:
    """A finished cell made from other settings would be silently reused: refuse it."""
    for cell in cells:
        if not is_finished(out, cell):
            continue
        try:
            stored = json.loads((out / cell.name / "config.json").read_text())["run_config"]
        except (OSError, KeyError, json.JSONDecodeError):
            continue
        changed = {k: (stored[k], v) for k, v in cell.run_config.items()
                   if k in stored and stored[k] != v}
        if changed:
            key, (old, new) = next(iter(changed.items()))
            raise ConfigError(
                f"cell {cell.name} finished in {out / cell.name} with {key}={old!r}, the grid "
                f"now says {key}={new!r}: use another --out, or delete that folder to rerun it")


def flower_runner(run_config: dict[str, Any], num_supernodes: int, flwr_home: Path,
                  log_path: Path, cpus_per_client: int = 1, timeout_s: float = 0.0) -> int:
    """One `flwr run` in a fresh Flower home; leftovers of a killed grid are stopped first.

    A run past `timeout_s` (0: no limit) is stopped, so one hung cell cannot hold the grid.
    """
    stop_processes_under(str(flwr_home))
    shutil.rmtree(flwr_home, ignore_errors=True)
    finished, fired = threading.Event(), threading.Event()

    def watchdog() -> None:  # keeps stopping until the run returns: processes start late
        if not finished.wait(timeout_s):
            fired.set()
            while not finished.wait(1.0):
                stop_processes_under(str(flwr_home))

    if timeout_s > 0:
        threading.Thread(target=watchdog, daemon=True).start()
    try:
        code = run_simulation(run_config, num_supernodes=num_supernodes,
                              cpus_per_client=cpus_per_client, flwr_home=flwr_home,
                              log_path=log_path)
    finally:
        finished.set()
        shutil.rmtree(flwr_home, ignore_errors=True)
    if fired.is_set():  # the killed `flwr run` may have been reaped with status 0
        with open(log_path, "a") as log:
            log.write(f"\nfmfl grid: stopped after the cell timeout of {timeout_s:g} s\n")
        return TIMEOUT_EXIT
    return code


def run_grid(cells: list[Cell], out: Path, runner: Runner = flower_runner,
             echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run every unfinished cell in order; returns each cell's status (`done`/`failed`).

    Statuses, exit codes, times and log paths go to `<out>/grid-status.csv` after every
    cell, so a failed cell is on record and the rest of the grid still runs.
    """
    out = Path(out).resolve()
    validate(cells)
    check_finished_match(out, cells)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rows = {c.name: _status_row(out, c) for c in cells}
    todo = [c for c in cells if rows[c.name]["status"] != "done"]
    echo(f"grid: {len(cells)} cells in {out}: {len(cells) - len(todo)} finished, "
         f"{len(todo)} to run")
    started, took = time.time(), []
    for index, cell in enumerate(cells, 1):
        if cell not in todo:
            continue
        log_path = out / "logs" / f"{cell.name}.log"
        log_path.unlink(missing_ok=True)
        remaining = len(todo) - len(took)
        eta = _clock(sum(took) / len(took) * remaining) if took else "?"
        echo(f"[{index}/{len(cells)}] {cell.name}: running (elapsed "
             f"{_clock(time.time() - started)}, ETA {eta}); log {log_path}")
        (out / cell.name).mkdir(parents=True, exist_ok=True)
        write_json(out / cell.name / CELL_FILE, {"cell": cell.name, "index": index,
                                                  "labels": cell.labels,
                                                  NUM_SUPERNODES: cell.num_supernodes})
        run_config = {**cell.run_config, "output-dir": str(out), "run-name": cell.name}
        cell_started = time.time()
        # "<cell>/home": one cell's process marker is never a prefix of another's (seed1/10)
        home = out / ".flwr" / cell.name / "home"
        code = runner(run_config, cell.num_supernodes, home, log_path)
        shutil.rmtree(home.parent, ignore_errors=True)
        seconds = time.time() - cell_started
        took.append(seconds)
        done = code == 0 and is_finished(out, cell)
        rows[cell.name].update(status="done" if done else "failed", exit_code=code,
                               seconds=round(seconds, 1), log=str(log_path))
        _write_status(out, rows)
        echo(f"[{index}/{len(cells)}] {cell.name}: " + (
            f"done in {seconds:.0f} s ({_result_text(out / cell.name)})" if done else
            f"FAILED ({_failure_reason(code)}) after {seconds:.0f} s; see {log_path}"))
    _write_status(out, rows)
    echo(f"grid: {sum(r['status'] == 'done' for r in rows.values())}/{len(cells)} cells done "
         f"in {_clock(time.time() - started)}")
    return {name: str(row["status"]) for name, row in rows.items()}


def _failure_reason(code: int) -> str:
    """`flwr run --stream` exits 0 when the ServerApp raised, so 0 alone would read as success."""
    if code:
        return f"exit {code}"
    return "flwr run exited 0 but the run wrote no summary.json: the ServerApp stopped early"


def _status_row(out: Path, cell: Cell) -> dict[str, Any]:
    row: dict[str, Any] = {"cell": cell.name, "status": "pending", "exit_code": "",
                           "seconds": "", "log": ""}
    previous = _read_status(out).get(cell.name, {})
    row.update({k: previous[k] for k in ("exit_code", "seconds", "log") if k in previous})
    if is_finished(out, cell):
        row["status"] = "done"
    elif previous.get("status") == "failed":
        row["status"] = "failed"
    return row


def _read_status(out: Path) -> dict[str, dict[str, str]]:
    path = out / STATUS_FILE
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {row["cell"]: row for row in csv.DictReader(handle)}


def _write_status(out: Path, rows: dict[str, dict[str, Any]]) -> None:
    tmp = out / (STATUS_FILE + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["cell", "status", "exit_code", "seconds",
                                                    "log"])
        writer.writeheader()
        writer.writerows(rows.values())
    tmp.replace(out / STATUS_FILE)


def _result_text(run_dir: Path) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    rejected = int(summary.get("rejected_replies", 0))
    return f"ACC {100 * summary['acc']:.2f}%, ASR {100 * summary['asr']:.2f}%" + (
        f"; WARNING: {rejected} client replies rejected" if rejected else "")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def default_out(source: Path) -> Path:
    """`<output dir>/<grid file's stem>`: each grid file gets its own folder."""
    return resolve_output_dir("") / Path(source).stem


def parse_set(values: list[str]) -> dict[str, Any]:
    """Repeated `--set KEY=VALUE` options (TOML values, as in flwr run --run-config); an
    error names the one option at fault and how a string is written."""
    parsed: dict[str, Any] = {}
    for value in values:
        try:
            option = tomllib.loads(value)
        except tomllib.TOMLDecodeError as err:
            key = value.split("=", 1)[0].strip()
            raise ConfigError(f"--set {value!r}: expected key=value in TOML, strings in quotes "
                              f"({key}='...'); {err}") from err
        twice = parsed.keys() & option.keys()
        if twice:
            raise ConfigError(f"--set {', '.join(sorted(twice))} is given twice")
        parsed.update(option)
    return parsed


def cmd_grid(args: argparse.Namespace) -> int:
    """Run every cell of a grid file as one Flower simulation; finished cells are skipped."""
    spec = load_grid(Path(args.file), parse_set(args.set))
    out = Path(args.out).resolve() if args.out else default_out(spec.source)
    cells = [c for c in spec.cells if not args.only
             or any(fnmatch.fnmatchcase(c.name, pattern) for pattern in args.only)]
    if not cells:
        raise ConfigError(f"--only {args.only}: no cell matches; --dry-run lists them")
    if args.dry_run:
        validate(cells)
        check_finished_match(out, cells)
        for index, cell in enumerate(cells, 1):
            state = "finished" if is_finished(out, cell) else "to run"
            values = " ".join(f"{k}={v!r}" for k, v in cell.run_config.items())
            print(f"[{index}/{len(cells)}] {cell.name} ({state}, "
                  f"{cell.num_supernodes} supernodes): {values}")
        return 0
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the running cell's Flower processes stop
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    runner = functools.partial(flower_runner, cpus_per_client=spec.cpus_per_client,
                               timeout_s=args.cell_timeout)
    try:
        statuses = run_grid(cells, out, runner)
    except KeyboardInterrupt:
        print(f"\ngrid: interrupted; run the same command again to resume in {out}",
              file=sys.stderr)
        return 130
    from fmfl_flwr.report import load_runs, markdown_table, summary_table

    runs = load_runs(out)
    if not runs.empty:
        print(f"\n{markdown_table(summary_table(runs))}\n\n(`fmfl report {out}` writes the "
              "tables and plots)")
    return 0 if all(s == "done" for s in statuses.values()) else 1


def add_grid_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `fmfl grid` on the project's console script."""
    grid = subparsers.add_parser("grid", help="run a grid of experiments from a TOML file",
                                 description=cmd_grid.__doc__)
    grid.add_argument("file", help="grid file, e.g. experiments/quick.toml")
    grid.add_argument("--out", default="",
                      help="results folder (default: $FMFL_OUTPUT_DIR or ./results, then the "
                           "file's stem)")
    grid.add_argument("--only", action="append", default=[], metavar="PATTERN",
                      help="run only the cells whose name matches this glob (repeatable)")
    grid.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a run-config key in every cell, TOML value as in "
                           "flwr run --run-config: --set num-server-rounds=1 (repeatable)")
    grid.add_argument("--cell-timeout", type=float, default=0.0, metavar="SECONDS",
                      help="stop a cell running longer than this and record it failed "
                           "(default 0: no limit)")
    grid.add_argument("--dry-run", action="store_true",
                      help="check every cell and list them with their state; run nothing")
    grid.set_defaults(func=cmd_grid)
