"""Faulty clients: broken replies are rejected and counted, missing ones are tolerated.

A security tool must not be the weak point: whatever a client sends back (NaN, wrong
shapes, missing keys, an error) or fails to send (a crash, a timeout), the server keeps
running, never aggregates the broken model, and keeps the global model when fewer than
`min-replies` valid replies arrive. Unit tests on FMFLStrategy with FedAvg inside and
hand-made replies (as Flower's own strategy tests build them), then a real simulation in
which one ClientApp crashes every round.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

import strategies.fmfl
from fmfl_flwr.config import PLAIN_FEDAVG
from fmfl_flwr.launch import APP_DIR, run_simulation
from strategies.fmfl import FMFLStrategy

GLOBAL = {"w": np.zeros((2, 2), dtype=np.float32), "n": np.array(0, dtype=np.int64)}


def global_record() -> ArrayRecord:
    """The global model the server sends out: float weights and an integer buffer."""
    return ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})


def arrays(w: float | list[list[float]], **extra: np.ndarray) -> ArrayRecord:
    """A client model like GLOBAL: float weights `w` (a fill value or a 2x2 list)."""
    weights = np.full((2, 2), w, dtype=np.float32) if np.isscalar(w) else \
        np.asarray(w, dtype=np.float32)
    return ArrayRecord({"w": Array(weights), "n": Array(np.array(10, dtype=np.int64)),
                        **{k: Array(v) for k, v in extra.items()}})


def reply(content: RecordDict | None = None, node_id: int = 1, error: bool = False) -> Message:
    """A training reply, mocked as Flower's own strategy tests do."""
    msg = Mock(spec=Message)
    msg.content = content
    msg.has_error.return_value = error
    msg.has_content.return_value = not error
    msg.metadata = Mock(src_node_id=node_id)
    return msg


def good(w: float, num_examples: int = 1, node_id: int = 1) -> Message:
    return reply(RecordDict({"arrays": arrays(w),
                             "metrics": MetricRecord({"num-examples": num_examples})}), node_id)


def _record(arrays_record: ArrayRecord) -> RecordDict:
    return RecordDict({"arrays": arrays_record, "metrics": MetricRecord({"num-examples": 1})})


def _drop(key: str) -> ArrayRecord:
    record = arrays(5.0)
    del record[key]
    return record


# Every broken reply the server must survive, each sent beside one good reply.
FAULTS: dict[str, Callable[[], Message]] = {
    "nan-weights": lambda: reply(_record(arrays([[1.0, math.nan], [1.0, 1.0]]))),
    "inf-weights": lambda: reply(_record(arrays(math.inf))),
    "minus-inf-weights": lambda: reply(_record(arrays([[-math.inf, 1.0], [1.0, 1.0]]))),
    "wrong-shape": lambda: reply(_record(ArrayRecord({
        "w": Array(np.ones((3, 2), dtype=np.float32)),
        "n": Array(np.array(10, dtype=np.int64))}))),
    "scalar-for-matrix": lambda: reply(_record(ArrayRecord({
        "w": Array(np.array(1.0, dtype=np.float32)),
        "n": Array(np.array(10, dtype=np.int64))}))),
    "missing-key": lambda: reply(_record(_drop("n"))),
    "unexpected-key": lambda: reply(_record(arrays(5.0, extra=np.ones(3, dtype=np.float32)))),
    "no-arrays-record": lambda: reply(RecordDict({
        "metrics": MetricRecord({"num-examples": 1})})),
    "arrays-under-other-name": lambda: reply(RecordDict({
        "weights": arrays(5.0), "metrics": MetricRecord({"num-examples": 1})})),
    "no-num-examples": lambda: reply(RecordDict({
        "arrays": arrays(5.0), "metrics": MetricRecord({"train-loss": 0.1})})),
    "no-metrics-record": lambda: reply(RecordDict({"arrays": arrays(5.0)})),
    "error-reply": lambda: reply(None, error=True),
}


@pytest.fixture
def in_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let strategies build instruction messages outside a Flower run."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)


def fmfl(min_replies: int = 1) -> FMFLStrategy:
    return FMFLStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=1,
                               min_train_nodes=1), min_replies=min_replies)


