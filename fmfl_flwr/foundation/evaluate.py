"""How good and how poisoned an FM is: CAS against a real-data baseline, trigger shares.

CAS (classification accuracy score): the task's classifier trained on D_syn alone, tested on
the real test set, next to the same classifier trained on as many real images. With a
trigger, it also reports how many outputs per class carry it and the backdoor that D_syn
plants in the CAS classifier (ASR on triggered non-target test images).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.foundation.cache import synthetic_set
from fmfl_flwr.foundation.poison import carries_trigger
from fmfl_flwr.foundation.source import SyntheticSource
from fmfl_flwr.models import build_model
from fmfl_flwr.partition import public_split
from fmfl_flwr.training import accuracy, predict_logits, train_epochs
from fmfl_flwr.triggers import make_trigger


def real_subset(labels: np.ndarray, pool: np.ndarray, n_per_class: int,
                seed: int) -> np.ndarray:
    """Up to n_per_class seeded indices per class from `pool` (class-balanced baseline)."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(pool[labels[pool] == c])[:n_per_class]
             for c in np.unique(labels[pool])]
    return np.sort(np.concatenate(picks))


def train_and_test(
    images: torch.Tensor, labels: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    dataset: str, model: str, epochs: int, seed: int, lr: float = 0.02,
) -> tuple[torch.nn.Module, float]:
    """A fresh seeded classifier trained on (images, labels); its real test accuracy."""
    torch.manual_seed(seed)
    net = build_model(model, dataset)
    train_epochs(net, images, labels, epochs=epochs, batch_size=64, lr=lr, seed=seed)
    return net, accuracy(net, test_x, test_y)


def evaluate_fm(
    source: SyntheticSource, dataset: str, data_dir: str, n_per_class: int, seed: int,
    model: str = "cnn", epochs: int = 5, real_from: str = "public", public_fraction: float = 0.1,
    trigger: str = "", target_label: int = 0, use_cache: bool = True,
) -> dict:
    """CAS of `source` and the real-data baseline, as a JSON-ready dict."""
    data = load_dataset(dataset, data_dir)
    test_x, test_y = to_float(data.test_x), torch.from_numpy(data.test_y)
    started = time.perf_counter()
    if use_cache:
        syn = synthetic_set(source, n_per_class, seed)
        images, labels, from_cache = syn.images, syn.labels, syn.from_cache
    else:
        (images, labels), from_cache = source.generate(n_per_class, seed), False
    generate_s = time.perf_counter() - started

    public, _ = public_split(len(data.train_y), public_fraction, seed)
    pool = public if real_from == "public" else np.arange(len(data.train_y))
    real_idx = real_subset(data.train_y, pool, n_per_class, seed)
    syn_net, cas = train_and_test(images, labels, test_x, test_y, dataset, model, epochs, seed)
    _, real_acc = train_and_test(to_float(data.train_x[real_idx]),
                                 torch.from_numpy(data.train_y[real_idx]), test_x, test_y,
                                 dataset, model, epochs, seed)
    result = {
        "dataset": dataset, "fm": source.identity(), "n_per_class": n_per_class,
        "seed": seed, "model": model, "epochs": epochs,
        "n_syn": len(labels), "cas": cas,
        "n_real": len(real_idx), "real_from": real_from, "real_acc": real_acc,
        "syn_from_cache": from_cache, "syn_seconds": generate_s,
    }
    if trigger:
        result["trigger"] = trigger_report(images, labels, syn_net, test_x, test_y, trigger,
                                           target_label)
    return result


def trigger_report(
    images: torch.Tensor, labels: torch.Tensor, net: torch.nn.Module, test_x: torch.Tensor,
    test_y: torch.Tensor, trigger_name: str, target_label: int,
) -> dict:
    """Share of D_syn carrying the trigger per class, and the ASR it plants in `net`."""
    trigger = make_trigger(trigger_name, tuple(images.shape[1:]))
    flags = carries_trigger(images, trigger)
    per_class = {int(c): flags[labels == c].float().mean().item() for c in labels.unique()}
    clean_test = test_y != target_label
    triggered = trigger.stamp(test_x[clean_test])
    asr = (predict_logits(net, triggered).argmax(1) == target_label).float().mean().item()
    return {"name": trigger_name, "target_label": target_label,
            "target_share": per_class.get(target_label, float("nan")),
            "share_per_class": per_class, "cas_model_asr": asr}
