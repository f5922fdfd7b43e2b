"""Parity with Hugging Face ``peft``: LoRA, IA3, prompt and prefix tuning give the same logits and trainable counts.

Random tiny models (nothing downloaded) are wrapped with ``peft``; their adapter weights are set
to random non-zero values, copied into jaxlm's trainable tree (``jaxlm.peft``) by path, and the
jaxlm model applied to ``peft.effective_params`` must agree with ``peft``'s forward pass. Prompt
tuning (GPT-2, BERT token classification) and prefix tuning (GPT-2) copy ``peft``'s virtual-token
embedding weights into ``prompt/embedding`` / each layer's ``attn/prefix/{key, value}``.
"""

import dataclasses

import numpy as np
import pytest
import reference_libs

torch = reference_libs.importorskip("torch")
transformers = reference_libs.importorskip("transformers")
hf_peft = reference_libs.importorskip("peft")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from jaxlm import config_lib, models, param_paths, peft  # noqa: E402
from jaxlm.interop import hf  # noqa: E402

LAYERS = 2


def _randomize(model):
    with torch.no_grad():  # zero biases / unit norms would hide mapping mistakes
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=LAYERS, n_head=4, n_embd=32, n_positions=64, vocab_size=97)
    model = transformers.GPT2LMHeadModel(config).eval()
    _randomize(model)
    return model


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertForPreTraining(config).eval()
    _randomize(model)
    return model


# family -> method -> (peft config, jaxlm config.peft.targets, {HF module -> jaxlm kernel path(s)} per layer)
CASES = {
    ("gpt2", "lora"): (
        lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"], fan_in_fan_out=True),
        "mlp/(wi|wo),attn/out",
        {"mlp.c_fc": ["mlp/wi"], "mlp.c_proj": ["mlp/wo"], "attn.c_proj": ["attn/out"]},
    ),
    ("gpt2", "ia3"): (
        lambda: hf_peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
        "attn/(query|key|value),mlp/wo",
        {"attn.c_attn": ["attn/query", "attn/key", "attn/value"], "mlp.c_proj": ["mlp/wo"]},
    ),
    ("bert", "lora"): (
        lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
        "attn/(query|value)",
        {"attention.self.query": ["attn/query"], "attention.self.value": ["attn/value"]},
    ),
    ("bert", "ia3"): (
        # A regex (full match): a plain 'output.dense' would also take attention.output.dense.
        lambda: hf_peft.IA3Config(
            target_modules=r".*layer\.\d+\.(attention\.self\.(key|value)|output\.dense)",
            feedforward_modules=r".*layer\.\d+\.output\.dense",
        ),
        "attn/(key|value),mlp/wo",
        {"attention.self.key": ["attn/key"], "attention.self.value": ["attn/value"], "output.dense": ["mlp/wo"]},
    ),
}


def _hf_layer_prefix(family, i):
    return f"transformer.h.{i}." if family == "gpt2" else f"bert.encoder.layer.{i}."


