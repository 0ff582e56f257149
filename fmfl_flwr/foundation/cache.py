"""D_syn on disk: generated once per (FM, counts, seed, attack), reused by rounds and runs.

Sampling 10,000 images costs minutes on a CPU, a cache hit well under a second. Images are
stored as uint8 (a miss returns the same quantised pixels a hit does), with the sha256 of
the file beside it: a mismatch (a partial write, a bit flip, an edit) regenerates the set.
The clean set is cached on its own, so a poisoned-pipeline run reuses the clean run's images.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmfl_flwr.data import cache_dir, to_float, to_uint8
from fmfl_flwr.foundation.poison import PoisonedPipeline, PoisonSettings
from fmfl_flwr.foundation.source import SyntheticSource


@dataclass(frozen=True)
class SyntheticSet:
    """D_syn: float images in [0, 1], int64 labels, and which samples the pipeline poisoned.

    `poisoned` marks only post-processing poison (threat a); a poisoned-weights FM's
    triggered outputs are not known to the server and stay unmarked.
    """

    images: torch.Tensor
    labels: torch.Tensor
    poisoned: torch.Tensor
    key: str
    from_cache: bool


def default_root() -> Path:
    return cache_dir() / "syn"


def set_key(identity: str, n_per_class: int, seed: int,
            attack: PoisonSettings | None) -> str:
    """The cache key: every input that changes the set's content."""
    fields = {"fm": identity, "n_per_class": n_per_class, "seed": seed,
              "attack": attack.key() if attack else None}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def synthetic_set(
    source: SyntheticSource, n_per_class: int, seed: int,
    attack: PoisonSettings | None = None, root: Path | None = None,
) -> SyntheticSet:
    """D_syn for this FM and settings, from the cache when a verified copy exists."""
    root = Path(root) if root else default_root()
    identity = source.identity()
    clean_key = set_key(identity, n_per_class, seed, None)
    clean = _load(root, clean_key)
    if clean is None:
        started = time.perf_counter()
        images, labels = source.generate(n_per_class, seed)
        clean = _store(root, clean_key, to_uint8(images), labels,
                       torch.zeros(len(labels), dtype=torch.bool),
                       {"fm": identity, "n_per_class": n_per_class, "seed": seed,
                        "attack": None, "generate_s": time.perf_counter() - started})
    if attack is None:
        return clean
    key = set_key(identity, n_per_class, seed, attack)
    cached = _load(root, key)
    if cached is not None:
        return cached
    images, labels, mask = PoisonedPipeline(source, attack).poison(clean.images, clean.labels,
                                                                  seed)
    return _store(root, key, to_uint8(images), labels, mask,
                  {"fm": identity, "n_per_class": n_per_class, "seed": seed,
                   "attack": attack.key(), "clean_key": clean_key})


def _paths(root: Path, key: str) -> tuple[Path, Path, Path]:
    return root / f"{key}.npz", root / f"{key}.sha256", root / f"{key}.json"


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _load(root: Path, key: str) -> SyntheticSet | None:
    data_path, sha_path, _ = _paths(root, key)
    if not data_path.is_file():
        return None
    if not sha_path.is_file() or sha_path.read_text().strip() != _sha256(data_path):
        warnings.warn(f"synthetic set {data_path} failed its sha256 check; regenerating",
                      stacklevel=3)
        return None
    with np.load(data_path) as arrays:
        return SyntheticSet(to_float(arrays["images"]), torch.from_numpy(arrays["labels"]),
                            torch.from_numpy(arrays["poisoned"]), key, True)


def _store(root: Path, key: str, images: torch.Tensor, labels: torch.Tensor,
           poisoned: torch.Tensor, meta: dict) -> SyntheticSet:
    """Write data, then its checksum, each atomically; a reader never sees a half file."""
    root.mkdir(parents=True, exist_ok=True)
    data_path, sha_path, meta_path = _paths(root, key)
    tmp = data_path.with_name(f"{key}.{os.getpid()}.tmp.npz")
    np.savez(tmp, images=images.numpy(), labels=labels.numpy(), poisoned=poisoned.numpy())
    digest = _sha256(tmp)
    os.replace(tmp, data_path)
    for path, text in ((sha_path, digest + "\n"), (meta_path, json.dumps(meta, indent=2))):
        part = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        part.write_text(text)
        os.replace(part, path)
    return SyntheticSet(to_float(images), labels.clone(), poisoned.clone(), key, False)
