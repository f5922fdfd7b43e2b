"""``jaxlm convert --from hf-peft`` / ``--to hf-peft`` against Hugging Face ``peft`` itself.

Tiny random GPT-2 and BERT models (nothing downloaded) are saved with ``save_pretrained`` and
imported with ``jaxlm convert --from hf``; ``peft`` wraps the same model, its adapters are set to
random non-zero values and saved. The imported PEFT workdir must give ``peft``'s logits within
1e-4 and the same trainable-parameter count; its export must load with
``PeftModel.from_pretrained`` and give the same logits and count again.
"""

import dataclasses
import os

import numpy as np
import pytest
import reference_libs

torch = reference_libs.importorskip("torch")
transformers = reference_libs.importorskip("transformers")
hf_peft_lib = reference_libs.importorskip("peft")
pytest.importorskip("safetensors")

import jax  # noqa: E402

from jaxlm import cli, config_lib, models, param_paths, peft  # noqa: E402
from jaxlm.common_types import UserError  # noqa: E402
from jaxlm.interop import hf, hf_peft  # noqa: E402
from jaxlm.main import convert, convert_peft, merge  # noqa: E402
from jaxlm.main import workdir as workdir_lib  # noqa: E402
from jaxlm.models.heads import HeadConfig  # noqa: E402

VOCAB = 300  # no tokenizer.json: the import uses bytes (263 ids)
QUIET = open(os.devnull, "w")
# The imported vocabulary as Hugging Face has it (no padding to a multiple, where the config has that switch).
UNPADDED = {"model.vocab_multiple": "1"} if "vocab_multiple" in config_lib.base_config().model else {}


def _randomize(model):
    with torch.no_grad():  # zero biases and unit norms would hide mapping mistakes
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=VOCAB)
    return _randomize(transformers.GPT2LMHeadModel(config))


def _bert(cls, **kw):
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        **kw,
    )
    return _randomize(cls(config))


# name -> (HF model, peft LoraConfig kwargs, whether jaxlm's trainable count equals peft's)
CASES = {
    "gpt2-lora": (_gpt2, {"target_modules": ["c_fc", "c_proj"], "fan_in_fan_out": True}, True),
    # c_attn (fused q/k/v): imported as three LoRAs sharing A, so jaxlm counts A three times.
    "gpt2-c_attn": (_gpt2, {"target_modules": ["c_attn"], "fan_in_fan_out": True, "task_type": "CAUSAL_LM"}, False),
    "bert-rslora": (
        lambda: _bert(transformers.BertForPreTraining),
        {"target_modules": ["query", "key", "value", "attention.output.dense"], "use_rslora": True},
        True,
    ),
    "bert_seq-dora": (
        lambda: _bert(transformers.BertForSequenceClassification, num_labels=3),
        {"target_modules": ["query", "value", "intermediate.dense"], "use_dora": True, "task_type": "SEQ_CLS"},
        True,
    ),
}


# How a case's jaxlm base runs (the adapter maps onto the nn.scan layout too).
BASE_OVERRIDES = {"gpt2-c_attn": {"model.scan_layers": "true"}}


def _tokens():
    rng = np.random.default_rng(0)
    return rng.integers(1, VOCAB, size=(2, 12))


def _hf_logits(model, tokens):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.ones(tokens.shape, dtype=torch.long))
    return (out.prediction_logits if hasattr(out, "prediction_logits") else out.logits).numpy()


def _jaxlm_logits(workdir, tokens):
    """Logits of a PEFT workdir (base + adapter, unmerged) and its trainable count."""
    config = config_lib.validate(workdir_lib.saved_config(workdir))
    exp, base, state, _, _ = merge.open_peft(config, workdir)
    base, trainable = jax.device_get((base, state.params))  # on one device: op by op over 8 would compile each op
    params = peft.effective_params(base, trainable, config.peft)
    out = jax.jit(lambda p: exp.model.apply({"params": p}, tokens, segment_ids=np.ones_like(tokens)))(params)
    out = out if not isinstance(out, dict) else out.get("mlm_logits", out.get("logits"))
    return np.asarray(out), peft.count(state.params)


