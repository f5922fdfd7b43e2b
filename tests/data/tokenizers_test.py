"""Tokenizers: round trips, special ids, save/load, deterministic training, HF files, errors."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.common_types import DataError
from jaxlm.data import tokenizers as T

NATIVE = ("byte", "char", "sentencepiece_unigram", "sentencepiece_bpe")
TRAINED = ("char", "sentencepiece_unigram", "sentencepiece_bpe")
SAMPLES = (
    "The quick brown fox jumps over the lazy dog.",
    "  two  spaces,\ttab and\nnew lines\n\nend ",
    "naïve café — Grüße, Ελληνικά, 日本語のテキスト 🙂",
)
UNSEEN = "Ω"  # never in the corpus below
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _corpus() -> list[str]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(i % 9 + 3)) + f" {i}." for i in range(200)]
    return docs + list(SAMPLES) * 3


CORPUS = _corpus()
VOCAB = {"char": 0, "sentencepiece_unigram": 96, "sentencepiece_bpe": 96}


@pytest.fixture(scope="module")
def trained_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tok")
    dirs = {}
    for name in NATIVE:
        dirs[name] = str(root / name)
        T.train(name, iter(CORPUS), dirs[name], VOCAB.get(name, 0))
    return dirs


@pytest.fixture(scope="module")
def native(trained_dirs: dict[str, str]) -> dict[str, T.Tokenizer]:
    return {name: T.load(d) for name, d in trained_dirs.items()}


# ----------------------------------------------------------------------------- native tokenizers


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(native: dict[str, T.Tokenizer], name: str, text: str) -> None:
    tok = native[name]
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert not set(ids.tolist()) & {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    batch = tok.encode_batch(list(SAMPLES))
    assert [b.tolist() for b in batch] == [tok.encode(s).tolist() for s in SAMPLES]


@pytest.mark.parametrize("name", NATIVE)
def test_special_ids(native: dict[str, T.Tokenizer], name: str) -> None:
    tok = native[name]
    assert tok.name == name
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    rest = (tok.unk_id, tok.mask_id, tok.cls_id, tok.sep_id)
    assert rest == ((259, 260, 261, 262) if name == "byte" else (3, 4, 5, 6))
    assert tok.special_ids == dict(zip(T.SPECIAL_ROLES, (0, 1, 2, *rest)))
    assert all(tok.special_id(r) == tok.special_ids[r] for r in T.SPECIAL_ROLES)
    assert max(rest) < tok.vocab_size
    # Specials are dropped on decode; unk reads as U+FFFD.
    text = SAMPLES[2]
    ids = [tok.bos_id, tok.cls_id, *tok.encode(text), tok.sep_id, tok.mask_id, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == text
    assert tok.decode([*tok.encode("ab"), tok.unk_id]) == "ab\ufffd"
    assert tok.decode([tok.unk_id, tok.unk_id]) == "\ufffd\ufffd"
    assert tok.decode([-1, tok.vocab_size, 10**9]) == ""


def test_byte_ids_unchanged() -> None:
    tok = T.build("byte")
    assert tok.vocab_size == 263
    assert tok.encode("A\x00\xff").tolist() == [65 + 3, 3, 0xC3 + 3, 0xBF + 3]
    assert T.train("byte", [], None).encode("a").tolist() == [100]


@pytest.mark.parametrize("name", ("char", "sentencepiece_unigram", "sentencepiece_bpe"))
def test_unseen_characters_are_unk(native: dict[str, T.Tokenizer], name: str) -> None:
    tok = native[name]
    ids = tok.encode(f"ab {UNSEEN} cd")
    assert tok.unk_id in ids.tolist()
    assert tok.decode(ids) == "ab \ufffd cd"
    # Text spelling a special token is plain text, never the special id.
    assert not set(tok.encode("<mask> <bos> <pad>").tolist()) & set(tok.special_ids.values()) - {tok.unk_id}


@pytest.mark.parametrize("name", TRAINED)
def test_save_load_reproduces_ids(native: dict[str, T.Tokenizer], trained_dirs: dict[str, str], name, tmp_path):
    tok = native[name]
    again = T.build(name, trained_dirs[name])
    resaved = str(tmp_path / "again")
    again.save(resaved)
    for other in (again, T.load(resaved), pickle.loads(pickle.dumps(tok))):
        assert type(other) is type(tok) and other.name == name
        assert other.vocab_size == tok.vocab_size and other.special_ids == tok.special_ids
        for text in (*SAMPLES, UNSEEN):
            assert other.encode(text).tolist() == tok.encode(text).tolist()


def test_sentencepiece_loads_model_file(native, trained_dirs) -> None:
    path = os.path.join(trained_dirs["sentencepiece_bpe"], "sentencepiece.model")
    tok = T.build("sentencepiece_bpe", path)
    assert tok.encode(SAMPLES[2]).tolist() == native["sentencepiece_bpe"].encode(SAMPLES[2]).tolist()


@pytest.mark.parametrize("name", TRAINED)
def test_training_is_deterministic(trained_dirs: dict[str, str], name: str, tmp_path) -> None:
    T.train(name, iter(CORPUS), str(tmp_path), VOCAB[name])
    for file in os.listdir(trained_dirs[name]):
        with open(os.path.join(trained_dirs[name], file), "rb") as a, open(tmp_path / file, "rb") as b:
            assert a.read() == b.read(), file


def test_sentencepiece_sampling_is_deterministic_across_processes() -> None:
    script = (
        "import sys, hashlib; from jaxlm.data import tokenizers as T; from tokenizers_test import CORPUS; "
        "tok = T.train('sentencepiece_unigram', CORPUS, None, 80, input_sentence_size=150, seed=3); "
        "sys.stdout.write(hashlib.sha256(tok.model_proto).hexdigest())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), ROOT])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    here = T.train("sentencepiece_unigram", CORPUS, None, 80, input_sentence_size=150, seed=3)
    assert out == hashlib.sha256(here.model_proto).hexdigest()
    other_seed = T.train("sentencepiece_unigram", CORPUS, None, 80, input_sentence_size=150, seed=4)
    assert other_seed.model_proto != here.model_proto


@pytest.mark.parametrize("name", ("sentencepiece_unigram", "sentencepiece_bpe"))
def test_sentencepiece_vocab_size_and_byte_fallback(native, name: str) -> None:
    assert native[name].vocab_size == VOCAB[name]
    tok = T.train(name, CORPUS, None, 340, byte_fallback=True)
    assert tok.vocab_size == 340 and tok.special_ids == native[name].special_ids
    text = f"{UNSEEN} {SAMPLES[2]} 🚀"
    assert tok.unk_id not in tok.encode(text).tolist()
    assert tok.decode(tok.encode(text)) == text


def test_char_vocabulary() -> None:
    tok = T.train("char", ["abcab", "ba"], None)
    assert tok.chars == ["a", "b", "c"] and tok.vocab_size == 10
    assert tok.encode("cab").tolist() == [9, 7, 8]
    capped = T.train("char", ["abcab", "ba"], None, vocab_size=9)
    assert capped.chars == ["a", "b"] and capped.encode("c").tolist() == [T.UNK_ID]


def test_load_or_train_reuses(tmp_path) -> None:
    calls = []

    def texts():
        calls.append(1)
        return iter(CORPUS)

    first = T.load_or_train("sentencepiece_bpe", str(tmp_path), texts, 96)
    second = T.load_or_train("sentencepiece_bpe", str(tmp_path), texts, 96)
    assert len(calls) == 1
    assert second.encode(SAMPLES[0]).tolist() == first.encode(SAMPLES[0]).tolist()
    with pytest.raises(DataError, match="holds a 'sentencepiece_bpe' tokenizer"):
        T.load_or_train("char", str(tmp_path), texts)
    with pytest.raises(DataError, match="vocab_size=96, not 200"):
        T.load_or_train("sentencepiece_bpe", str(tmp_path), texts, 200)
    # From a given path, copied into the workdir; byte needs neither path nor texts.
    copied = T.load_or_train("sentencepiece_bpe", str(tmp_path / "run2"), path=str(tmp_path))
    assert copied.encode(SAMPLES[2]).tolist() == first.encode(SAMPLES[2]).tolist()
    assert T.load(str(tmp_path / "run2")).encode(SAMPLES[2]).tolist() == first.encode(SAMPLES[2]).tolist()
    assert T.load_or_train("byte", str(tmp_path / "run3")).vocab_size == 263
    assert T.load(str(tmp_path / "run3")).name == "byte"
    assert len(calls) == 1


# ----------------------------------------------------------------------------- Hugging Face files


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """GPT-2-, BERT- and T5-style tokenizer.json files, trained here offline."""
    tk = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    root = tmp_path_factory.mktemp("hf")
    out = {}

    gpt2 = tk.Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet, show_progress=False
    )
    gpt2.train_from_iterator(CORPUS, trainer)

    bert = tk.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bert.normalizer = normalizers.BertNormalizer(lowercase=True)
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bert.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    )
    bert.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", bert.token_to_id("[CLS]")), ("[SEP]", bert.token_to_id("[SEP]"))],
    )

    t5 = tk.Tokenizer(models.Unigram())
    t5.pre_tokenizer = pre_tokenizers.Metaspace()
    t5.decoder = decoders.Metaspace()
    t5.train_from_iterator(
        CORPUS,
        trainers.UnigramTrainer(
            vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
        ),
    )

    for name, tok in (("gpt2", gpt2), ("bert", bert), ("t5", t5)):
        os.makedirs(root / name)
        out[name] = str(root / name / "tokenizer.json")
        tok.save(out[name])
    return out


def test_hf_gpt2_style(hf_files: dict[str, str]) -> None:
    tok = T.build("hf", hf_files["gpt2"])
    eot = tok._tok.token_to_id("<|endoftext|>")
    assert tok.name == "hf" and tok.vocab_size == 400
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (eot, eot, eot)
    assert (tok.unk_id, tok.mask_id, tok.cls_id, tok.sep_id) == (None, None, None, None)
    with pytest.raises(DataError, match="has no mask token"):
        tok.special_id("mask")
    for text in (*SAMPLES, UNSEEN):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode([eot, *tok.encode(text), eot]) == text


def test_hf_bert_style(hf_files: dict[str, str]) -> None:
    tok = T.load(os.path.dirname(hf_files["bert"]))  # a model directory loads as hf
    ids = {t: tok._tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    assert tok.special_ids == {
        "pad": ids["[PAD]"],
        "bos": ids["[CLS]"],
        "eos": ids["[SEP]"],
        "unk": ids["[UNK]"],
        "mask": ids["[MASK]"],
        "cls": ids["[CLS]"],
        "sep": ids["[SEP]"],
    }
    text = "alpha beta gamma delta 12"
    encoded = tok.encode(text).tolist()
    assert tok.cls_id not in encoded and tok.sep_id not in encoded  # no [CLS] ... [SEP] template
    assert tok.decode([tok.cls_id, *encoded, tok.sep_id, tok.pad_id]) == text
    assert tok.decode(tok.encode("naïve café")) == "naive cafe"  # BERT's normalizer strips accents
    assert tok.unk_id in tok.encode(UNSEEN).tolist()


def test_hf_t5_style_and_overrides(hf_files: dict[str, str], tmp_path) -> None:
    tok = T.build("hf", hf_files["t5"])
    ids = {t: tok._tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")}
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (ids["<pad>"], ids["</s>"], ids["<unk>"], ids["</s>"])
    assert tok.mask_id is None
    text = "alpha beta gamma naïve café"
    assert tok.decode(tok.encode(text)) == text
    # A special_tokens_map.json beside the file, then explicit special_tokens, take precedence.
    directory = tmp_path / "t5"
    directory.mkdir()
    with open(hf_files["t5"]) as src, open(directory / "tokenizer.json", "w") as dst:
        dst.write(src.read())
    with open(directory / "special_tokens_map.json", "w") as f:
        json.dump({"bos_token": {"content": "<pad>"}, "eos_token": "</s>"}, f)
    assert T.build("hf", str(directory)).bos_id == ids["<pad>"]
    assert T.build("hf", str(directory), special_tokens={"bos": "<unk>"}).bos_id == ids["<unk>"]


def tok_pad(style: str) -> str:
    return {"gpt2": "<|endoftext|>", "bert": "[PAD]", "t5": "<pad>"}[style]


@pytest.mark.parametrize("style", ("gpt2", "bert", "t5"))
def test_hf_save_load_pickle(hf_files: dict[str, str], style: str, tmp_path) -> None:
    tok = T.build("hf", hf_files[style], special_tokens={"pad": tok_pad(style)})
    tok.save(str(tmp_path))
    for other in (T.load(str(tmp_path)), T.build("hf", str(tmp_path)), pickle.loads(pickle.dumps(tok))):
        assert other.special_ids == tok.special_ids and other.vocab_size == tok.vocab_size
        for text in SAMPLES:
            assert other.encode(text).tolist() == tok.encode(text).tolist()


# ----------------------------------------------------------------------------- errors


def test_hf_errors(hf_files: dict[str, str]) -> None:
    with pytest.raises(DataError, match="not in its vocabulary"):
        T.build("hf", hf_files["bert"], special_tokens={"pad": "<nope>"})
    with pytest.raises(DataError, match="unknown roles"):
        T.build("hf", hf_files["bert"], special_tokens={"padding": "[PAD]"})
    with pytest.raises(DataError, match="unknown options"):
        T.build("hf", hf_files["bert"], lowercase=True)


def test_errors(tmp_path, trained_dirs: dict[str, str]) -> None:
    with pytest.raises(DataError, match="is not one of: byte, char, sentencepiece_unigram"):
        T.build("wordpiece")
    with pytest.raises(DataError, match="is not one of"):
        T.train("nope", CORPUS, None)
    with pytest.raises(DataError, match="no tokenizer.json in"):
        T.load(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="train it"):
        T.build("char")
    with pytest.raises(DataError, match="needs the path of a Hugging Face tokenizer.json"):
        T.build("hf")
    with pytest.raises(DataError, match="does not exist"):
        T.build("hf", str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="does not exist"):
        T.build("sentencepiece_bpe", str(tmp_path / "nope.model"))
    with pytest.raises(DataError, match="holds a 'char' tokenizer, not 'sentencepiece_bpe'"):
        T.build("sentencepiece_bpe", trained_dirs["char"])
    with pytest.raises(DataError, match="cannot be trained"):
        T.train("hf", CORPUS, None)
    with pytest.raises(DataError, match="training texts are empty"):
        T.train("sentencepiece_unigram", ["", "\n"], None, 100)
    with pytest.raises(DataError, match="training texts are empty"):
        T.train("char", [], None)
    with pytest.raises(DataError, match="SentencePiece training failed: Vocabulary size too high"):
        T.train("sentencepiece_bpe", ["ab ab"], None, 5000)
    with pytest.raises(DataError, match="fixed by jaxlm"):
        T.train("sentencepiece_bpe", CORPUS, None, 100, pad_id=3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        T.load(str(bad))
    (bad / "sentencepiece.model").write_bytes(b"garbage")
    (bad / "tokenizer.json").write_text(json.dumps({"jaxlm_tokenizer": "sentencepiece_bpe"}))
    with pytest.raises(DataError, match="is not a SentencePiece model"):
        T.load(str(bad))
    (bad / "tokenizer.json").write_text(json.dumps({"jaxlm_tokenizer": "char"}))
    with pytest.raises(DataError, match="no 'chars' list"):
        T.load(str(bad))
    (bad / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    with pytest.raises(DataError, match="has no 'model'"):
        T.build("hf", str(bad / "tokenizer.json"))
