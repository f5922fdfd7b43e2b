"""Hugging Face task heads (BERT sequence / token classification and QA, GPT-2 sequence classification).

Random-initialized ``transformers`` models built from tiny configs (nothing is downloaded) are
imported with ``jaxlm convert --from hf``; the jaxlm logits must match PyTorch's within 1e-4 on
padded batches, and exporting the workdir back must give the original tensors and labels.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import reference_libs

torch = reference_libs.importorskip("torch")
transformers = reference_libs.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402

from jaxlm import config_lib, models  # noqa: E402
from jaxlm.common_types import ConfigError, DataError  # noqa: E402
from jaxlm.interop import hf  # noqa: E402
from jaxlm.main import convert, restore  # noqa: E402
from jaxlm.main import workdir as workdir_lib  # noqa: E402
from jaxlm.models.heads import HeadConfig  # noqa: E402

VOCAB = 300  # no tokenizer.json: the import uses bytes (263 ids), padding id 0
LENGTHS = [12, 9, 4, 1]
SENTIMENT = {0: "neg", 1: "neu", 2: "pos"}


def _randomize(model):
    with torch.no_grad():  # zero biases and unit norms would hide mapping mistakes
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _bert(cls, seed, **kw):
    torch.manual_seed(seed)
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


def _gpt2(cls, seed, **kw):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=VOCAB, **kw)
    return _randomize(cls(config))


SOURCES = {
    "bert_seq": lambda: _bert(transformers.BertForSequenceClassification, 0, num_labels=3, id2label=SENTIMENT),
    "bert_tok": lambda: _bert(transformers.BertForTokenClassification, 1, num_labels=5),
    "bert_qa": lambda: _bert(transformers.BertForQuestionAnswering, 2),
    "gpt2_seq": lambda: _gpt2(transformers.GPT2ForSequenceClassification, 3, num_labels=3, pad_token_id=0),
}
EXPECTED = {  # config.data.objective, config.task.num_labels, config.task.labels
    "bert_seq": ("classification", 3, "neg,neu,pos"),
    "bert_tok": ("token_classification", 5, ""),
    "bert_qa": ("qa", 0, ""),
    "gpt2_seq": ("classification", 3, ""),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for name, make in SOURCES.items():
        d = tmp_path_factory.mktemp(f"hf_{name}")
        make().save_pretrained(str(d))
        out[name] = str(d)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_dirs):
    class Converted(dict):
        def __missing__(self, name):
            workdir = str(tmp_path_factory.mktemp(f"wd_{name}") / "run")
            with open(os.path.join(os.path.dirname(workdir), "convert.txt"), "w") as stream:
                convert.run_from_hf(hf_dirs[name], workdir, stream=stream)
            self[name] = workdir
            return workdir

    return Converted()


def _batch(seed, *, left_pad_last=False):
    rng = np.random.default_rng(seed)
    t = max(LENGTHS)
    tokens = rng.integers(1, VOCAB, size=(len(LENGTHS), t))
    mask = (np.arange(t)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int64)  # right padding
    if left_pad_last:  # the last row padded on the left instead (GPT-2 finds the last real token either way)
        mask[-1] = mask[-1][::-1]
    types = np.where(np.arange(t)[None] >= np.asarray(LENGTHS)[:, None] // 2, 1, 0) * mask
    return np.where(mask == 1, tokens, 0), mask, types


@pytest.mark.parametrize("name", list(SOURCES))
def test_logits_match_pytorch(name, converted, hf_dirs):
    config = config_lib.validate(workdir_lib.saved_config(converted[name]))
    assert (config.data.objective, config.task.num_labels, config.task.labels) == EXPECTED[name]
    exp, params, _, step = restore.open_trained(config, converted[name])
    assert step == 0
    assert not {"lm_head", "mlm", "nsp"} & set(params)
    assert ("pooler" in params) == (name == "bert_seq")

    model = getattr(transformers, json.load(open(os.path.join(hf_dirs[name], "config.json")))["architectures"][0])
    model = model.from_pretrained(hf_dirs[name]).eval()
    bert = name.startswith("bert")
    tokens, mask, types = _batch(0, left_pad_last=not bert)
    kwargs = {"token_types": types} if bert else {}
    # Jitted on one device: op by op on the 8-device shardings would compile every op for them.
    got = jax.jit(lambda p: exp.model.apply({"params": p}, tokens, segment_ids=mask, **kwargs))(jax.device_get(params))
    with torch.no_grad():
        inputs = {"input_ids": torch.tensor(tokens), "attention_mask": torch.tensor(mask)}
        want = model(**inputs, **({"token_type_ids": torch.tensor(types)} if bert else {}))
    valid = mask.astype(bool)
    if name == "bert_qa":
        pairs = [
            (got["start_logits"][valid], want.start_logits[valid]),
            (got["end_logits"][valid], want.end_logits[valid]),
        ]
    elif name == "bert_tok":
        pairs = [(got["logits"][valid], want.logits[valid])]
    else:
        pairs = [(got["logits"], want.logits)]
    diff = max(float(np.max(np.abs(np.asarray(a) - b.numpy()))) for a, b in pairs)
    print(f"max |logit difference| ({name}): {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", list(SOURCES))
def test_export_round_trips(name, converted, hf_dirs, tmp_path):
    out = convert.run_to_hf(converted[name], str(tmp_path / "export"), stream=open(os.devnull, "w"))
    original, exported = (transformers.AutoConfig.from_pretrained(d) for d in (hf_dirs[name], out))
    assert exported.architectures == original.architectures
    assert exported.id2label == original.id2label and exported.num_labels == original.num_labels
    assert exported.label2id == {label: i for i, label in original.id2label.items()}
    if name == "gpt2_seq":
        assert exported.pad_token_id == original.pad_token_id == 0
    want, got = hf.load_state_dict(hf_dirs[name]), hf.load_state_dict(out)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _params_logits(model, hf_config, cfg_fields, head, tokens, mask):
    """jaxlm logits of the Hugging Face ``model`` mapped without a workdir."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = hf.params_from_hf(hf_config, state, cfg_fields)
    base = config_lib.validate(config_lib.base_config()).model
    jax_model = models.build(dataclasses.replace(base, **cfg_fields), head=head)
    return params, jax_model.apply({"params": params}, tokens, segment_ids=mask)


