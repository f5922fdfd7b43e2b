"""The peaks the trainer's MFU is logged against, the CPU's classification and the auto switches."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm import config_lib, hardware, param_paths
from jaxlm.main import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert hardware.peak_flops(3e11, "NVIDIA H100 80GB HBM3", "bfloat16") == 3e11
    assert hardware.peak_flops(0.0, "NVIDIA GeForce RTX 4090", "bfloat16") is None


def test_every_preset_has_every_compute_dtype():
    from jaxlm.config_lib import CHOICES

    for preset, peaks in hardware.PEAKS.items():
        assert set(peaks) == set(CHOICES["model.dtype"]), preset
        assert all(v > 0 for v in peaks.values())


AVX2_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""
ZEN5_CPUINFO = AVX2_CPUINFO.replace("7B13", "9B45").replace("bmi2", "bmi2 avx512f avx512bw avx512_bf16")


@pytest.mark.parametrize(
    "text, isa",
    [
        (AVX2_CPUINFO, "avx2"),
        (ZEN5_CPUINFO, "avx512_bf16"),
        (AVX2_CPUINFO.replace("bmi2", "avx512f"), "avx512"),
        (ZEN5_CPUINFO.replace("bmi2", "amx_tile amx_bf16"), "amx"),
        (AVX2_CPUINFO.replace(" fma", ""), "other"),
        ("", "other"),
    ],
)
def test_the_cpu_is_classified_by_its_matmul_instructions(text, isa):
    info = hardware.parse_cpuinfo(text, cores=2)
    assert info.isa == isa
    assert info.key.endswith(f"| {isa} | 2 cores")


def test_auto_switches_follow_the_backend_and_the_isa():
    for name in ("grad_barrier", "fuse_qkv", "cond_update"):
        assert hardware.auto_switch(name, "auto", backend="gpu") is False
        assert hardware.auto_switch(name, "on", backend="gpu") is True
        assert hardware.auto_switch(name, "off", backend="cpu", isa="avx2") is False
        for isa in hardware.ISAS:
            assert hardware.auto_switch(name, "auto", backend="cpu", isa=isa) is hardware.CPU_SWITCHES[name][isa][0]
    # A CPU trick outside the table: auto = on for any CPU (this test runs on the CPU backend).
    assert hardware.cpu_auto("auto") is True and hardware.cpu_auto("off") is False
    assert (
        hardware.cpu_auto("auto", "grad_barrier") is hardware.CPU_SWITCHES["grad_barrier"][hardware.cpu_info().isa][0]
    )
    # bf16 matmul operands only where the hardware has bf16 dot products (and on accelerators).
    assert hardware.auto_switch("bf16_matmul", "auto", backend="tpu") is True
    assert hardware.auto_switch("bf16_matmul", "auto", backend="cpu", isa="avx512_bf16") is True
    assert hardware.auto_switch("bf16_matmul", "auto", backend="cpu", isa="avx2") is False
    assert set(hardware.CPU_SWITCHES) == {"grad_barrier", "fuse_qkv", "cond_update", "bf16_matmul"}
    assert all(set(v) == set(hardware.ISAS) for v in hardware.CPU_SWITCHES.values())


def test_matmul_operand_dtype(monkeypatch):
    import jax.numpy as jnp

    assert hardware.matmul_operand_dtype("compute", "bfloat16") == jnp.bfloat16
    assert hardware.matmul_operand_dtype("float32", "bfloat16") == jnp.float32
    assert hardware.matmul_operand_dtype("auto", "float32") == jnp.float32
    for text, isa, expected in ((AVX2_CPUINFO, "avx2", jnp.float32), (ZEN5_CPUINFO, "avx512_bf16", jnp.bfloat16)):
        monkeypatch.setattr(hardware, "cpu_info", lambda text=text: hardware.parse_cpuinfo(text, 2))
        assert hardware.matmul_operand_dtype("auto", "bfloat16") == expected
        line = hardware.describe_switches("auto", "off", "on", "auto", "bfloat16")
        assert line.startswith(f"CPU {isa}: ") and f"matmul operands {jnp.dtype(expected).name}" in line
        assert "fuse_qkv off (set)" in line
        # At float32 a CPU with fast bf16 matmuls says so (the dtype is the user's choice); AVX2 does not.
        line = hardware.describe_switches("auto", "auto", "auto", "auto", "float32")
        assert "matmul operands float32 (model.dtype float32" in line
        assert ("model.dtype=bfloat16 would multiply bf16 here" in line) == (isa == "avx512_bf16")


def test_the_cpu_peak_is_probed_once_and_cached_per_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "PROBE_SIZE", 256)
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.05)
    figures = iter([2e11, 1e11, 3e11])  # what successive probes measure
    calls = []
    monkeypatch.setattr(hardware, "_probe", lambda dtype: calls.append(dtype) or next(figures))
    load = {"now": 99.0}
    monkeypatch.setattr(hardware, "_load", lambda: load["now"])
    cache = tmp_path / "jaxlm" / "cpu_peak.json"
    key = hardware.cpu_info().key

    def fresh_process_peak() -> float:
        hardware.measured_cpu_peak.cache_clear()
        return hardware.measured_cpu_peak("float32")

    try:
        assert fresh_process_peak() == 2e11 and calls == ["float32"]
        assert json.loads(cache.read_text())[key] == {"float32": 2e11, "float32_load": 99.0}
        assert hardware.measured_cpu_peak("float32") == 2e11 and len(calls) == 1  # once per process
        # Probed under load: probed again in the next process, keeping the larger figure.
        load["now"] = 0.0
        assert fresh_process_peak() == 2e11 and len(calls) == 2
        assert json.loads(cache.read_text())[key] == {"float32": 2e11, "float32_load": 0.0}
        # Now a quiet figure: reused without probing.
        assert fresh_process_peak() == 2e11 and len(calls) == 2
        # The trainer's per-device figure: the machine's peak shared by its local CPU devices.
        assert hardware.peak_flops(0.0, "cpu", "float32") == 2e11 / jax.local_device_count()
        assert hardware.peak_flops(5e10, "cpu", "float32") == 5e10
    finally:
        hardware.measured_cpu_peak.cache_clear()


def test_the_probe_measures_a_matmul(monkeypatch):
    monkeypatch.setattr(hardware, "PROBE_SIZE", 128)
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.01)
    assert 1e7 < hardware._probe("float32") < 1e15


def test_small_initializers_compile_cheaply_on_a_cpu_only():
    cheap = hardware.init_compiler_options(10**6, backend="cpu")
    assert cheap == {
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False,
    }
    assert hardware.init_compiler_options(hardware.CHEAP_INIT_MAX_PARAMS, backend="cpu") == {}
    assert hardware.init_compiler_options(10**6, backend="gpu") == {}
    assert hardware.init_compiler_options(10**6, backend="tpu") == {}


def test_a_cheaply_compiled_initializer_draws_the_optimized_programs_values():
    config = config_lib.load_config_file(os.path.join(REPO, "configs", "gpt.py") + ":size=tiny")
    config.model.num_layers, config.model.embed_dim, config.model.mlp_dim = 1, 32, 64
    config = config_lib.validate(config)
    exp = experiment.build(config, 263)
    state = experiment.init_state(exp, 0)  # cheap on this CPU (a tiny GPT is far below the threshold)
    assert hardware.init_compiler_options(experiment.param_count(state.params))

    def init(rng):
        args = experiment.example_args(exp.model_cfg, config.data.seq_len)
        return nn.unbox(exp.model.init({"params": rng}, *args)["params"])

    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        optimized = jax.jit(init)(jax.random.key(0))  # XLA's default options
    for path, a in param_paths.flatten(state.params).items():
        np.testing.assert_allclose(a, param_paths.flatten(optimized)[path], rtol=1e-6, atol=1e-7, err_msg=path)

    # Without the MLIR fusion emitters the cheap program draws the same bits as with them.
    options = hardware.init_compiler_options(experiment.param_count(state.params))
    with_emitters = dict(options, xla_cpu_use_fusion_emitters=True)
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        lowered = jax.jit(init).lower(jax.random.key(0))
        cheap, emitted = (lowered.compile(compiler_options=o)(jax.random.key(0)) for o in (options, with_emitters))
    for a, b in zip(jax.tree.leaves(cheap), jax.tree.leaves(emitted)):
        np.testing.assert_array_equal(a, b)
