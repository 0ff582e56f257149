"""The defenses Flower lacks, on small hand-made replies with results worked out on paper.

Each model has a float parameter `w` and an integer buffer `n` (like BatchNorm's
`num_batches_tracked`): rules update and compare `w` only; `n` is averaged and rounded.
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies.flame import Flame, clip_to_median_and_average, select_majority_cluster
from strategies.fltrust import FLTrust, trust_scores
from strategies.foolsgold import FoolsGold, foolsgold_weights
from strategies.normclip import NormClip, WeakDP
from strategies.rlr import RobustLR, robust_learning_rates


def model(w: list[float], n: int = 10) -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.array(w, dtype=np.float64)), "n": Array(np.array(n, dtype=np.int64))}
    )


def reply(
    w: list[float], n: int = 10, num_examples: int = 1, node_id: int = 0, **metrics: float
) -> Message:
    """A successful training reply, built as Flower's own strategy tests build them."""
    msg = Mock(spec=Message)
    msg.content = RecordDict(
        {
            "arrays": model(w, n),
            "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
        }
    )
    msg.has_error.return_value = False
    msg.has_content.return_value = True
    msg.metadata = Mock(src_node_id=node_id)
    return msg


def values(arrays: ArrayRecord | None) -> tuple[np.ndarray, np.ndarray]:
    assert arrays is not None
    return arrays["w"].numpy(), arrays["n"].numpy()


class TestNormClip:
    def test_clips_to_the_bound_then_takes_the_weighted_mean(self) -> None:
        # updates [3, 4] (norm 5 -> clipped to 2.5: [1.5, 2]) and [0.6, 0] (kept);
        # weights 1 and 3: ([1.5, 2] + 3 [0.6, 0]) / 4 = [0.825, 0.5]
        strategy = NormClip(bound=2.5)
        strategy.current_arrays = model([1.0, 1.0])
        replies = [reply([4.0, 5.0], n=20, num_examples=1), reply([1.6, 1.0], n=32, num_examples=3)]

        w, n = values(strategy.aggregate_train(1, replies)[0])

        np.testing.assert_allclose(w, [1.825, 1.5])
        assert n == 29 and n.dtype == np.int64  # (20 + 3 * 32) / 4

    def test_configure_train_remembers_the_global_model(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for field in ("_run_id", "_node_id", "_task_id"):  # as inside a run
            monkeypatch.setattr(TaskIdentity, field, 1)
        grid = Mock()
        grid.get_node_ids.return_value = [1, 2]
        strategy = NormClip()
        global_arrays = model([1.0, 1.0])

        messages = list(strategy.configure_train(1, global_arrays, ConfigRecord(), grid))

        assert len(messages) == 2
        assert strategy.current_arrays is global_arrays

    def test_without_the_global_model_fails_clearly(self) -> None:
        with pytest.raises(RuntimeError, match="needs the global model"):
            NormClip().aggregate_train(1, [reply([1.0, 1.0])])

    def test_no_replies_no_model(self) -> None:
        assert NormClip().aggregate_train(1, []) == (None, None)


class TestWeakDP:
    def test_without_noise_equals_normclip_and_ignores_integer_buffers(self) -> None:
        # Same replies as NormClip's test: the integer step `n` (20 - 10 = 10) must not
        # count in the update norm, or [3, 4] would be clipped to a smaller vector.
        strategy = WeakDP(clipping_norm=2.5, noise_multiplier=0.0, num_sampled_clients=2)
        strategy.current_arrays = model([1.0, 1.0])
        replies = [reply([4.0, 5.0], n=20, num_examples=1), reply([1.6, 1.0], n=32, num_examples=3)]

        arrays, _ = strategy.aggregate_train(1, replies)

        w, n = values(arrays)
        assert arrays is not None and list(arrays.keys()) == ["w", "n"]
        np.testing.assert_allclose(w, [1.825, 1.5])
        assert n == 29 and n.dtype == np.int64
        received = replies[0].content["arrays"]  # left as received, for fusion and defenses
        np.testing.assert_allclose(received["w"].numpy(), [4.0, 5.0])
        assert received["n"].numpy() == 20


class TestFlame:
    def test_drops_the_outlier_and_clips_to_the_median_norm(self) -> None:
        # updates [1, 0], [3, 0], [2, 0] point one way, [0, 10] another: HDBSCAN
        # (min_cluster_size 3) keeps the first three. Median norm of all four:
        # median(1, 3, 2, 10) = 2.5, so [3, 0] -> [2.5, 0]; mean [5.5 / 3, 0].
        strategy = Flame(noise_lambda=0.0)
        strategy.current_arrays = model([1.0, 1.0])
        replies = [
            reply([2.0, 1.0], n=10, loss=1.0),
            reply([4.0, 1.0], n=12, loss=1.0),
            reply([3.0, 1.0], n=14, loss=1.0),
            reply([1.0, 11.0], n=100, loss=9.0),
        ]

        arrays, metrics = strategy.aggregate_train(1, replies)

        w, n = values(arrays)
        np.testing.assert_allclose(w, [1.0 + 5.5 / 3, 1.0])
        assert n == 12  # unweighted mean of the admitted 10, 12, 14
        assert metrics is not None and metrics["loss"] == pytest.approx(1.0)

    def test_noise_scales_with_the_median_norm(self) -> None:
        # four equal updates of norm 2: nothing dropped or clipped; noise std 0.5 * 2 = 1
        d = 20000
        step = np.full(d, 2.0 / np.sqrt(d))
        strategy = Flame(noise_lambda=0.5, seed=1)
        strategy.current_arrays = model(list(np.zeros(d)))
        replies = [reply(list(step)) for _ in range(4)]

        w, _ = values(strategy.aggregate_train(1, replies)[0])

        assert np.std(w - step) == pytest.approx(1.0, rel=0.03)
        assert abs(np.mean(w - step)) < 0.05

    def test_few_updates_are_all_admitted(self) -> None:
        assert select_majority_cluster(np.array([[1.0, 0.0], [0.0, 1.0]])) == [0, 1]

    def test_median_is_over_all_clients(self) -> None:
        updates = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 10.0]])
        mean, median_norm = clip_to_median_and_average(updates, [0, 1, 2])
        assert median_norm == 2.5
        np.testing.assert_allclose(mean, [5.5 / 3, 0.0])


