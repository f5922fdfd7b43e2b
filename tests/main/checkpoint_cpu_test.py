"""On a CPU, checkpoints are written one replica per shard (``checkpoint.one_replica_writes_on_cpu``).

Orbax's default, replica-parallel saving, slices every replicated array once per device; on 8
simulated CPU devices that was 72 ``jit(slice)`` compilations for the tiny GPT's first save.
Checkpoints written either way restore to the same values.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlm import checkpoint, config_lib
from jaxlm.main import experiment

pytestmark = pytest.mark.all_devices


def _eight_device_state(tiny_config):
    tiny_config.mesh.shape.data = 8
    cfg = config_lib.validate(tiny_config)
    exp = experiment.build(cfg, 263)
    return cfg, exp, experiment.init_state(exp, seed=0)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _compiled_names(fn):
    """The names of the programs compiled while ``fn()`` runs, and its result.

    JAX's in-memory caches are cleared first, so a program an earlier test compiled in this
    process is compiled (or read from the persistent cache) again and counted.
    """
    jax.clear_caches()
    names, active = [], [True]

    def listen(event, duration, **kwargs):
        if active[0] and event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        return names, fn()
    finally:
        active[0] = False


def test_saving_on_eight_cpu_devices_slices_nothing_and_restores_exactly(tiny_config, tmp_path):
    cfg, exp, state = _eight_device_state(tiny_config)
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state))  # replicated over 8
    manager = checkpoint.make_manager(str(tmp_path), cfg.checkpoint)

    def save():
        checkpoint.save(manager, 1, state, {"position": 3})
        manager.wait_until_finished()

    names, _ = _compiled_names(save)
    assert "jit(slice)" not in names, names
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    assert handler._use_replica_parallel is False
    restored, data = checkpoint.restore(manager, 1, exp.abstract_state)
    manager.close()
    assert data == {"position": 3}
    for a, b in zip(_leaves(state), _leaves(restored)):
        np.testing.assert_array_equal(a, b)


def test_a_replica_parallel_checkpoint_restores_the_same_values(tiny_config, tmp_path):
    """A workdir saved with Orbax's default (every checkpoint before this change) still restores."""
    cfg, exp, state = _eight_device_state(tiny_config)
    ours = ocp.type_handlers.get_type_handler(jax.Array)
    default = ocp.type_handlers.ArrayHandler(use_replica_parallel=True, array_metadata_store=ours._array_metadata_store)
    manager = checkpoint.make_manager(str(tmp_path), cfg.checkpoint)
    ocp.type_handlers.register_type_handler(jax.Array, default, override=True)
    try:
        names, _ = _compiled_names(lambda: (checkpoint.save(manager, 1, state, {}), manager.wait_until_finished()))
    finally:
        ocp.type_handlers.register_type_handler(jax.Array, ours, override=True)
    manager.close()
    assert "jit(slice)" in names  # it was written replica-parallel
    manager = checkpoint.make_manager(str(tmp_path), cfg.checkpoint, read_only=True)
    restored, _ = checkpoint.restore(manager, 1, exp.abstract_state)
    manager.close()
    for a, b in zip(_leaves(state), _leaves(restored)):
        np.testing.assert_array_equal(a, b)
