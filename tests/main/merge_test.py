"""PEFT runs end to end: train from a base, resume bitwise, refuse another base, ``jaxlm merge`` == unmerged."""

import jax
import numpy as np
import pytest

from jaxlm import cli, config_lib, param_paths, peft
from jaxlm.common_types import CheckpointError
from jaxlm.main import merge, restore, train
from jaxlm.main import workdir as workdir_lib


def _tiny(tiny_config, corpus, **peft_overrides):
    c = tiny_config
    c.data.source = "files"
    c.data.files = corpus
    c.train.eval_every = 0
    c.train.eval_steps = 1
    c.train.log_every = 1
    c.checkpoint.every_steps = 2
    c.optim.warmup_steps = 0
    c.optim.lr = 3e-2  # large, so that 4 steps move the adapters far from their (identity) start
    for key, value in peft_overrides.items():
        setattr(c.peft, key, value)
    return c


def _trainable_leaves(workdir):
    config = config_lib.validate(workdir_lib.saved_config(str(workdir)))
    _, _, state, _, step = merge.open_peft(config, str(workdir))
    return step, param_paths.flatten(jax.tree.map(np.asarray, state.params))


@pytest.mark.slow
def test_peft_run_resumes_bitwise_refuses_another_base_and_merges(tiny_config, text_corpus, tmp_path):
    base_dir, peft_dir, once_dir, out = (str(tmp_path / n) for n in ("base", "peft", "once", "merged"))
    c = _tiny(tiny_config, text_corpus)
    c.train.num_steps = 2
    train.run(config_lib.validate(c), base_dir)

    c = _tiny(tiny_config, text_corpus, method="dora,ia3,bitfit", targets="attn/(query|value|out),mlp/wo", rank=2)
    c.checkpoint.init_from = base_dir
    c.train.num_steps = 4
    cfg = config_lib.validate(c)
    train.run(cfg, peft_dir, stop_at=2)  # interrupted, then resumed
    train.run(cfg, peft_dir)
    train.run(cfg, once_dir)
    step, resumed = _trainable_leaves(peft_dir)
    _, once = _trainable_leaves(once_dir)
    assert step == 4 and resumed.keys() == once.keys()
    for path in once:
        np.testing.assert_array_equal(resumed[path], once[path], err_msg=path)
    assert np.abs(resumed["delta/blocks/layer_0/attn/query/kernel/lora_b"]).max() > 1e-3  # adapters moved

    # Checkpoints only hold the trainable tree; the base is named by hash beside them.
    ref = peft.read_base_reference(peft_dir)
    assert ref["init_from"] == base_dir and ref["step"] == 2 and len(ref["sha256"]) == 64

    # Another base (the seed's init instead of base_dir) is refused in one line.
    c.checkpoint.init_from = ""
    with pytest.raises(CheckpointError, match="were trained on base .* use a new workdir") as e:
        train.run(config_lib.validate(c), peft_dir)
    assert "\n" not in str(e.value)

    # jaxlm merge writes an ordinary workdir whose logits equal the unmerged PEFT model's.
    assert cli.execute(["merge", "--workdir", peft_dir, "--out", out]) == 0
    plain = config_lib.validate(workdir_lib.saved_config(out))
    assert plain.peft.method == "none" and plain.checkpoint.init_from == ""
    exp, params, _, merged_step = restore.open_trained(plain, out)
    assert merged_step == 4
    peft_exp, base, state, _, _ = merge.open_peft(cfg, peft_dir)
    unmerged = peft.effective_params(base, state.params, cfg.peft)
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 16))
    got = exp.model.apply({"params": params}, tokens, deterministic=True)
    want = peft_exp.model.apply({"params": unmerged}, tokens, deterministic=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    base_logits = peft_exp.model.apply({"params": base}, tokens, deterministic=True)
    assert np.abs(np.asarray(base_logits) - np.asarray(want)).max() > 1e-3  # the adapters matter
    assert cli.execute(["merge", "--workdir", peft_dir, "--out", out]) == 2  # refuses a non-empty --out
