"""config.gan: defaults, validation messages, configs/seqgan.py variants."""

import os

import pytest

from jaxlm import config_lib
from jaxlm.common_types import ConfigError
from jaxlm.steps import gan as gan_steps

SEQGAN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "seqgan.py")


def test_default_mode_is_none_and_the_lm_config_is_untouched():
    cfg = config_lib.validate(config_lib.base_config())
    assert cfg.gan.mode == "none" and cfg.gan.num_rollouts == 16 and cfg.gan.rollout_update_rate == 0.8


def test_loss_choices_match_the_step_registry():
    assert set(config_lib.CHOICES["gan.loss"]) == set(gan_steps.LOSSES)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"data.source": "oracle"}, "set config.gan.mode=seqgan or gumbel"),
        ({"gan.mode": "seqgan"}, "nothing to train"),
        ({"gan.mode": "wgan"}, "config.gan.mode='wgan' is not one of"),
        (
            {"gan.mode": "seqgan", "gan.adv_rounds": "1", "gan.num_rollouts": "0"},
            "config.gan.num_rollouts=0 must be > 0",
        ),
        (
            {"gan.mode": "gumbel", "gan.adv_rounds": "1", "gan.pretrain_g_steps": "2", "gan.pretrain_g_epochs": "1"},
            "set one of them",
        ),
        ({"gan.mode": "seqgan", "gan.adv_rounds": "1", "gan.rollout_update_rate": "1.5"}, "rollout_update_rate"),
        ({"gan.mode": "gumbel", "gan.adv_rounds": "1", "gan.max_temperature": "0.5"}, "must be >= 1"),
        ({"gan.mode": "seqgan", "gan.adv_rounds": "1", "gan.d_filter_sizes": "(1, 2)"}, "same length"),
        ({"gan.mode": "seqgan", "gan.adv_rounds": "1", "data.source": "tfds", "data.name": "x"}, "'oracle', 'builtin'"),
        ({"gan.mode": "seqgan", "gan.adv_rounds": "1", "gan.loss": "bce"}, "config.gan.loss='bce' is not one of"),
    ],
)
def test_bad_gan_values_are_rejected_with_the_field_named(overrides, fragment):
    c = config_lib.base_config()
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
        config_lib.apply_overrides(c, overrides)
        config_lib.validate(c)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "data=oracle,mode=gumbel",
        "data=builtin",
        "mode=seqgan,generator=transformer,discriminator=transformer,loss=wgan_gp",
        "mode=gumbel,discriminator=lstm,loss=hinge,size=tiny",
    ],
)
def test_seqgan_config_variants_validate(arg):
    cfg = config_lib.validate(config_lib.load_config_file(f"{SEQGAN}:{arg}"))
    assert cfg.gan.mode in ("seqgan", "gumbel")


def test_seqgan_config_rejects_unknown_arguments():
    with pytest.raises(ConfigError, match="unknown argument 'sizes'"):
        config_lib.load_config_file(f"{SEQGAN}:sizes=tiny")
    with pytest.raises(ConfigError, match="mode='rl' is not one of"):
        config_lib.load_config_file(f"{SEQGAN}:mode=rl")
