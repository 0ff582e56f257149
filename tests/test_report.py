"""`fmfl report`: tables and plots from hand-made result folders with known numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fmfl_flwr.cli import main
from fmfl_flwr.report import load_runs, markdown_table, summary_table, write_report

BADNETS = {"client-attack": "badnets", "malicious-fraction": 0.2}
FM_ATTACK = {"fusion": True, "fm-attack": "poisoned-pipeline"}


def make_run(root: Path, name: str, config: dict, acc: list[float], asr: list[float],
             clients: int | None = 10) -> Path:
    """A finished run's folder as results.py and the grid write it (only what reports read)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    full = {"fusion": False, "fm-attack": "none", "client-attack": "none", "partition": "iid",
            "aggregation": "fedavg", "defense": "none", "seed": 0, "lr": 0.05,
            "output-dir": str(root), "run-name": name, **config}
    (run_dir / "config.json").write_text(json.dumps({"run_config": full}))
    rows = "\n".join(f"{r},{a},{s}" for r, (a, s) in enumerate(zip(acc, asr, strict=True)))
    (run_dir / "metrics.csv").write_text("round,acc,asr,round-time\n" + rows.replace(
        "\n", ",1.0\n") + ",1.0\n")
    (run_dir / "summary.json").write_text(json.dumps(
        {"acc": acc[-1], "asr": asr[-1], "rounds": len(acc) - 1, "wall_time_s": 60.0}))
    if clients is not None:  # grid order: the order the folders were made in
        index = len(list(root.iterdir()))
        (run_dir / "cell.json").write_text(json.dumps({"num-supernodes": clients,
                                                       "index": index}))
    return run_dir


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """clean / badnets / FM attack x fedavg / flame, two seeds each, plus noise folders."""
    for seed, (acc, asr) in enumerate([(0.90, 0.10), (0.88, 0.14)]):
        s = {"seed": seed}
        make_run(tmp_path, f"clean-fedavg-{seed}", s, [0.1, acc], [0.0, 0.02])
        make_run(tmp_path, f"badnets-fedavg-{seed}", {**s, **BADNETS}, [0.1, acc], [0.0, 0.9])
        make_run(tmp_path, f"badnets-flame-{seed}", {**s, **BADNETS, "aggregation": "flame"},
                 [0.1, acc - 0.02], [0.0, asr])
        make_run(tmp_path, f"fm-fedavg-{seed}", {**s, **FM_ATTACK}, [0.1, 0.8], [1.0, 0.95])
        make_run(tmp_path, f"fm-bounds-{seed}", {**s, **FM_ATTACK, "defense": "activation-bounds"},
                 [0.1, 0.78], [1.0, 0.05 + 0.1 * seed])
    unfinished = tmp_path / "half-written"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"run_config": {}}))
    return tmp_path