def _prepare(root, name):
    """(HF model dir, jaxlm base workdir, peft adapter dir, peft's logits, peft's trainable count) of a case."""
    make, kwargs, _ = CASES[name]
    model_dir, base, adapter_dir = (str(root / n) for n in ("hf", "base", "adapter"))
    make().save_pretrained(model_dir)
    convert.run_from_hf(model_dir, base, overrides=UNPADDED | BASE_OVERRIDES.get(name, {}), stream=QUIET)
    model = type(make()).from_pretrained(model_dir).eval()
    wrapped = hf_peft_lib.get_peft_model(model, hf_peft_lib.LoraConfig(r=4, lora_alpha=8, **kwargs)).eval()
    torch.manual_seed(2)
    with torch.no_grad():  # non-zero adapters (B starts at zero, DoRA's magnitude at the weight norm)
        for pname, p in wrapped.named_parameters():
            if "lora_" in pname:
                p.copy_(p * (1 + 0.3 * torch.randn_like(p)) if "magnitude" in pname else 0.3 * torch.randn_like(p))
            elif "modules_to_save" in pname:  # the task head, saved whole
                p.add_(0.3 * torch.randn_like(p))
    wrapped.save_pretrained(adapter_dir)
    count, _ = wrapped.get_nb_trainable_parameters()
    return model_dir, base, adapter_dir, _hf_logits(wrapped, _tokens()), count


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{case: what _prepare returns}, each prepared on first use."""

    class Prepared(dict):
        def __missing__(self, name):
            self[name] = _prepare(tmp_path_factory.mktemp(name), name)
            return self[name]

    return Prepared()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_import_then_export_matches_peft(name, hf_dirs, tmp_path):
    model_dir, base, adapter_dir, want, hf_count = hf_dirs[name]
    same_count = CASES[name][2]
    tokens = _tokens()
    workdir, exported = str(tmp_path / "peft_run"), str(tmp_path / "exported")

    # Import: the adapter onto its base gives peft's logits.
    assert cli.execute(["convert", "--from", "hf-peft", adapter_dir, "--base", base, "--workdir", workdir]) == 0
    config = config_lib.validate(workdir_lib.saved_config(workdir))
    assert config.checkpoint.init_from == base and config.peft.rank == 4
    got, count = _jaxlm_logits(workdir, tokens)
    plain = _hf_logits(_base_model(name, model_dir), tokens)
    assert np.abs(plain - want).max() > 1e-3  # the adapter changes the output (10x the tolerance)
    diff = float(np.abs(got - want).max())
    print(f"{name}: import max |logit difference| {diff:.2e}; trainable jaxlm {count} peft {hf_count}")
    assert diff < 1e-4
    assert (count == hf_count) == same_count

    # Export: peft loads it onto the same base model and gives the same logits and count.
    assert cli.execute(["convert", "--to", "hf-peft", "--workdir", workdir, exported]) == 0
    loaded = hf_peft_lib.PeftModel.from_pretrained(_base_model(name, model_dir), exported, is_trainable=True).eval()
    diff = float(np.abs(_hf_logits(loaded, tokens) - want).max())
    print(f"{name}: export max |logit difference| {diff:.2e}")
    assert diff < 1e-4
    assert loaded.get_nb_trainable_parameters()[0] == hf_count
    assert os.path.isfile(os.path.join(exported, peft.BASE_REFERENCE_FILE))


def _base_model(name, model_dir):
    return type(CASES[name][0]()).from_pretrained(model_dir).eval()


def test_gpt2_query_value_loras_export_as_one_block_diagonal_c_attn(hf_dirs, tmp_path):
    """jaxlm's separate query / value LoRAs (different A) are one rank-2r c_attn LoRA in peft: the same logits."""
    model_dir, *_ = hf_dirs["gpt2-lora"]
    hf_model = _gpt2()
    hf_config = hf_model.config.to_dict()
    state = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    fields = hf.model_fields_from_hf(hf_config, state=state)
    params = hf.params_from_hf(hf_config, state, fields)
    c = config_lib.base_config()
    c.peft.method, c.peft.targets, c.peft.rank, c.peft.alpha, c.peft.trainable = (
        "dora",
        "attn/(query|value)",
        4,
        8.0,
        "",
    )
    cfg = config_lib.validate(c).peft
    trainable = peft.init(jax.random.key(0), params, cfg)
    rng = np.random.default_rng(3)
    trainable = jax.tree.map(lambda x: np.asarray(x) * (1 + 0.3 * rng.standard_normal(x.shape)), trainable)
    trainable["delta"] = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape), trainable["delta"])
    delta: dict = {}
    for path, value in param_paths.flatten(trainable["delta"]).items():
        kernel, _, leaf = path.rpartition("/")
        delta.setdefault(kernel, {})[leaf] = np.asarray(value, np.float32)
    adapter = hf_peft.Adapter("dora", 4, 8.0, 0.0, delta, {}, num_layers=2)
    config, tensors, notes = hf_peft.adapter_to_peft(
        adapter, {**fields, "kind": "decoder_only"}, param_paths.flatten(params)
    )
    assert config["rank_pattern"] == {"attn.c_attn": 8} and "rank-8" in notes[0]
    out = tmp_path / "adapter"
    out.mkdir()
    hf_peft.write_adapter(str(out), config, tensors)
    loaded = hf_peft_lib.PeftModel.from_pretrained(_gpt2(), str(out)).eval()
    model_cfg = config_lib.validate(config_lib.base_config()).model
    jax_model = models.build(dataclasses.replace(model_cfg, **fields))
    tokens = _tokens()
    # Jitted: op by op, each op would compile for the 8 test devices.
    forward = jax.jit(lambda p, t: jax_model.apply({"params": peft.effective_params(p, t, cfg)}, tokens))
    got = np.asarray(forward(params, trainable))
    diff = float(np.abs(got - _hf_logits(loaded, tokens)).max())
    print(f"block-diagonal c_attn DoRA export: max |logit difference| {diff:.2e}")
    assert diff < 1e-4


