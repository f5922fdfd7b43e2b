import os

import pytest

from jaxlm import config_lib
from jaxlm.common_types import CheckpointError
from jaxlm.data import tokenizers
from jaxlm.main import generate, train


@pytest.mark.parametrize("name", ["char", "sentencepiece_bpe"])
def test_trained_tokenizer_is_saved_and_reused(name, tiny_config, text_corpus, tmp_path):
    c = tiny_config
    c.data.source = "files"
    c.data.files = text_corpus
    c.data.tokenizer = name
    c.data.tokenizer_vocab_size = 120 if name != "char" else 0
    c.train.num_steps = 4
    c.train.eval_steps = 1
    cfg = config_lib.validate(c)
    workdir = str(tmp_path / "w")
    train.run(cfg, workdir)
    tok = tokenizers.load(workdir)
    assert tok.name == name and os.path.exists(os.path.join(workdir, "tokenizer.json"))
    texts = generate.run(config_lib.validate(c), workdir, "the quick")
    assert texts[0].startswith("the quick")
    c.data.tokenizer = "byte"
    with pytest.raises(CheckpointError, match="tokenizer"):
        train.run(config_lib.validate(c), workdir)
