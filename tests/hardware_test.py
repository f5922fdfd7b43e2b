"""The nominal peaks the trainer's MFU is logged against."""

import pytest

from jaxlm import hardware


@pytest.mark.parametrize(
    "kind, preset",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h100"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("TPU v4", "v4"),
        ("TPU v5 lite", "v5e"),
        ("TPU v5e", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("cpu", "cpu"),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_device_kinds_map_to_presets(kind, preset):
    assert hardware.preset_for(kind) == preset


def test_peak_follows_the_dtype_and_a_configured_value_wins():
    assert hardware.peak_flops(0.0, "NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert hardware.peak_flops(0.0, "NVIDIA H100 80GB HBM3", "float32") == 494.5e12
    assert hardware.peak_flops(0.0, "TPU v5 lite", "float32") == 197e12
    assert hardware.peak_flops(0.0, "cpu", "bfloat16") > hardware.peak_flops(0.0, "cpu", "float32")
    assert hardware.peak_flops(3e11, "NVIDIA H100 80GB HBM3", "bfloat16") == 3e11
    assert hardware.peak_flops(0.0, "NVIDIA GeForce RTX 4090", "bfloat16") is None


def test_every_preset_has_every_compute_dtype():
    from jaxlm.config_lib import CHOICES

    for preset, peaks in hardware.PEAKS.items():
        assert set(peaks) == set(CHOICES["model.dtype"]), preset
        assert all(v > 0 for v in peaks.values())
