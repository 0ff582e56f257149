import pytest

from fmfl_flwr.config import PLAIN_FEDAVG, ConfigError, ExperimentConfig, parse_int_list


def test_defaults_match_pyproject_run_config():
    import tomllib

    from conftest import REPO

    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]
    from strategies import aggregation_params

    rule_keys = aggregation_params()
    assert sorted(app_config) == sorted([*ExperimentConfig.keys(), *rule_keys])
    assert {k: app_config[k] for k in rule_keys} == rule_keys
    parsed = ExperimentConfig.from_run_config(app_config, tuple(rule_keys))
    assert parsed.to_run_config() == {k: v for k, v in app_config.items() if k not in rule_keys}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("dataset", "imagenet",
         "dataset='imagenet' is not known; accepted: fashion-mnist, cifar10"),
        ("partition", "foo", "partition='foo' is not known; accepted: iid, dirichlet"),
        ("dirichlet-alpha", -0.5, "dirichlet-alpha=-0.5 must be > 0.0"),
        ("model", "vgg", "model='vgg' is not known"),
        ("fusion", "maybe", "fusion='maybe': expected true or false"),
        ("num-server-rounds", 2.5, "num-server-rounds=2.5: expected an integer"),
        ("client-attack", "trojan", "client-attack='trojan' is not known"),
        ("attack-rounds", "a-b", "attack-rounds='a-b'"),
        ("pretrain-lr-schedule", "step",
         "pretrain-lr-schedule='step' is not known; accepted: constant, cosine"),
        ("syn-label-cap", "yes",
         "syn-label-cap='yes' is not known; accepted: off, pretrain, all"),
        ("bounds-overrule-target", "fused",
         "bounds-overrule-target='fused' is not known; accepted: ensemble, ensemble-centred"),
        ("bounds-overrule-flip-count", "onto-fused",
         "bounds-overrule-flip-count='onto-fused' is not known; accepted: onto-target, off-fused"),
    ],
)
def test_bad_values_name_key_value_and_choices(key, value, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ExperimentConfig.from_run_config({key: value})


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown run-config keys \\['learning-rate'\\]"):
        ExperimentConfig.from_run_config({"learning-rate": 0.1})


def test_numbers_are_coerced():
    config = ExperimentConfig.from_run_config({"lr": 1, "num-server-rounds": 3.0,
                                               "fusion": "true"})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.num_server_rounds == 3 and config.fusion is True


def test_fm_attack_needs_fusion():
    with pytest.raises(ConfigError, match="needs fusion=true"):
        ExperimentConfig.from_run_config({"fusion": False})  # the default FM attack is on


@pytest.mark.parametrize("setting", [{"defense": "none"}, {"defense": "mm-bm"},
                                     {"fusion": False, "fm-attack": "none"}])
def test_relabelling_the_named_target_needs_fusion_and_the_gated_defense(setting):
    with pytest.raises(ConfigError, match="distill-relabel-target=true needs fusion=true and "
                                          "defense='activation-bounds'"):
        ExperimentConfig.from_run_config({"distill-relabel-target": True, **setting})


@pytest.mark.parametrize(("setting", "unlearns"), [
    ({}, True), ({"defense": "none"}, False), ({"defense": "mm-bm"}, False),
    ({"distill-unlearn-poison": False}, False)])
def test_unlearning_the_named_target_acts_only_with_the_gated_defense(setting, unlearns):
    """On by default; a baseline's run keeps plain fusion instead of being refused."""
    from fmfl_flwr.app_config import fusion_settings

    config = ExperimentConfig.from_run_config(setting)
    assert fusion_settings(config).unlearn_poison is unlearns


def test_int_lists():
    assert parse_int_list("k", "1, 3-5,8") == [1, 3, 4, 5, 8]
    assert parse_int_list("k", "") == []


def test_bounds_defaults_are_the_defense_library_defaults():
    from fmfl_flwr.app_config import bound_settings
    from fmfl_flwr.defense import BoundSettings

    assert bound_settings(ExperimentConfig()) == BoundSettings()
    chosen = bound_settings(ExperimentConfig(bounds_overrule_source_max=3.0,
                                             bounds_overrule_lift_max=2.0,
                                             bounds_overrule_confidence_min=0.7,
                                             bounds_overrule_gate_rounds=3,
                                             bounds_overrule_cap_halvings=2,
                                             bounds_overrule_flip_min=0.2,
                                             bounds_overrule_flip_lift_min=2.5,
                                             bounds_overrule_target="ensemble-centred",
                                             bounds_overrule_flip_count="off-fused"))
    assert (chosen.overrule_source_max, chosen.overrule_lift_max, chosen.overrule_confidence_min,
            chosen.overrule_gate_rounds, chosen.overrule_cap_halvings,
            chosen.overrule_flip_min, chosen.overrule_flip_lift_min,
            chosen.overrule_target, chosen.overrule_flip_count) == (
                3.0, 2.0, 0.7, 3, 2, 0.2, 2.5, "ensemble-centred", "off-fused")


def test_empty_fm_means_the_fm_dir_for_the_dataset(monkeypatch, tmp_path):
    from fmfl_flwr.app_config import with_default_fm

    monkeypatch.setenv("FMFL_FM_DIR", str(tmp_path))
    assert with_default_fm(ExperimentConfig()).fm == str(tmp_path / "fashion-mnist")
    assert with_default_fm(ExperimentConfig(fm="/my/fm")).fm == "/my/fm"


def test_default_experiment_is_the_mission_case():
    config = ExperimentConfig()
    assert config.fusion and config.fm_attack == "poisoned-pipeline"
    assert config.defense == "activation-bounds"


@pytest.mark.parametrize(("argv", "nodes", "fraction"), [
    ([], 10, 1.0),
    (["--preset", "cross-device"], 100, 0.1),
    (["--preset", "cross-device", "--num-supernodes", "50",
      "--run-config", "fraction-train=0.2"], 50, 0.2),
])
def test_run_presets_size_the_simulation(argv, nodes, fraction, tmp_path, monkeypatch):
    from fmfl_flwr import cli

    calls = []
    monkeypatch.setattr(cli, "run_simulation", lambda config, num_supernodes, **_: calls.append(
        (config, num_supernodes)) or 1)
    monkeypatch.setenv("FMFL_OUTPUT_DIR", str(tmp_path))
    assert cli.main(["run", *argv]) == 1  # the stand-in run "fails": no summary
    config, num_supernodes = calls[0]
    assert num_supernodes == nodes and config["fraction-train"] == fraction


def test_plain_fedavg_turns_the_mission_case_off():
    config = ExperimentConfig.from_run_config(PLAIN_FEDAVG)
    assert not config.fusion and config.fm_attack == "none" and config.defense == "none"


def test_unlearning_toward_the_teacher_needs_unlearning():
    from fmfl_flwr.app_config import fusion_settings

    with pytest.raises(ConfigError, match="distill-unlearn-teacher=true .* needs "
                                          "distill-unlearn-poison=true"):
        ExperimentConfig.from_run_config({"distill-unlearn-teacher": True,
                                          "distill-unlearn-poison": False})
    config = ExperimentConfig.from_run_config({"distill-unlearn-teacher": True})
    assert fusion_settings(config).unlearn_to_teacher


def test_restoring_the_target_caps_the_split_at_the_bounds_overrule_cap():
    from fmfl_flwr.app_config import fusion_settings

    shipped = fusion_settings(ExperimentConfig.from_run_config({"bounds-overrule-cap": 0.15}))
    assert shipped.unlearn_restore_target and shipped.unlearn_cap == 0.15
    assert shipped.requested_per_class == 1000  # syn-per-class
    plain = fusion_settings(ExperimentConfig.from_run_config(
        {"bounds-overrule-cap": 0.15, "distill-unlearn-restore-target": False}))
    assert not plain.unlearn_restore_target and plain.unlearn_cap == 1.0


def test_lifting_the_bounds_needs_a_client_attack():
    with pytest.raises(ConfigError, match="attack-lift-bounds=true needs a client-attack"):
        ExperimentConfig.from_run_config({"attack-lift-bounds": True})
    config = ExperimentConfig.from_run_config({"attack-lift-bounds": True,
                                               "client-attack": "badnets"})
    assert config.attack_lift_bounds


def test_a_key_added_later_is_filled_as_the_older_version_ran():
    from fmfl_flwr.config import BEFORE_THE_KEY, complete_run_config

    defaults = ExperimentConfig().to_run_config()
    old = complete_run_config({"seed": 3, "bounds-epochs": 20}, defaults)
    assert old["seed"] == 3 and old["attack-lift-bounds"] is False  # kept the old behaviour
    assert old["distill-unlearn-poison"] is False and old["bounds-overrule-gate"] == 0.0
    assert old["distill-bounds"] is True and old["bounds-trim"] is None
    assert old["bounds-warm-epochs"] == 20  # a warm fit ran every epoch
    recorded = {**defaults, "distill-unlearn-poison": True}
    assert complete_run_config(recorded, defaults) == recorded
    assert set(BEFORE_THE_KEY) <= set(defaults)
    # each value other than None is one the key accepts, and not its default now
    ExperimentConfig.from_run_config({k: v for k, v in old.items() if v is not None})
    assert all(defaults[k] != v for k, v in BEFORE_THE_KEY.items())
