"""Config tree: shipped YAMLs load, overrides apply with YAML typing, bad keys/values name the key."""

from pathlib import Path

import pytest

from pyvision_rl.config import Config, ConfigError, dump_config, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip_through_yaml(path, tmp_path):
    cfg = load_config(path)
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_shipped_set_includes_the_three_recipes():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "pyvision_image_7b.yaml", "pyvision_video_7b.yaml"} <= names


def test_overrides_typed_and_nested():
    cfg = load_config(
        "configs/tiny_cpu.yaml",
        [
            "trainer.total_steps=3",
            "rollout.feed_errors=true",
            "learner.lr=1e-5",
            "run.name=x",
            "reward.filters.allowed_end_reasons=[DONE]",
        ],
    )
    assert cfg.trainer.total_steps == 3
    assert cfg.rollout.feed_errors is True
    assert cfg.learner.lr == pytest.approx(1e-5)
    assert cfg.run.name == "x"
    assert cfg.reward.filters.allowed_end_reasons == ["DONE"]
    # Untouched values keep the file's setting.
    assert cfg.rollout.prompt_template == "tiny_tool"


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.totl_steps'.*'trainer.total_steps'"):
        load_config("configs/tiny_cpu.yaml", ["trainer.totl_steps=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*rollout.temprature.*rollout.temperature"):
        load_config(bad)


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match=r"'sandbox.backend'"):
        load_config(None, ["sandbox.backend=podman"])
    with pytest.raises(ConfigError, match=r"'trainer.total_steps'"):
        load_config(None, ["trainer.total_steps=many"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["trainer.total_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(notmap)


def test_every_key_documented():
    def walk(model):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from walk(ann)
            else:
                yield name, f.description

    undocumented = [n for n, d in walk(Config) if not d]
    assert undocumented == []


def test_dump_roundtrip(tmp_path):
    cfg = load_config("configs/tiny_cpu.yaml", ["trainer.total_steps=7"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
