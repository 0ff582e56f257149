"""Does a boosted ResNet-18 reply stay a working model? BatchNorm variance below 0.

Up to stop 57 model replacement sent global + boost * (local - global) on every
floating-point tensor, BatchNorm's running variance included. Where one local epoch
lowered a variance by more than 1/boost of itself, the boosted variance was negative and
the model's outputs NaN: finite weights that pass the server's checks, one non-finite
teacher in fusion (docs/defense.md, "CIFAR-10 model replacement, and fusion's broken
teachers"). Since stop 58 `boost_update` sends the running statistics unboosted; this
counts the variances below 0 and the non-finite logits of one boosted reply.

    python bench/boosted_batchnorm.py results/c57-scaling-iid-s1/scaling-iid-none \
        --out bench/results/boosted_batchnorm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from fmfl_flwr.attacks import boost_update
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.models import build_model
from fmfl_flwr.training import predict_logits, train_epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a CIFAR-10 ResNet-18 run folder (model.pt)")
    parser.add_argument("--boost", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=2500, help="the client's images")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = json.loads((args.run / "config.json").read_text())["run_config"]
    torch.manual_seed(args.seed)
    data = load_dataset(config["dataset"], args.data_dir)
    model = build_model(config["model"], config["dataset"], data.num_classes,
                        config["model-width"])
    model.load_state_dict(torch.load(args.run / "model.pt", weights_only=False))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    picked = torch.randperm(len(data.train_y))[: args.samples]
    train_epochs(model, to_float(data.train_x[picked]), torch.as_tensor(data.train_y[picked]),
                 1, 64, lr=args.lr, seed=args.seed)
    boosted = boost_update(start, model.state_dict(), args.boost)
    variances = {k: v for k, v in boosted.items() if k.endswith("running_var")}
    below = {k: int((v < 0).sum()) for k, v in variances.items() if (v < 0).any()}
    model.load_state_dict(boosted)
    logits = predict_logits(model, to_float(data.test_x[:500]))
    result = {
        "run": str(args.run), "boost": args.boost, "samples": args.samples, "lr": args.lr,
        "variances-below-zero": sum(below.values()), "layers-with-them": len(below),
        "batchnorm-layers": len(variances),
        "non-finite-logit-share": (~torch.isfinite(logits)).float().mean().item(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
