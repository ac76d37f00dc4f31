import pytest
import yaml

from preftune import config
from preftune.cli import main


def test_yaml_round_trip(tmp_path):
    cfg = config.load("configs/tiny.yaml", ["loss.beta=0.2", "train.max_steps=20"])
    path = tmp_path / "c.yaml"
    config.save(cfg, path)
    assert config.load(path) == cfg


def test_overrides_are_typed_by_annotation():
    cfg = config.load("configs/tiny.yaml", ["loss.beta=0.2", "train.max_steps=20", "train.progress=false",
                                            "model.arch.hidden_size=64", "loss.params={label_smoothing: 0.1}",
                                            "optim.lr=5e-7"])
    assert cfg.loss.beta == 0.2 and isinstance(cfg.loss.beta, float)
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.progress is False
    assert cfg.model.arch["hidden_size"] == 64
    assert cfg.loss.params == {"label_smoothing": 0.1}
    assert cfg.optim.lr == 5e-7
    assert cfg.train.run_name == "tiny"  # from the file's stem


def test_config_is_frozen():
    cfg = config.load("configs/tiny.yaml")
    with pytest.raises(AttributeError):
        cfg.loss.beta = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("override, message", [
    ("loss.bta=0.2", "unknown config key 'loss.bta'"),
    ("trian.max_steps=3", "unknown config key 'trian'"),
    ("train.max_steps=many", "train.max_steps: expected an int, got 'many'"),
    ("loss.beta=high", "loss.beta: expected a float, got 'high'"),
    ("train.progress=maybe", "train.progress: expected a bool"),
    ("loss.name=dpoo", "loss.name: unknown loss 'dpoo'; choose from"),
    ("optim.schedule=step", "optim.schedule: 'step' is not one of"),
    ("loss.params={tau: 1}", "loss.params.tau: 'dpo' takes no such hyperparameter"),
    ("loss.beta", "not of the form key=value"),
    ("loss=3", "'loss' is a section"),
])
def test_bad_overrides_name_key_value_and_expectation(override, message):
    from preftune.train import check  # the loss registry's checks run where config meets it

    with pytest.raises(config.ConfigError, match=None) as err:
        check(config.load("configs/tiny.yaml", [override]))
    assert message in str(err.value)


def test_bad_key_in_yaml_names_file_and_choices(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"loss": {"name": "dpo", "betta": 0.1}}))
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value) and "'loss.betta'" in str(err.value) and "beta" in str(err.value)


def test_cli_reports_bad_key_without_traceback(capsys):
    assert main(["train", "configs/tiny.yaml", "loss.bta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "preftune: error:" in err and "unknown config key 'loss.bta'" in err and "Traceback" not in err


def test_yaml_cannot_execute_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(path)


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("model.arch", "data.max_prompt_length", "loss.beta", "optim.warmup_steps", "train.grad_accum"):
        assert key in out
    assert "KL strength" in out  # the docstring beside loss.beta