def _row(table: pd.DataFrame, threat: str, defense: str) -> pd.Series:
    rows = table[(table["threat"] == threat) & (table["defense"] == defense)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_runs_are_labelled_from_their_config(results):
    runs = load_runs(results)
    assert len(runs) == 10 and "half-written" not in set(runs["run"])
    fm = runs[runs["run"] == "fm-bounds-1"].iloc[0]
    assert (fm["system"], fm["threat"], fm["defense"], fm["partition"], fm["clients"]) == (
        "FM-FL", "poisoned-pipeline", "fedavg+activation-bounds", "iid", 10)
    assert set(runs["variant"]) == {""}


def test_table_is_mean_and_std_over_seeds(results):
    table = summary_table(load_runs(results))
    assert len(table) == 5 and set(table["seeds"]) == {2}
    flame = _row(table, "badnets", "flame")
    assert flame["acc_mean"] == pytest.approx(0.87)
    assert flame["acc_std"] == pytest.approx(0.0141421, abs=1e-6)  # sample std of .88, .86
    assert flame["asr_mean"] == pytest.approx(0.12)
    bounds = _row(table, "poisoned-pipeline", "fedavg+activation-bounds")
    assert bounds["asr_mean"] == pytest.approx(0.10) and bounds["asr_std"] == pytest.approx(
        0.0707107, abs=1e-6)


def test_markdown_has_a_row_per_defense_and_a_column_per_setting(results):
    text = markdown_table(summary_table(load_runs(results)))
    lines = text.splitlines()
    assert lines[2] == ("| defense \\ system / threat | FL / clean | FL / badnets | "
                        "FM-FL / poisoned-pipeline |")
    assert "| flame |  | 87.00 ± 1.41 / 12.00 ± 2.83 |  |" in lines
    assert any(line.startswith("| fedavg+activation-bounds |") and "10.00 ± 7.07" in line
               for line in lines)


def test_runs_that_differ_in_other_keys_are_kept_apart(tmp_path):
    make_run(tmp_path, "a", {"lr": 0.05}, [0.1, 0.9], [0.0, 0.1])
    make_run(tmp_path, "b", {"lr": 0.01}, [0.1, 0.7], [0.0, 0.1])
    make_run(tmp_path, "c", {"partition": "dirichlet", "dirichlet-alpha": 0.1}, [0.1, 0.6],
             [0.0, 0.1], clients=None)
    table = summary_table(load_runs(tmp_path))
    assert sorted(table["variant"]) == ["lr=0.01", "lr=0.05", "lr=0.05"]
    assert sorted(table["acc_mean"]) == pytest.approx([0.6, 0.7, 0.9])
    assert "dirichlet(0.1)" in set(table["partition"])
    assert "lr=0.01" in markdown_table(table)  # one run has no client count (NA)


def test_a_defense_run_shares_the_column_of_its_settings_undefended_run(tmp_path):
    """A CIFAR-10 defense run beside undefended CIFAR-10 and Fashion-MNIST runs: the
    dataset tells only the undefended two apart, yet labels all three."""
    cifar = {**FM_ATTACK, "dataset": "cifar10", "model": "resnet18"}
    make_run(tmp_path, "cifar-bounds", {**cifar, "defense": "activation-bounds"}, [0.1, 0.4],
             [0.0, 0.9])
    make_run(tmp_path, "cifar-none", cifar, [0.1, 0.42], [0.0, 0.93])
    make_run(tmp_path, "fashion-none", {**FM_ATTACK, "dataset": "fashion-mnist",
                                        "model": "cnn"}, [0.1, 0.85], [0.0, 0.92])
    variant = load_runs(tmp_path).set_index("run")["variant"]
    assert variant["cifar-bounds"] == variant["cifar-none"] == "dataset=cifar10 model=resnet18"
    assert variant["fashion-none"] == "dataset=fashion-mnist model=cnn"
    lines = markdown_table(summary_table(load_runs(tmp_path))).splitlines()
    assert len(lines[2].split("|")) == 5  # two setting columns, not three


def test_a_whole_number_set_as_an_int_is_the_float_default(tmp_path):
    """`--set lr=1` against a default 1.0: one setting."""
    make_run(tmp_path, "default", {"seed": 0, "lr": 1.0}, [0.1, 0.9], [0.0, 0.1])
    make_run(tmp_path, "set", {"seed": 1, "lr": 1}, [0.1, 0.7], [0.0, 0.1])
    table = summary_table(load_runs(tmp_path))
    assert list(table["seeds"]) == [2] and list(table["variant"]) == [""]
    make_run(tmp_path, "other", {"seed": 2, "lr": 1.5}, [0.1, 0.5], [0.0, 0.1])
    assert sorted(summary_table(load_runs(tmp_path))["variant"]) == ["lr=1", "lr=1.5"]


def test_a_key_an_older_run_lacks_counts_as_its_default(tmp_path):
    """A run from before `attack-lift-bounds` existed and one with it at its default are
    seeds of one setting; one with it on is another."""
    make_run(tmp_path, "old", {"seed": 0}, [0.1, 0.9], [0.0, 0.1])
    make_run(tmp_path, "new", {"seed": 1, "attack-lift-bounds": False}, [0.1, 0.7],
             [0.0, 0.1])
    table = summary_table(load_runs(tmp_path))
    assert list(table["seeds"]) == [2] and list(table["variant"]) == [""]
    make_run(tmp_path, "lifted", {"seed": 2, "attack-lift-bounds": True}, [0.1, 0.5],
             [0.0, 0.1])
    table = summary_table(load_runs(tmp_path))
    assert sorted(table["variant"]) == ["attack-lift-bounds=False", "attack-lift-bounds=True"]


def test_a_key_whose_default_flipped_counts_as_the_older_run_ran(tmp_path):
    """Runs from before `distill-unlearn-poison` did not unlearn: they are not seeds of a
    run that unlearns by default."""
    make_run(tmp_path, "old", {"seed": 0}, [0.1, 0.9], [0.0, 0.1])
    make_run(tmp_path, "new", {"seed": 1, "distill-unlearn-poison": True}, [0.1, 0.7],
             [0.0, 0.1])
    table = summary_table(load_runs(tmp_path))
    assert "distill-unlearn-poison=False" in set(table["variant"])
    assert "distill-unlearn-poison=True" in set(table["variant"])


def test_runs_in_hidden_folders_are_not_read(tmp_path):
    make_run(tmp_path, "a", {}, [0.1, 0.9], [0.0, 0.1])
    make_run(tmp_path / ".flwr" / "apps" / "docs", "old", {"seed": 3}, [0.1, 0.5], [0.0, 0.1])
    assert list(load_runs(tmp_path)["run"]) == ["a"]


def test_runs_behind_symbolic_links_are_read_once(tmp_path):
    """A report folder of links to runs kept elsewhere; a link back up the tree and a second
    link to the same run neither loop nor count twice."""
    kept, report = tmp_path / "kept", tmp_path / "report"
    make_run(kept, "a", {}, [0.1, 0.9], [0.0, 0.1])
    make_run(kept, "b", {"seed": 1}, [0.1, 0.7], [0.0, 0.1])
    report.mkdir()
    (report / "a").symlink_to(kept / "a")
    (report / "a-again").symlink_to(kept / "a")
    (report / "b").symlink_to(kept / "b")
    (report / "loop").symlink_to(report)
    assert sorted(load_runs(report)["run"]) == ["a", "b"]


def test_report_writes_tables_and_plots(results, tmp_path, capsys):
    out = tmp_path / "report-out"
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert "87.00 ± 1.41 / 12.00 ± 2.83" in capsys.readouterr().out
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 5 and {"acc_mean", "acc_std", "asr_mean", "asr_std"} <= set(table)
    assert len(pd.read_csv(out / "runs.csv")) == 10
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["curves-fl-badnets-iid-10-clients.png", "curves-fl-clean-iid-10-clients.png",
                    "curves-fm-fl-poisoned-pipeline-iid-10-clients.png", "final-asr.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_defense_that_did_not_run_is_flagged(tmp_path):
    run_dir = make_run(tmp_path, "bounds", {"defense": "activation-bounds", "fusion": True},
                       [0.1, 0.8], [0.0, 0.9])
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["phases_s"] = {"fusion_s": 3.5, "defense_s": 0.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    text = markdown_table(summary_table(load_runs(tmp_path)))
    assert text.endswith("WARNING: fedavg+activation-bounds, FM-FL, clean, iid, 10 clients: "
                         "defense activation-bounds did not run")


def test_one_seed_per_setting_has_no_spread_and_still_plots(tmp_path):
    make_run(tmp_path / "runs", "a", {}, [0.1, 0.9], [0.0, 0.1])
    make_run(tmp_path / "runs", "b", BADNETS, [0.1, 0.8], [0.0, 0.7])
    table, written = write_report(tmp_path / "runs")
    assert table["acc_std"].isna().all() and len(written) == 6
    assert "| fedavg | 90.00 / 10.00 | 80.00 / 70.00 |" in (
        tmp_path / "runs" / "report" / "table.md").read_text()


def test_report_of_an_empty_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        write_report(tmp_path)


def test_a_run_with_rejected_replies_is_flagged(tmp_path):
    run_dir = make_run(tmp_path, "fedavg", {}, [0.1, 0.8], [0.0, 0.1])
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "rejected_replies": 18}))
    make_run(tmp_path, "fedavg-seed1", {"seed": 1}, [0.1, 0.8], [0.0, 0.1])
    runs = load_runs(tmp_path)
    assert list(runs["note"]) == ["18 client replies rejected (see the run's log)", ""]
    assert markdown_table(summary_table(runs)).endswith(
        "WARNING: fedavg, FL, clean, iid, 10 clients: 18 client replies rejected "
        "(see the run's log)")
