import dataclasses

import pytest

from jaxlm import config_lib, models, optim
from jaxlm.common_types import ConfigError
from jaxlm.data import tokenizers
from jaxlm.nn import attention, linears, normalization


def test_base_config_validates_and_every_key_has_one_default():
    cfg = config_lib.validate(config_lib.base_config())
    assert cfg.model.kind == "decoder_only"
    flat = config_lib.flatten(dataclasses.asdict(cfg))
    assert "optim.lr" in flat and "mesh.shape.data" in flat and "sharding.rules.embed" in flat


def test_overrides_parse_types():
    c = config_lib.base_config()
    config_lib.apply_overrides(
        c,
        {"model.num_layers": "6", "optim.lr": "3e-4", "model.tie_embeddings": "false", "data.files": "~/x/*.txt"},
    )
    cfg = config_lib.validate(c)
    assert cfg.model.num_layers == 6 and cfg.optim.lr == 3e-4
    assert cfg.model.tie_embeddings is False and cfg.data.files == "~/x/*.txt"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"model.num_layer": "4"}, "unknown key 'num_layer'"),
        ({"modell.num_layers": "4"}, "unknown key 'modell'"),
        ({"model.num_layers": "four"}, "expected an integer"),
        ({"model.num_heads": "3"}, "must divide config.model.embed_dim"),
        ({"model.num_kv_heads": "3"}, "num_kv_heads=3 must divide"),
        ({"model.position": "rotary-ish"}, "is not one of"),
        ({"data.seq_len": "1024"}, "exceeds config.model.max_len"),
        ({"optim.lr": "-1"}, "config.optim.lr=-1.0 must be > 0"),
        ({"model.tie_embeddings": "maybe"}, "expected true or false"),
        ({"mesh.shape.data": "0"}, "config.mesh.shape sizes must be >= 1"),
        ({"sharding.rules.embed": "model"}, "'model' is not a mesh axis"),
        ({"optim.grad_accum_steps": "3"}, "grad_accum_steps=3 must divide"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(overrides, fragment):
    c = config_lib.base_config()
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")) as info:
        config_lib.apply_overrides(c, overrides)
        config_lib.validate(c)
    assert "\n" not in str(info.value)


def test_config_file_cannot_add_unknown_keys(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from jaxlm import config_lib\n"
        "def get_config(arg):\n"
        "    c = config_lib.base_config()\n"
        "    c.model.num_layerz = 3\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError, match="num_layerz"):
        config_lib.load_config_file(str(path))


def test_json_round_trip():
    cfg = config_lib.validate(config_lib.base_config())
    again = config_lib.validate(config_lib.from_json(config_lib.to_json(cfg)))
    assert again == cfg


def test_overrides_from_argv():
    overrides, rest = config_lib.overrides_from_argv(["train", "--config.a.b=1", "--config.c", "x", "--workdir", "w"])
    assert overrides == {"a.b": "1", "c": "x"} and rest == ["train", "--workdir", "w"]


def test_choices_agree_with_dispatch_dicts():
    # Names validated in config_lib must be exactly what the layers above dispatch on.
    c = config_lib.CHOICES
    assert set(c["model.kind"]) == set(models.MODELS)
    assert set(c["model.attention"]) <= set(attention.IMPLEMENTATIONS)
    assert set(c["model.norm"]) == set(normalization.NORMS)
    assert set(c["model.activation"]) <= set(linears.ACTIVATIONS)
    assert set(c["data.tokenizer"]) <= set(tokenizers.TOKENIZERS)
    assert set(c["optim.schedule"]) == set(optim.DECAYS)
