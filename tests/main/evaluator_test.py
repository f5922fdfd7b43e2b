"""Which rows an evaluation reads: a capped one samples the whole split, a whole pass reads every row once."""

import re

from jaxlm import config_lib
from jaxlm.data.sources import ListSource
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.main import evaluator, task_data

# 40 documents of two 33-byte rows each (seq_len 32): a batch of 8 rows holds 4 documents.
DOCS = [f"<{i:02d}>" * 16 for i in range(40)]


def _batches(tiny_config, *, sample: bool, batches: int | None = None) -> list[dict]:
    tiny_config.data.seq_len = 32
    cfg = config_lib.validate(tiny_config)
    it = evaluator._one_pass(cfg, ListSource(DOCS), ByteTokenizer(), 8, task_data.resolve(cfg), sample=sample)
    return [b for _, b in zip(range(batches or 10**6), it)]


def _rows(tiny_config, *, sample: bool, batches: int | None = None) -> list[str]:
    return [
        ByteTokenizer().decode(r) for b in _batches(tiny_config, sample=sample, batches=batches) for r in b["inputs"]
    ]


def _documents(rows: list[str]) -> set[int]:
    return {int(d) for row in rows for d in re.findall(r"<(\d\d)>", row)}


def test_capped_evaluation_samples_documents_from_the_whole_split(tiny_config):
    first = _documents(_rows(tiny_config, sample=False, batches=2))
    sampled = _documents(_rows(tiny_config, sample=True, batches=2))
    assert max(first) < 10  # source order: the first documents only
    assert len(sampled) >= 8 and max(sampled) >= 20 and min(sampled) < 20, sampled
    # The same rows at every evaluation (the order is fixed by config.data.seed).
    assert _rows(tiny_config, sample=True, batches=2) == _rows(tiny_config, sample=True, batches=2)


def test_a_sampled_pass_reads_every_document_once_as_source_order_does(tiny_config):
    ordered, sampled = _batches(tiny_config, sample=False), _batches(tiny_config, sample=True)
    rows = [ByteTokenizer().decode(r) for b in sampled for r in b["inputs"]]
    assert _documents(rows) == set(range(40))
    # 40 documents of 64 bytes + eos = 2,600 tokens: 78 full rows of 33 and one partial row, as many
    # predicted tokens in either order.
    weight = [sum(float(b["weights"].sum()) for b in bs) for bs in (ordered, sampled)]
    assert len(rows) == sum(len(b["inputs"]) for b in ordered) and weight[0] == weight[1], weight