def test_unmappable_adapters_and_runs_are_one_line_errors(hf_dirs, tmp_path):
    model_dir, base, adapter_dir, *_ = hf_dirs["gpt2-lora"]
    # IA3 is no LoRA adapter.
    ia3 = hf_peft_lib.get_peft_model(_gpt2(), hf_peft_lib.IA3Config(target_modules=["c_fc"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    # A LoRA on the embedding has no jaxlm LoRA counterpart.
    emb = hf_peft_lib.get_peft_model(_gpt2(), hf_peft_lib.LoraConfig(r=4, target_modules=["wte"]))
    emb.save_pretrained(str(tmp_path / "emb"))
    cases = [
        (["--from", "hf-peft", str(tmp_path / "ia3"), "--base", base], "peft_type='IA3'"),
        (["--from", "hf-peft", str(tmp_path / "emb"), "--base", base], "'transformer.wte' has no jaxlm equivalent"),
        (["--from", "hf-peft", adapter_dir], "needs --base"),
        (["--from", "hf", adapter_dir, "--base", base], "--base applies to convert --from hf-peft only"),
        (["--to", "hf-peft", "--workdir", base, str(tmp_path / "x")], "not a PEFT run"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
            cli.run(
                ["convert", *args, "--workdir", str(tmp_path / "w")] if "--workdir" not in args else ["convert", *args]
            )
        assert "\n" not in str(e.value)
    # An adapter exported from a run on another base is refused by hash.
    workdir = str(tmp_path / "run")
    convert_peft.run_from_hf_peft(adapter_dir, base, workdir, stream=QUIET)
    convert_peft.run_to_hf_peft(workdir, str(tmp_path / "exported"), stream=QUIET)
    other = str(tmp_path / "other_base")
    torch.manual_seed(5)
    other_dir = str(tmp_path / "other_hf")
    transformers.GPT2LMHeadModel(_gpt2().config).save_pretrained(other_dir)
    convert.run_from_hf(other_dir, other, overrides=UNPADDED, stream=QUIET)
    with pytest.raises(UserError, match="give the base it was trained on"):
        convert_peft.run_from_hf_peft(str(tmp_path / "exported"), other, str(tmp_path / "w2"), stream=QUIET)


def test_bert_classifier_lora_exports_head_and_pooler_as_modules_to_save(tmp_path):
    """A jaxlm LoRA run that also trained the task head and BERT's pooler (the default trainable) loads in peft."""
    hf_model = _bert(transformers.BertForSequenceClassification, num_labels=3)
    hf_config = {**hf_model.config.to_dict(), "architectures": ["BertForSequenceClassification"]}
    state = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    fields = hf.model_fields_from_hf(hf_config, state=state)
    params = hf.params_from_hf(hf_config, state, fields)
    c = config_lib.base_config()
    c.peft.method, c.peft.targets, c.peft.rank, c.peft.alpha = "lora", "attn/(query|value)", 4, 8.0
    cfg = config_lib.validate(c).peft  # trainable: the default head/|pooler/
    trainable = peft.init(jax.random.key(0), params, cfg)
    rng = np.random.default_rng(4)
    trainable = jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape), trainable)
    delta: dict = {}
    for path, value in param_paths.flatten(trainable["delta"]).items():
        kernel, _, leaf = path.rpartition("/")
        delta.setdefault(kernel, {})[leaf] = np.asarray(value, np.float32)
    kept = {p: np.asarray(v, np.float32) for p, v in param_paths.flatten(trainable["params"]).items()}
    assert sorted(kept) == ["head/classifier/bias", "head/classifier/kernel", "pooler/bias", "pooler/kernel"]
    adapter = hf_peft.Adapter("lora", 4, 8.0, 0.0, delta, kept, num_layers=2)
    config, tensors, _ = hf_peft.adapter_to_peft(adapter, {**fields, "kind": "encoder_only"}, {}, task_type="SEQ_CLS")
    assert config["modules_to_save"] == ["classifier", "pooler"]
    hf_peft.write_adapter(str(tmp_path), config, tensors)
    loaded = hf_peft_lib.PeftModel.from_pretrained(hf_model, str(tmp_path), is_trainable=True).eval()
    assert loaded.get_nb_trainable_parameters()[0] == peft.count(trainable)
    model_cfg = dataclasses.replace(config_lib.validate(config_lib.base_config()).model, **fields)
    jax_model = models.build(model_cfg, head=HeadConfig("classification", 3))
    tokens = _tokens()
    forward = jax.jit(
        lambda p, t: jax_model.apply(
            {"params": peft.effective_params(p, t, cfg)}, tokens, segment_ids=np.ones_like(tokens)
        )["logits"]
    )
    got = np.asarray(forward(params, trainable))
    diff = float(np.abs(got - _hf_logits(loaded, tokens)).max())
    print(f"BERT classifier LoRA + head + pooler export: max |logit difference| {diff:.2e}")
    assert diff < 1e-4
    # Imported back, the head and pooler return to their jaxlm paths.
    back = hf_peft.adapter_from_peft(config, tensors, {**fields, "kind": "encoder_only"})
    assert sorted(back.params) == sorted(kept)
    for path, value in kept.items():
        np.testing.assert_allclose(back.params[path], value, rtol=1e-6, atol=1e-7)
