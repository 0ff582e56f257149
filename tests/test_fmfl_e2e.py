"""FM-FL end to end through Flower: the trained FM's D_syn, pre-training, fusion, attack,
and the activation-bounds defense, on a small budget."""

import csv
import json

import pytest
import torch

from fmfl_flwr.launch import run_simulation

pytestmark = pytest.mark.slow


def test_fm_attack_with_activation_bounds_runs_end_to_end(tmp_path):
    config = {"num-server-rounds": 2, "batch-size": 64, "data-fraction": 0.2,
              "fraction-evaluate": 0.0, "fusion": True, "fm-attack": "poisoned-pipeline",
              "poison-ratio": 0.2, "syn-per-class": 100, "fm-steps": 10,
              "pretrain-epochs": 1, "distill-epochs": 1, "defense": "activation-bounds",
              "bounds-epochs": 2, "bounds-samples": 500, "eval-unbounded": True,
              "output-dir": str(tmp_path / "out"), "run-name": "fmfl"}
    code = run_simulation(config, num_supernodes=3, log_path=tmp_path / "log")
    assert code == 0, (tmp_path / "log").read_text()[-3000:]
    run_dir = tmp_path / "out" / "fmfl"
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["pretrain-time"]) > 0
    assert all(float(r["fusion-time"]) > 0 and float(r["defense-time"]) > 0 for r in rows[1:])
    # every served model carried bounds, so each round is read with them off too
    assert all(0 <= float(r["acc-unbounded"]) <= 1 and 0 <= float(r["asr-unbounded"]) <= 1
               for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["phases_s"]["fusion_s"] > 0 and summary["phases_s"]["defense_s"] > 0
    state = torch.load(run_dir / "model.pt")
    bounds = [k for k in state if k.endswith("act_bound")]
    assert len(bounds) == 4 and all(torch.isfinite(state[k]).all() for k in bounds)