@pytest.mark.parametrize("family, method", list(CASES), ids=[f"{f}-{m}" for f, m in CASES])
def test_logits_and_trainable_counts_match_hf_peft(family, method):
    make_config, targets, mapping = CASES[(family, method)]
    base_model = _gpt2() if family == "gpt2" else _bert()
    hf_config = base_model.config.to_dict()
    state = {k: v.detach().numpy().copy() for k, v in base_model.state_dict().items()}
    fields = hf.model_fields_from_hf(hf_config, state=state)
    params = hf.params_from_hf(hf_config, state, fields)
    model_cfg = dataclasses.replace(config_lib.validate(config_lib.base_config()).model, **fields)
    jax_model = models.build(model_cfg)

    peft_model = hf_peft.get_peft_model(base_model, make_config()).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero adapters (LoRA B and IA3 start as the identity)
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "ia3" in name else 0.0))

    c = config_lib.base_config()
    c.peft.method, c.peft.targets, c.peft.rank, c.peft.alpha, c.peft.trainable = method, targets, 4, 8.0, ""
    cfg = config_lib.validate(c).peft
    trainable = peft.init(jax.random.key(0), params, cfg)
    flat = param_paths.flatten(trainable["delta"])
    hf_trainable, _ = peft_model.get_nb_trainable_parameters()
    assert peft.count(trainable) == hf_trainable

    # Copy the peft adapters into jaxlm's tree (HF Linear weights are [out, in], GPT-2's Conv1D [in, out]).
    for hf_full, module in peft_model.named_modules():
        for i in range(LAYERS):
            for hf_name, jax_names in mapping.items():
                if not hf_full.endswith(_hf_layer_prefix(family, i) + hf_name):
                    continue
                kernels = [f"blocks/layer_{i}/{n}/kernel" for n in jax_names]
                if method == "lora":
                    a = module.lora_A["default"].weight.detach().numpy()  # [r, in]
                    b = module.lora_B["default"].weight.detach().numpy()  # [out, r]
                    flat[f"{kernels[0]}/lora_a"] = a.T
                    flat[f"{kernels[0]}/lora_b"] = b.T
                else:
                    scale = module.ia3_l["default"].detach().numpy().reshape(-1)
                    for k, part in zip(kernels, np.split(scale, len(kernels))):
                        flat[f"{k}/scale"] = part
    for path, value in flat.items():
        assert value.shape == param_paths.flatten(trainable["delta"])[path].shape, path
    trainable = {"delta": _nested(flat), "params": {}}

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, size=(2, 12))
    effective = peft.effective_params(params, trainable, cfg)
    with torch.no_grad():
        out = peft_model(input_ids=torch.tensor(tokens))
    if family == "gpt2":
        want = out.logits.numpy()
        got = np.asarray(jax_model.apply({"params": effective}, tokens))
        base_got = np.asarray(jax_model.apply({"params": params}, tokens))
    else:
        want = out.prediction_logits.numpy()
        mask = np.ones_like(tokens)
        got = np.asarray(jax_model.apply({"params": effective}, tokens, segment_ids=mask)["mlm_logits"])
        base_got = np.asarray(jax_model.apply({"params": params}, tokens, segment_ids=mask)["mlm_logits"])
    assert np.abs(base_got - want).max() > 1e-3  # the adapters change the output (10x the tolerance)
    diff = float(np.abs(got - want).max())
    print(f"{family} {method}: max |logit difference| {diff:.2e}, trainable {hf_trainable}")
    assert diff < 1e-4


def _nested(flat):
    out = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = np.asarray(leaf, np.float32)
    return out


# ---- Prompt and prefix tuning (virtual tokens): peft's PromptTuning / PrefixTuning, the same weights.

VIRTUAL = 3


