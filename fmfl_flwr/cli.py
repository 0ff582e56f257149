"""`fmfl`: the project's console script for what Flower has no verb for."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from fmfl_flwr.app_config import parse_app_config
from fmfl_flwr.cli_fm import add_fm_commands
from fmfl_flwr.config import ConfigError
from fmfl_flwr.extend import ExtensionError, prepare_extension
from fmfl_flwr.grid import add_grid_command, parse_set
from fmfl_flwr.launch import APP_DIR, run_simulation
from fmfl_flwr.report import add_report_command
from fmfl_flwr.results import resolve_output_dir
from fmfl_flwr.summary import format_table

# The paper's two scales (METHOD.md 5): how many clients, and the share sampled per round.
PRESETS = {
    "cross-silo": (10, {"fraction-train": 1.0, "fraction-evaluate": 1.0}),
    "cross-device": (100, {"fraction-train": 0.1, "fraction-evaluate": 0.1}),
}


def parse_overrides(text: str) -> dict:
    """'k=v k2=v2' in Flower's --run-config syntax (TOML values) -> dict."""
    if not text:
        return {}
    if Path(text).is_file():
        return tomllib.loads(Path(text).read_text())
    return tomllib.loads("\n".join(text.split()))


def app_defaults() -> dict:
    return tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def cmd_run(args: argparse.Namespace) -> int:
    """One Flower simulation run of the app, then its result table."""
    preset_nodes, preset_config = PRESETS[args.preset]
    overrides = {**preset_config, **parse_overrides(args.run_config)}
    num_supernodes = args.num_supernodes or preset_nodes
    full = {**app_defaults(), **overrides}
    config = parse_app_config(full)
    output = resolve_output_dir(config.output_dir)
    overrides["output-dir"] = str(output)
    code = run_simulation(overrides, num_supernodes=num_supernodes,
                          cpus_per_client=args.cpus_per_client)
    return print_result(code, output / config.resolved_run_name(), config.resolved_run_name())


def cmd_extend(args: argparse.Namespace) -> int:
    """Run a finished run on to more rounds, in a new folder; then its result table."""
    changes = parse_set(args.set)  # a ConfigError: main reports it, nothing written
    try:
        run_config, nodes = prepare_extension(args.run_dir, args.rounds, args.out,
                                              args.num_supernodes, app_defaults(), changes)
    except ExtensionError as err:
        print(f"fmfl extend: {err}", file=sys.stderr)
        return 2
    code = run_simulation(run_config, num_supernodes=nodes, cpus_per_client=args.cpus_per_client)
    name = run_config["run-name"]
    return print_result(code, Path(run_config["output-dir"]) / name, name)


def print_result(code: int, run_dir: Path, name: str) -> int:
    """The run's result table, or why there is none; the exit code."""
    summary_path = run_dir / "summary.json"
    if code != 0 or not summary_path.exists():
        print(f"fmfl: the Flower run failed (exit {code}); no {summary_path}",
              file=sys.stderr)
        return code or 1
    summary = json.loads(summary_path.read_text())
    print(f"\nResults: {summary_path.parent}\n")
    print(format_table([{"run": name, **summary}],
                       ["run", "rounds", "acc", "asr", "client_acc", "wall_time_s"],
                       {"run": "RUN", "rounds": "ROUNDS", "acc": "ACC %", "asr": "ASR %",
                        "client_acc": "CLIENT ACC %", "wall_time_s": "WALL S"}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the app in Flower's simulation (flwr run . underneath)",
                         description=cmd_run.__doc__)
    run.add_argument("--run-config", default="",
                     help="overrides as in flwr run: \"key=value key2='text'\" or a TOML file")
    run.add_argument("--preset", choices=sorted(PRESETS), default="cross-silo",
                     help="cross-silo: 10 clients, all every round; cross-device: 100 clients, "
                          "10%% per round (--num-supernodes and --run-config override it)")
    run.add_argument("--num-supernodes", type=int, default=0,
                     help="simulated clients (default: the preset's)")
    run.add_argument("--cpus-per-client", type=int, default=1,
                     help="CPU cores reserved per simulated client (Ray)")
    run.set_defaults(func=cmd_run)
    extend = sub.add_parser("extend", help="run a finished run on to more rounds, in a new folder",
                            description=cmd_extend.__doc__)
    extend.add_argument("run_dir", type=Path, help="the finished run's folder (summary.json, "
                                                   "final-checkpoint.pt)")
    extend.add_argument("--rounds", type=int, required=True,
                        help="num-server-rounds of the extended run (more than it ran)")
    extend.add_argument("--out", type=Path, required=True,
                        help="output-dir of the extended run (its folder must be new or empty)")
    extend.add_argument("--num-supernodes", type=int, default=0,
                        help="simulated clients (default: the run's own count)")
    extend.add_argument("--cpus-per-client", type=int, default=1,
                        help="CPU cores reserved per simulated client (Ray)")
    extend.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a defense key (bounds-*) for the rounds to come, TOML value: "
                             "--set bounds-overrule-confidence-min=0.75 (repeatable)")
    extend.set_defaults(func=cmd_extend)
    add_fm_commands(sub)
    add_grid_command(sub)
    add_report_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"fmfl: configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