class TestFoolsGold:
    def test_sybils_that_agree_get_no_weight(self) -> None:
        # histories A = B = [1, 0] (sybils), C = [1, 1], D = [0, 1] (honest).
        # cos: A-B 1, A-C 1/sqrt2, C-D 1/sqrt2, A-D 0. Max similarity: A, B 1; C, D 1/sqrt2.
        # Pardoning C against A, B: 1/sqrt2 * (1/sqrt2) / 1 = 0.5, so C's max stays
        # 1/sqrt2. wv = 1 - max = [0, 0, 0.29, 0.29] -> rescaled [0, 0, 1, 1] -> 0.99
        # -> logit ln(99) + 0.5 > 1 -> weights [0, 0, 1, 1]. Update (C + D) / 2.
        strategy = FoolsGold()
        strategy.current_arrays = model([1.0, 1.0])
        replies = [
            reply([2.0, 1.0], n=10, node_id=1),
            reply([2.0, 1.0], n=10, node_id=2),
            reply([2.0, 2.0], n=20, node_id=3),
            reply([1.0, 2.0], n=30, node_id=4),
        ]

        w, n = values(strategy.aggregate_train(1, replies)[0])

        np.testing.assert_allclose(w, [1.5, 2.0])
        assert n == 25  # weights 0, 0, 1, 1 on 10, 10, 20, 30

    def test_weights(self) -> None:
        histories = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
        np.testing.assert_allclose(foolsgold_weights(histories), [0.0, 0.0, 1.0, 1.0])

    def test_history_sums_each_nodes_updates_over_rounds(self) -> None:
        strategy = FoolsGold()
        strategy.current_arrays = model([0.0, 0.0])
        strategy.aggregate_train(1, [reply([1.0, 0.0], node_id=7), reply([0.0, 1.0], node_id=8)])
        strategy.current_arrays = model([0.0, 0.0])
        strategy.aggregate_train(2, [reply([0.0, 2.0], node_id=7), reply([0.0, 1.0], node_id=9)])

        np.testing.assert_allclose(strategy.history[7], [1.0, 2.0])
        np.testing.assert_allclose(strategy.history[8], [0.0, 1.0])
        np.testing.assert_allclose(strategy.history[9], [0.0, 1.0])


class TestRobustLR:
    def test_flips_the_learning_rate_where_signs_disagree(self) -> None:
        # updates (rows) and sign sums per parameter: 4, 2, 0. Threshold 3: lr +1, -1, -1.
        # mean update [1, 0.5, 0] -> step [1, -0.5, 0]
        strategy = RobustLR(threshold=3.0)
        strategy.current_arrays = model([0.5, 0.5, 0.5])
        replies = [
            reply([1.5, 1.5, 2.5]),
            reply([1.5, 1.5, 2.5]),
            reply([1.5, -0.5, -1.5]),
            reply([1.5, 1.5, -1.5]),
        ]

        w, n = values(strategy.aggregate_train(1, replies)[0])

        np.testing.assert_allclose(w, [1.5, 0.0, 0.5])
        assert n == 10

    def test_learning_rates(self) -> None:
        updates = np.array([[1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
        np.testing.assert_allclose(robust_learning_rates(updates, 2.0, 0.5), [0.5, -0.5])


class TestFLTrust:
    def test_gives_no_weight_to_an_update_opposed_to_the_root(self) -> None:
        # root g0 = [3, 4] (norm 5). Updates [1, 0] (cos 0.6), [0, 2] (cos 0.8),
        # [-3, -4] (cos -1 -> trust 0). Rescaled to norm 5: [5, 0], [0, 5].
        # (0.6 [5, 0] + 0.8 [0, 5]) / 1.4 = [3, 4] / 1.4
        root_update_fn = Mock(return_value=ArrayRecord({"w": Array(np.array([3.0, 4.0]))}))
        strategy = FLTrust(root_update_fn=root_update_fn)
        global_arrays = model([1.0, 1.0])
        strategy.current_arrays = global_arrays
        replies = [reply([2.0, 1.0], n=10), reply([1.0, 3.0], n=20), reply([-2.0, -3.0], n=100)]

        w, n = values(strategy.aggregate_train(1, replies)[0])

        root_update_fn.assert_called_once_with(global_arrays)
        np.testing.assert_allclose(w, [1.0 + 3.0 / 1.4, 1.0 + 4.0 / 1.4])
        assert n == 16  # (0.6 * 10 + 0.8 * 20) / 1.4 = 15.7

    def test_trust_scores(self) -> None:
        updates = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, -4.0], [0.0, 0.0]])
        np.testing.assert_allclose(trust_scores(updates, np.array([3.0, 4.0])), [0.6, 0.8, 0, 0])

    def test_all_opposed_keeps_the_parameters(self) -> None:
        strategy = FLTrust(root_update_fn=lambda _: ArrayRecord({"w": Array(np.array([1.0, 1.0]))}))
        strategy.current_arrays = model([1.0, 1.0])

        w, n = values(strategy.aggregate_train(1, [reply([0.0, 0.0], n=20)])[0])

        np.testing.assert_allclose(w, [1.0, 1.0])
        assert n == 10  # no trusted reply: the global model's buffer