def sent(strategy: FMFLStrategy) -> FMFLStrategy:
    """The strategy after it sent GLOBAL out for round 1 (what replies are checked against)."""
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2]
    list(strategy.configure_train(1, global_record(), ConfigRecord(), grid))
    return strategy


def weights_of(record: ArrayRecord | None) -> np.ndarray:
    assert record is not None
    return record["w"].numpy()


@pytest.mark.usefixtures("in_a_run")
class TestBrokenReplies:
    def test_good_replies_are_averaged_by_num_examples(self) -> None:
        strategy = sent(fmfl())
        # (1 * 1 + 3 * 3) / 4 = 2.5
        new, _ = strategy.aggregate_train(1, [good(1.0, 1), good(3.0, 3, node_id=2)])
        np.testing.assert_allclose(weights_of(new), 2.5)
        assert strategy.round_info[1]["rejected-replies"] == 0

    @pytest.mark.parametrize("fault", sorted(FAULTS))
    def test_is_rejected_counted_and_never_aggregated(self, fault: str) -> None:
        strategy = sent(fmfl())
        broken = FAULTS[fault]()
        broken.metadata.src_node_id = 2

        new, _ = strategy.aggregate_train(1, [good(1.0), broken])

        np.testing.assert_array_equal(weights_of(new), 1.0)  # the good reply alone
        assert strategy.round_info[1]["replies"] == 1
        assert strategy.round_info[1]["rejected-replies"] == 1

    def test_only_broken_replies_keep_the_global_model(self) -> None:
        strategy = sent(fmfl())
        broken = [FAULTS[name]() for name in sorted(FAULTS)]
        assert strategy.aggregate_train(1, broken) == (None, None)
        assert strategy.round_info[1]["rejected-replies"] == len(FAULTS)

    def test_fewer_valid_replies_than_min_replies_keep_the_global_model(self) -> None:
        strategy = sent(fmfl(min_replies=2))
        assert strategy.aggregate_train(1, [good(1.0), FAULTS["nan-weights"]()]) == (None, None)
        assert strategy.round_info[1] == pytest.approx(
            {"replies": 1, "rejected-replies": 1, "bounds-reset-replies": 0,
             "missing-replies": 0, "aggregation-time": 0, "fusion-time": 0, "defense-time": 0})

    def test_no_reply_at_all_keeps_the_global_model(self) -> None:
        # Every client timed out: the grid hands back nothing.
        strategy = sent(fmfl())
        assert strategy.aggregate_train(1, []) == (None, None)
        assert strategy.round_info[1]["missing-replies"] == 2


@pytest.mark.usefixtures("in_a_run")
class TestServedBounds:
    """The activation bounds are the server's: a reply that raises its own (a client
    unbounding its backdoor) is aggregated, and seen by fusion, with the served ones."""

    BOUND = "relu.act_bound"
    SERVED = np.array([0.1, 0.7], dtype=np.float32)

    def _reply(self, w: float, bound: np.ndarray, num_examples: int, node_id: int) -> Message:
        record = arrays(w, **{self.BOUND: bound})
        return reply(RecordDict({"arrays": record,
                                 "metrics": MetricRecord({"num-examples": num_examples})}),
                     node_id)

    def test_a_reply_cannot_change_the_served_bounds(self) -> None:
        seen: list[dict] = []

        def fusion(server_round, state, clients, weights):
            seen.extend([state, *clients])
            return state

        strategy = FMFLStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=1,
                                       min_train_nodes=1), fusion=fusion)
        grid = Mock()
        grid.get_node_ids.return_value = [1, 2]
        served = ArrayRecord({**global_record(), self.BOUND: Array(self.SERVED)})
        list(strategy.configure_train(1, served, ConfigRecord(), grid))
        raised = np.full(2, 1e30, dtype=np.float32)

        # Weights 1/3 and 2/3: FedAvg's mean of two equal bounds is 7e-9 off the served 0.1.
        new, _ = strategy.aggregate_train(1, [self._reply(1.0, self.SERVED, 1, 1),
                                              self._reply(3.0, raised, 2, 2)])

        np.testing.assert_allclose(weights_of(new), 7 / 3)  # the weights still count
        np.testing.assert_array_equal(new[self.BOUND].numpy(), self.SERVED)  # bit for bit
        for state in seen:  # the aggregate and both client models fusion reads
            np.testing.assert_array_equal(state[self.BOUND].numpy(), self.SERVED)
        assert strategy.round_info[1]["bounds-reset-replies"] == 1