@pytest.mark.parametrize("cls_name", ["GPT2ForTokenClassification", "GPT2ForQuestionAnswering"])
def test_gpt2_token_and_qa_heads(cls_name):
    model = _gpt2(getattr(transformers, cls_name), 4, num_labels=4)
    hf_config = {**model.config.to_dict(), "architectures": [cls_name]}
    task = hf.task_from_hf(hf_config)
    fields = hf.model_fields_from_hf(hf_config)
    head = HeadConfig(task.kind, task.num_labels)
    tokens, mask, _ = _batch(1)
    params, got = _params_logits(model, hf_config, fields, head, tokens, mask)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
    valid = mask.astype(bool)
    names = ("start_logits", "end_logits") if task.kind == "qa" else ("logits",)
    for key in names:
        np.testing.assert_allclose(np.asarray(got[key])[valid], getattr(want, key).numpy()[valid], atol=1e-4)
    back = hf.params_to_hf(params, fields, task)
    assert sorted(back) == sorted(k for k in model.state_dict() if not k.endswith(".attn.bias"))


def test_detection_and_regression():
    model = _bert(transformers.BertForSequenceClassification, 5, num_labels=1)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    hf_config = {**model.config.to_dict(), "architectures": ["BertForSequenceClassification"]}
    task = hf.task_from_hf(hf_config, state)  # one label: regression
    assert (task.head.architecture, task.kind, task.num_labels) == ("BertForSequenceClassification", "regression", 1)
    assert task.config_fields() == {"data.objective": "classification", "task.num_labels": 1}
    # A config naming no head (or another one) is a base model; its import refuses the head's tensors.
    for archs in (None, ["BertForMaskedLM"]):
        base = {**hf_config, "architectures": archs}
        assert hf.task_from_hf(base, state) is None
        with pytest.raises(DataError, match="tensors BERT does not use"):
            hf.params_from_hf(base, state, hf.model_fields_from_hf(base, state=state))
    fields = hf.model_fields_from_hf(hf_config, state=state)
    exported = hf.hf_config_from_model(fields, {"pad": 0}, task)
    assert exported["problem_type"] == "regression" and exported["id2label"] == {"0": "LABEL_0"}
    # Label names config.task.labels cannot hold fall back to 0..N-1; others are kept.
    three = {**hf_config, "id2label": {"0": "a,b", "1": "c", "2": "d"}}
    assert hf.task_from_hf(three).config_fields() == {"data.objective": "classification", "task.num_labels": 3}
    three["id2label"] = {"2": "d", "0": "B-PER", "1": "O"}
    assert hf.task_from_hf(three).labels == ("B-PER", "O", "d")


def test_bad_head_checkpoints_and_exports(hf_dirs, tmp_path):
    state, hf_config = hf.load_state_dict(hf_dirs["bert_seq"]), hf.read_config(hf_dirs["bert_seq"])
    fields = hf.model_fields_from_hf(hf_config, state=state)
    with pytest.raises(DataError, match="has no tensor 'classifier.bias'"):
        hf.params_from_hf(hf_config, {k: v for k, v in state.items() if k != "classifier.bias"}, fields)
    with pytest.raises(DataError, match=r"classifier.weight has shape \(3, 32\) but config.json implies \(2, 32\)"):
        hf.params_from_hf({**hf_config, "id2label": {"0": "a", "1": "b"}}, state, fields)
    with pytest.raises(DataError, match="pooling='mean' has no BertForSequenceClassification equivalent"):
        hf.export_task(fields, "classification", 3, (), "mean")
    with pytest.raises(DataError, match="has no Hugging Face equivalent"):
        hf.export_task({**fields, "kind": "encoder_decoder"}, "classification", 3)
    # The objective and pooling follow the checkpoint's head.
    with pytest.raises(ConfigError, match="holds a BertForSequenceClassification"):
        convert.run_from_hf(hf_dirs["bert_seq"], str(tmp_path / "a"), overrides={"data.objective": "masked_lm"})
    with pytest.raises(ConfigError, match="pools with the pooler on"):
        convert.run_from_hf(hf_dirs["bert_seq"], str(tmp_path / "b"), overrides={"task.pooling": "cls"})
