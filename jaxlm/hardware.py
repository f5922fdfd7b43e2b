"""What jaxlm needs to know about the device: nominal matmul peaks (for MFU) and CPU-tuned switches.

``config.train.peak_flops = 0`` (the default) takes the peak from this table by the device's
``device_kind`` and ``config.model.dtype``; a positive value overrides it. The accelerator
figures are the vendors' dense (no sparsity) numbers; float32 on GPUs is the TF32 tensor-core
figure because XLA's default matmul precision uses TF32 there, and on TPUs float32 runs on the
bf16 MXU passes (default precision), so it gets the bf16 figure. The CPU figures are what
``bench/peak.py`` measured on the 2-core AVX-512 (Zen 5) machine this project is benchmarked on:
a different CPU should set ``config.train.peak_flops`` from its own ``bench/peak.py``.
"""

from __future__ import annotations

import jax

# Preset -> {compute dtype: FLOP/s per device}.
PEAKS: dict[str, dict[str, float]] = {
    "cpu": {"float32": 4.9e11, "bfloat16": 9.5e11, "float16": 4.9e11},  # measured 491.7 / 957.0 GFLOP/s
    "a100": {"float32": 156e12, "bfloat16": 312e12, "float16": 312e12},  # A100 SXM, TF32 / bf16
    "h100": {"float32": 494.5e12, "bfloat16": 989e12, "float16": 989e12},  # H100 / H200 SXM, TF32 / bf16
    "v4": {"float32": 275e12, "bfloat16": 275e12, "float16": 275e12},  # TPU v4
    "v5e": {"float32": 197e12, "bfloat16": 197e12, "float16": 197e12},  # TPU v5e ("TPU v5 lite")
    "v5p": {"float32": 459e12, "bfloat16": 459e12, "float16": 459e12},  # TPU v5p ("TPU v5")
    "v6e": {"float32": 918e12, "bfloat16": 918e12, "float16": 918e12},  # TPU v6e ("TPU v6 lite")
}

# Lower-cased ``jax.Device.device_kind`` substrings -> preset, the first match wins (so the
# "lite" parts come before the names they contain).
DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    ("h100", "h100"),
    ("h200", "h100"),
    ("a100", "a100"),
    ("tpu v4", "v4"),
    ("tpu v5 lite", "v5e"),
    ("tpu v5e", "v5e"),
    ("tpu v5", "v5p"),
    ("tpu v6 lite", "v6e"),
    ("tpu v6e", "v6e"),
    ("cpu", "cpu"),
)


def preset_for(device_kind: str) -> str | None:
    """The :data:`PEAKS` preset of a ``device_kind`` string, or None for an unknown device."""
    kind = device_kind.lower()
    return next((preset for needle, preset in DEVICE_KINDS if needle in kind), None)


def peak_flops(configured: float, device_kind: str, dtype: str) -> float | None:
    """FLOP/s per device for MFU: ``configured`` if positive, else the preset of the device.

    None when nothing is configured and the device is not in the table (the trainer then logs
    no MFU rather than a made-up one).
    """
    if configured > 0:
        return float(configured)
    preset = preset_for(device_kind)
    return PEAKS[preset].get(dtype, PEAKS[preset]["float32"]) if preset else None


def cpu_auto(setting: str) -> bool:
    """An ``auto`` / ``on`` / ``off`` switch for a CPU-tuned path; ``auto`` is on for the CPU backend only.

    Used by ``model.grad_barrier``, ``model.fuse_qkv`` and ``train.cond_update``: tricks measured
    on XLA:CPU that are off by default on GPU/TPU (see bench/README.md).
    """
    if setting == "auto":
        return jax.default_backend() == "cpu"
    return setting == "on"