@pytest.mark.usefixtures("in_a_run")
def test_each_server_step_is_logged_as_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fusion and the bounds take minutes a round on CIFAR-10: the log shows which is running.
    lines: list[str] = []
    monkeypatch.setattr(strategies.fmfl, "log", lambda level, text, *a: lines.append(text % a))

    def step(server_round, state, clients, weights):
        return state

    strategy = sent(FMFLStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=1,
                                        min_train_nodes=1),
                                 fusion=step, post_fusion=[("activation-bounds", step)]))
    strategy.aggregate_train(1, [good(1.0), good(3.0, node_id=2)])
    assert [line.split(" (")[0] for line in lines] == [
        "fmfl: round 1: aggregated 2 replies", "fmfl: round 1: fusion",
        "fmfl: round 1: activation-bounds"]


class FlakyGrid:
    """A Grid whose nodes answer train messages with `answer(round, node_id)`.

    `None` stands for a node that crashed or timed out: the real Grid then returns no reply
    for it when `timeout` runs out.
    """

    def __init__(self, answer: Callable[[int, int], Message | None], nodes: int = 3) -> None:
        self.answer = answer
        self.node_ids = list(range(1, nodes + 1))
        self.round = 0

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        self.round += 1
        replies = [self.answer(self.round, m.metadata.dst_node_id) for m in messages]
        return [r for r in replies if r is not None]


def run_rounds(strategy: FMFLStrategy, grid: FlakyGrid, rounds: int) -> list[float]:
    """Flower's own round loop; the global model's mean weight after each round."""
    seen: list[float] = []

    def evaluate(server_round: int, record: ArrayRecord) -> MetricRecord:
        seen.append(float(record["w"].numpy().mean()))
        return MetricRecord({"w": seen[-1]})

    strategy.start(grid=grid, initial_arrays=global_record(), num_rounds=rounds,
                   timeout=1.0, evaluate_fn=evaluate)
    return seen


@pytest.mark.usefixtures("in_a_run")
class TestMissingReplies:
    def test_crashed_or_timed_out_clients_are_tolerated(self) -> None:
        # Node 3 never answers, node 2 sends NaN: rounds go on with node 1 alone.
        def answer(server_round: int, node_id: int) -> Message | None:
            if node_id == 3:
                return None
            if node_id == 2:
                return FAULTS["nan-weights"]()
            return good(float(server_round), node_id=node_id)

        strategy = fmfl()
        assert run_rounds(strategy, FlakyGrid(answer), rounds=2) == [0.0, 1.0, 2.0]
        assert [strategy.round_info[r]["replies"] for r in (1, 2)] == [1, 1]
        assert [strategy.round_info[r]["rejected-replies"] for r in (1, 2)] == [1, 1]

    def test_below_min_replies_the_global_model_is_kept_until_enough_answer(self) -> None:
        # Round 1: only one of three answers (< min-replies 2); round 2: all three do.
        def answer(server_round: int, node_id: int) -> Message | None:
            if server_round == 1 and node_id != 1:
                return None
            return good(float(node_id), node_id=node_id)

        seen = run_rounds(fmfl(min_replies=2), FlakyGrid(answer), rounds=2)
        assert seen == [0.0, 0.0, 2.0]  # kept, then (1 + 2 + 3) / 3


# Replies that used to pass strategies/fmfl.py's checks and then crashed Flower's rules
# (ZeroDivisionError, InconsistentMessageReplies) or poisoned the weighted mean (NaN).


