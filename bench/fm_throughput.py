"""FM generation throughput (images/s per DDIM step count) and the D_syn cache-hit time.

The default FM-FL run needs ~10,000 synthetic images, so sampling speed decides whether a
run starts in minutes or in an hour; the cache makes every later round and run pay only the
hit time (target: < 2 s, including loading the FM to compute its identity).

    python bench/fm_throughput.py --fm assets/fm/fashion-mnist --dataset fashion-mnist \
        --steps 10,25 --images 200 --out bench/results/fm_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from fmfl_flwr.foundation import load_fm, synthetic_set
from fmfl_flwr.training import default_device


def throughput(fm: str, dataset: str, steps: int, images: int) -> dict:
    """Images per second for `images` samples (after a one-batch warm-up)."""
    source = load_fm(fm, dataset, steps, progress=False)
    source.generate(1, seed=123)
    per_class = max(1, images // source.num_classes)
    started = time.perf_counter()
    source.generate(per_class, seed=0)
    seconds = time.perf_counter() - started
    count = per_class * source.num_classes
    return {"fm_steps": steps, "images": count, "seconds": seconds,
            "images_per_s": count / seconds}


def cache_timing(fm: str, dataset: str, steps: int, per_class: int, root: Path | None) -> dict:
    """A request from a freshly loaded FM, as a new round or run makes it; a miss first fills
    the cache (reuse the CAS benchmark's set by keeping the default cache root)."""
    miss_s = None
    started = time.perf_counter()
    first = synthetic_set(load_fm(fm, dataset, steps, progress=False), per_class, 0, root=root)
    if not first.from_cache:
        miss_s = time.perf_counter() - started
    started = time.perf_counter()
    source = load_fm(fm, dataset, steps, progress=False)
    load_s = time.perf_counter() - started
    hit = synthetic_set(source, per_class, 0, root=root)
    hit_s = time.perf_counter() - started
    assert hit.from_cache and torch.equal(first.images, hit.images)
    return {"fm_steps": steps, "images": len(hit.labels), "miss_seconds": miss_s,
            "hit_seconds": hit_s, "hit_load_fm_seconds": load_s,
            "hit_target_seconds": 2.0, "hit_meets_target": hit_s < 2.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fm", default="assets/fm/fashion-mnist")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--steps", default="10,25", help="DDIM step counts to time")
    parser.add_argument("--images", type=int, default=200, help="images per timing")
    parser.add_argument("--cache-per-class", type=int, default=1000,
                        help="set size for the cache timing (the default run's 10,000)")
    parser.add_argument("--cache-steps", type=int, default=10)
    parser.add_argument("--cache-root", type=Path, default=None,
                        help="synthetic-set cache folder (default: $FMFL_CACHE_DIR/syn)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fm_throughput.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "fm": args.fm, "dataset": args.dataset, "device": str(default_device()),
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or "",
        "load_average_at_start": os.getloadavg(),
        "throughput": [throughput(args.fm, args.dataset, int(s), args.images)
                       for s in args.steps.split(",")],
        "cache": cache_timing(args.fm, args.dataset, args.cache_steps, args.cache_per_class,
                              args.cache_root),
        "load_average_at_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