def _virtual_token_models(family, method):
    """(peft model, jaxlm model, jaxlm params with the virtual-token weights copied over, validated config)."""
    from jaxlm.models.heads import HeadConfig

    if family == "gpt2":
        base_model, head, task_type = _gpt2(), None, "CAUSAL_LM"
        hf_config = base_model.config.to_dict()
    else:  # BERT's token classification: peft's TOKEN_CLS prepends the prompt and keeps the classifier trainable
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64
        )
        config.num_labels = 3
        base_model = transformers.BertForTokenClassification(config).eval()
        _randomize(base_model)
        with torch.no_grad():  # logits of order 1 (a 0.02-std classifier would hide differences)
            base_model.classifier.weight.mul_(50.0)
        hf_config = {**base_model.config.to_dict(), "architectures": ["BertForTokenClassification"]}
        head, task_type = HeadConfig("token_classification", 3), "TOKEN_CLS"
    state = {k: v.detach().numpy().copy() for k, v in base_model.state_dict().items()}
    fields = hf.model_fields_from_hf(hf_config, state=state)
    params = hf.params_from_hf(hf_config, state, fields)
    c = config_lib.base_config()
    c.peft.method, c.peft.num_virtual_tokens = method, VIRTUAL
    c.peft.trainable = "head/" if head is not None else ""
    c.data.seq_len = 16
    if head is not None:
        c.data.objective, c.task.num_labels = "token_classification", 3
    for key, value in fields.items():
        setattr(c.model, key, value)
    cfg = config_lib.validate(c)
    jax_model = models.build(cfg.model, head=head)

    make = hf_peft.PromptTuningConfig if method == "prompt" else hf_peft.PrefixTuningConfig
    peft_model = hf_peft.get_peft_model(base_model, make(task_type=task_type, num_virtual_tokens=VIRTUAL)).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # virtual tokens at the scale of real embeddings, not N(0, 1)
        weight = peft_model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn_like(weight) * 0.5)
    weight = weight.detach().numpy()
    flat = dict(param_paths.flatten(params))
    if method == "prompt":
        flat["prompt/embedding"] = weight  # [P, D]
    else:  # peft's layout: [P, L * 2 * N * H] = past_key_values of layer l: (key, value) x [N, H]
        per_layer = weight.reshape(VIRTUAL, LAYERS, 2, fields["num_heads"], -1)
        for i in range(LAYERS):
            flat[f"blocks/layer_{i}/attn/prefix/key"] = per_layer[:, i, 0]
            flat[f"blocks/layer_{i}/attn/prefix/value"] = per_layer[:, i, 1]
    # Every parameter the jaxlm model has is now the HF one (nothing left at a fresh init).
    shapes = nn.unbox(jax.eval_shape(lambda: jax_model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]))
    assert sorted(param_paths.flatten(shapes)) == sorted(flat)
    return peft_model, jax_model, _nested(flat), cfg


@pytest.mark.parametrize(
    "family, method", [("gpt2", "prompt"), ("bert", "prompt"), ("gpt2", "prefix")], ids=lambda x: str(x)
)
def test_virtual_tokens_match_hf_peft(family, method):
    """jaxlm's prompt / prefix tuning == peft's PromptTuning / PrefixTuning (logits at the real tokens, counts).

    BERT prefix tuning has no peft counterpart here: transformers 5's BERT takes no ``past_key_values``
    (peft raises "Model does not support past key values").
    """
    peft_model, jax_model, params, cfg = _virtual_token_models(family, method)
    hf_trainable, _ = peft_model.get_nb_trainable_parameters()
    trainable = peft.init(jax.random.key(0), params, cfg.peft)
    assert peft.count(trainable) == hf_trainable
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 97, size=(2, 12))
    mask = np.ones_like(tokens)
    if family == "bert":
        mask[1, 8:] = 0  # padding: peft extends the attention mask with ones for the virtual tokens
        tokens = tokens * mask
    with torch.no_grad():
        out = peft_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
    want = out.logits.numpy()
    if method == "prompt":
        want = want[:, VIRTUAL:]  # peft returns the virtual positions too; jaxlm only the real ones
    effective = peft.effective_params(params, trainable, cfg.peft)
    if family == "gpt2":
        got = np.asarray(jax_model.apply({"params": effective}, tokens))
    else:
        got = np.asarray(jax_model.apply({"params": effective}, tokens, segment_ids=mask)["logits"])
    valid = mask.astype(bool)
    diff = float(np.abs(got[valid] - want[valid]).max())
    print(f"{family} {method}: max |logit difference| {diff:.2e}, trainable {hf_trainable}")
    # Other virtual-token values give other logits (10x the tolerance): the comparison sees them.
    other = param_paths.map_with_path(lambda p, x: x * 0.5 if ("prompt" in p or "prefix" in p) else x, effective)
    if family == "gpt2":
        moved = np.asarray(jax_model.apply({"params": other}, tokens))
    else:
        moved = np.asarray(jax_model.apply({"params": other}, tokens, segment_ids=mask)["logits"])
    assert np.abs(moved[valid] - want[valid]).max() > 1e-3
    assert diff < 1e-4