@pytest.mark.usefixtures("in_a_run")
class TestValidationGaps:
    @pytest.mark.parametrize("num_examples", [math.nan, math.inf, -1.0])
    def test_non_finite_or_negative_num_examples_never_reach_the_average(
            self, num_examples: float) -> None:
        strategy = sent(fmfl())
        broken = reply(RecordDict({"arrays": arrays(9.0),
                                   "metrics": MetricRecord({"num-examples": num_examples})}))
        new, _ = strategy.aggregate_train(1, [good(1.0, 2, node_id=2), broken])
        np.testing.assert_array_equal(weights_of(new), 1.0)
        assert strategy.round_info[1]["rejected-replies"] == 1

    def test_zero_total_num_examples_does_not_crash(self) -> None:
        strategy = sent(fmfl())
        assert strategy.aggregate_train(1, [good(1.0, 0)]) == (None, None)

    @pytest.mark.parametrize("content", ["extra-metric", "second-metric-record",
                                         "second-array-record"])
    def test_an_odd_but_valid_model_does_not_crash_the_round(self, content: str) -> None:
        records = {"arrays": arrays(3.0), "metrics": MetricRecord({"num-examples": 1})}
        if content == "extra-metric":
            records["metrics"] = MetricRecord({"num-examples": 1, "surprise": 1.0})
        elif content == "second-metric-record":
            records["more"] = MetricRecord({"num-examples": 1})
        else:
            records["spare"] = arrays(4.0)
        strategy = sent(fmfl())
        new, _ = strategy.aggregate_train(1, [good(1.0, node_id=2), reply(RecordDict(records))])
        assert weights_of(new).mean() in (1.0, 2.0)  # rejected, or aggregated on its arrays

    def test_an_evaluate_reply_without_num_examples_does_not_crash(self) -> None:
        strategy = fmfl()
        ok = reply(RecordDict({"metrics": MetricRecord({"num-examples": 5, "local-acc": 0.8})}))
        odd = reply(RecordDict({"metrics": MetricRecord({"local-acc": 0.1})}), node_id=2)
        metrics = strategy.aggregate_evaluate(1, [ok, odd])
        assert metrics is not None and metrics["local-acc"] == pytest.approx(0.8)


# A real ClientApp that crashes: the project's ClientApp wrapped by an app whose train
# raises for one partition, run by Flower's simulation engine through `flwr run`.
CRASHING_CLIENT = '''\
"""The project's ClientApp, except that partition {partition} crashes in every round."""

import client_app
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    if int(context.node_config["partition-id"]) == {partition}:
        raise RuntimeError("injected ClientApp crash")
    return client_app.train(msg, context)


# Everything else (evaluate, query, ...) is the project's own function, unchanged.
for action in ("evaluate", "query"):
    if hasattr(client_app, action):
        getattr(app, action)()(getattr(client_app, action))
'''


def crashing_app(folder: Path, partition: int) -> Path:
    """An app folder: the project's pyproject with the crashing ClientApp as component."""
    folder.mkdir(parents=True)
    pyproject = (APP_DIR / "pyproject.toml").read_text()
    assert 'clientapp = "client_app:app"' in pyproject
    (folder / "pyproject.toml").write_text(
        pyproject.replace('clientapp = "client_app:app"', 'clientapp = "crashing_client:app"'))
    (folder / "crashing_client.py").write_text(CRASHING_CLIENT.format(partition=partition))
    return folder


@pytest.mark.slow
def test_a_crashing_client_app_is_tolerated_in_a_simulation(tmp_path: Path) -> None:
    app_dir = crashing_app(tmp_path / "app", partition=1)
    config = {"num-server-rounds": 2, "batch-size": 64, "data-fraction": 0.2,
              "fraction-evaluate": 0.0, "min-replies": 2, "output-dir": str(tmp_path / "out"),
              **PLAIN_FEDAVG, "run-name": "crash"}
    code = run_simulation(config, num_supernodes=3, app_dir=app_dir,
                          flwr_home=tmp_path / "home", log_path=tmp_path / "log")
    log = (tmp_path / "log").read_text()
    assert code == 0, log[-3000:]
    assert "injected ClientApp crash" in log
    with (tmp_path / "out" / "crash" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    for row in rows[1:]:  # 3 sampled, 1 crashed: 2 valid replies, enough for min-replies
        assert float(row["replies"]) == 2 and float(row["rejected-replies"]) == 1
    assert float(rows[-1]["acc"]) > 0.6  # two rounds on a fifth of two clients' data
