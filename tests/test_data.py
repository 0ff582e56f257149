import numpy as np
import pytest

from fmfl_flwr.data import DatasetNotFoundError, load_dataset, to_float
from fmfl_flwr.partition import client_indices, partition_indices, public_split


def test_fashion_mnist_from_shared_folder(fmnist):
    assert fmnist.train_x.shape == (60000, 1, 28, 28) and fmnist.train_x.dtype == np.uint8
    assert fmnist.test_x.shape == (10000, 1, 28, 28)
    assert sorted(np.unique(fmnist.train_y)) == list(range(10))
    images = to_float(fmnist.test_x[:5])
    assert images.min() >= 0 and images.max() <= 1


def test_cached_arrays_are_reused(fmnist):
    from conftest import SHARED_DATA

    again = load_dataset("fashion-mnist", str(SHARED_DATA))
    assert np.array_equal(again.train_y, fmnist.train_y)


def test_missing_data_dir_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"), download=False)
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "data-dir" in message


def test_unknown_dataset():
    with pytest.raises(ValueError, match="accepted: fashion-mnist, cifar10"):
        load_dataset("imagenet")


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partitions_cover_private_part_once_and_are_deterministic(fmnist, partition):
    parts = [client_indices(fmnist.train_y, i, 10, partition, 0.1, 0.1, seed=3)
             for i in range(10)]
    public, private = public_split(len(fmnist.train_y), 0.1, 3)
    merged = np.concatenate(parts)
    assert len(merged) == len(np.unique(merged)) == len(private) == 54000
    assert not set(merged) & set(public)
    assert all(len(p) > 0 for p in parts)
    again = client_indices(fmnist.train_y, 4, 10, partition, 0.1, 0.1, seed=3)
    assert np.array_equal(again, parts[4])


def test_dirichlet_is_skewed_and_seed_matters(fmnist):
    a = partition_indices(fmnist.train_y, "dirichlet", 10, 0.1, seed=0)
    b = partition_indices(fmnist.train_y, "dirichlet", 10, 0.1, seed=1)
    sizes = [len(p) for p in a]
    assert max(sizes) > 2 * min(sizes)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=False))


def test_bad_partition_name(fmnist):
    with pytest.raises(ValueError, match="partition='foo' is not known"):
        partition_indices(fmnist.train_y, "foo", 10, 0.1, 0)


def test_data_fraction_keeps_a_seeded_subset(fmnist):
    full = client_indices(fmnist.train_y, 2, 10, "iid", 0.1, 0.1, seed=0)
    part = client_indices(fmnist.train_y, 2, 10, "iid", 0.1, 0.1, seed=0, data_fraction=0.25)
    assert len(part) == round(len(full) * 0.25) and set(part) <= set(full)
    again = client_indices(fmnist.train_y, 2, 10, "iid", 0.1, 0.1, seed=0, data_fraction=0.25)
    assert np.array_equal(part, again)


def test_cifar10_from_the_image_folder_zip():
    from conftest import SHARED_DATA

    cifar = load_dataset("cifar10", str(SHARED_DATA))
    assert cifar.train_x.shape == (50000, 3, 32, 32) and cifar.test_x.shape == (10000, 3, 32, 32)
    assert np.bincount(cifar.test_y).tolist() == [1000] * 10
    mean = cifar.train_x.mean(axis=(0, 2, 3)) / 255
    assert np.allclose(mean, [0.4913, 0.4821, 0.4465], atol=0.02)
