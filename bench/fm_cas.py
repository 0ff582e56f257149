"""CAS of the FM: the task's classifier trained on D_syn alone vs on as many real images.

Targets (issue 3): CAS >= 70% for Fashion-MNIST with 10,000 synthetic images, >= 35% for
CIFAR-10 (`--cas-target 0.35`). The real baseline draws the same count, class-balanced,
from the training set (the public split holds only 6,000). With --trigger it also reports
the trigger share per class of D_syn and the ASR that D_syn plants in the CAS classifier
(for a poisoned-weights FM).

    python bench/fm_cas.py --fm assets/fm/fashion-mnist --per-class 1000 --fm-steps 10 \
        --out bench/results/fm_cas_fashion-mnist.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fmfl_flwr.foundation import evaluate_fm, load_fm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fm", default="assets/fm/fashion-mnist")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--fm-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=None, help="default: per FM kind")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--real-from", choices=("public", "train"), default="train")
    parser.add_argument("--trigger", default="", help="measure this trigger (e.g. badnets)")
    parser.add_argument("--target-label", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cas-target", type=float, default=0.70)
    parser.add_argument("--out", type=Path,
                        default=Path("bench/results/fm_cas_fashion-mnist.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = load_fm(args.fm, args.dataset, args.fm_steps, guidance_scale=args.guidance)
    result = evaluate_fm(source, args.dataset, args.data_dir, args.per_class, seed=0,
                         epochs=args.epochs, real_from=args.real_from, trigger=args.trigger,
                         target_label=args.target_label)
    result.update({"fm_path": args.fm, "fm_steps": args.fm_steps, "guidance": args.guidance,
                   "cas_target": args.cas_target,
                   "meets_target": result["cas"] >= args.cas_target,
                   "wall_seconds": time.perf_counter() - started,
                   "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
