"""Shared test setup: real data from ../shared/datasets, caches in a per-session folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FMFL_TEST_DATA_DIR", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Decoded arrays and synthetic sets go to one throw-away folder per test session."""
    os.environ.setdefault("FMFL_CACHE_DIR", str(tmp_path_factory.mktemp("fmfl-cache")))
    os.environ["FMFL_DATA_DIR"] = str(SHARED_DATA)
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def fmnist():
    from fmfl_flwr.data import load_dataset

    return load_dataset("fashion-mnist", str(SHARED_DATA))
