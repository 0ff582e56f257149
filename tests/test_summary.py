from fmfl_flwr.summary import format_table, summarise


def test_summary_sums_phases_and_takes_the_last_round():
    rows = [{"round": 0, "acc": 0.1, "asr": 0.0, "round-time": 5.0, "pretrain-time": 2.0},
            {"round": 1, "acc": 0.8, "asr": 0.5, "round-time": 10.0, "fusion-time": 3.0,
             "client-train-time": 4.0, "rejected-replies": 1.0},
            {"round": 2, "acc": 0.9, "asr": 0.25, "round-time": 12.0, "fusion-time": 4.0,
             "client-train-time": 5.0}]
    summary = summarise(rows)
    assert (summary["rounds"], summary["acc"], summary["asr"]) == (2, 0.9, 0.25)
    assert summary["phases_s"]["fusion_s"] == 7.0 and summary["phases_s"]["pretraining_s"] == 2
    assert summary["rounds_s"] == 22.0 and summary["rejected_replies"] == 1


def test_table_shows_shares_as_percent_and_seconds_as_seconds():
    table = format_table([{"acc": 0.8809, "wall_time_s": 382.33}], ["acc", "wall_time_s"])
    assert table.splitlines()[-1] == "| 88.09 | 382.3 |"
