"""Open a trained workdir for reading: its tokenizer and its latest parameters."""

from __future__ import annotations

from typing import Any

from jaxlm import checkpoint, config_lib, peft
from jaxlm.common_types import CheckpointError
from jaxlm.config_lib import Config
from jaxlm.data import tokenizers
from jaxlm.main import experiment, merge, task_data
from jaxlm.main import workdir as workdir_lib


def open_trained(config: Config, workdir: str) -> tuple[experiment.Experiment, Any, tokenizers.Tokenizer, int]:
    """Build the experiment for ``config`` and restore the latest checkpoint of ``workdir``.

    Returns ``(experiment, params, tokenizer, step)``. For a PEFT run (``config.peft``) the params
    are its base with the trained tree applied (``jaxlm.peft.effective_params``).
    """
    workdir = workdir_lib.check_path(workdir, must_exist=True)
    config = workdir_lib.check_compatible(workdir, config)  # its vocabulary padding is the saved run's
    if peft.enabled(config.peft):  # a PEFT run: its (hash-checked) base with the trained tree applied
        exp, base, state, tokenizer, step = merge.open_peft(config, workdir)
        return exp, experiment.effective_params_fn(exp)(base, state.params), tokenizer, step
    tokenizer = tokenizers.load(workdir)
    num_labels = task_data.resolve(config).num_labels if config_lib.task_head(config) != "none" else 0
    exp = experiment.build(
        config, experiment.model_vocab_size(config, tokenizer.vocab_size, tokenizer), num_labels=num_labels
    )
    manager = checkpoint.make_manager(workdir, config.checkpoint, read_only=True)
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"--workdir {workdir} has no checkpoint yet; train first with jaxlm train")
    state, _ = checkpoint.restore(manager, step, exp.abstract_state)
    manager.close()
    return exp, state.params, tokenizer, step
