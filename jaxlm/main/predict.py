"""``jaxlm predict``: labels, tags, answer spans or generated targets for new inputs, JSONL in and out.

Each input line is one record with the fields the data config uses (the canonical names
``text``/``pair``, ``tokens``, ``question``/``context``, ``source``, or the dataset's own names
that ``config.data.fields`` maps onto them). Each output line is the input record with the
prediction added under the name of the field the task trains on: ``label`` (the label value;
a number for regression), ``tags`` (one per word of ``tokens``), ``answers``
(``{"text": [...], "answer_start": [...]}``, SQuAD's layout) or ``target``.

Seq2seq targets are greedy, or the best beam with ``--config.decode.beam_size=K`` (with
``decode.length_penalty`` and ``decode.early_stopping``). Rows are built by the same
transforms as training (with placeholder gold answers) and scored by the objective's eval
step, so prediction and evaluation cannot disagree. A record that is not
valid JSON, lacks a field, has a field of the wrong type or does not fit ``config.data.seq_len``
is a one-line error naming its line; the output is written only when every line succeeded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import beam_search, sharding
from jaxlm.common_types import DataError, UserError
from jaxlm.config_lib import Config
from jaxlm.data import objectives_tasks
from jaxlm.data.local_files import parse_fields
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.main import evaluator, generate, restore, task_data

PREDICTED_FIELD = {"classification": "label", "token_classification": "tags", "qa": "answers", "seq2seq": "target"}
INPUT_FIELDS = {
    "classification": ("text",),
    "token_classification": ("tokens",),
    "qa": ("question", "context"),
    "seq2seq": ("source",),
}


def _read(path: str, fields: dict[str, str], objective: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise UserError(f"--input {path}: no such file; give a JSONL file with one record per line")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: a record must be a JSON object, got {type(record).__name__}")
            for name in INPUT_FIELDS[objective]:
                key = fields.get(name, name)
                want = list if name == "tokens" else str
                if key not in record:
                    raise DataError(f"{path}:{line_no}: no field {key!r} (it has: {', '.join(record) or 'none'})")
                if not isinstance(record[key], want) or (
                    want is list and not all(isinstance(w, str) for w in record[key])
                ):
                    kind = "a list of strings" if want is list else "a string"
                    raise DataError(f"{path}:{line_no}: field {key!r} must be {kind}")
            records.append((line_no, record))
    if not records:
        raise DataError(f"--input {path} has no records")
    return records


def _canonical(record: dict[str, Any], fields: dict[str, str], names: tuple[str, ...]) -> dict[str, Any]:
    return {n: record[fields.get(n, n)] for n in names if fields.get(n, n) in record}


def _row_builder(config: Config, tokenizer: Tokenizer, data: task_data.TaskData) -> Callable[[dict], dict]:
    """Record (canonical names) -> model row, with placeholder gold answers; raises on a row that does not fit."""
    d, objective = config.data, config.data.objective
    n = d.seq_len
    if objective == "classification":
        cls, sep = tokenizer.special_id("cls"), tokenizer.special_id("sep")

        def classification(r: dict) -> dict:
            a = tokenizer.encode(r["text"])
            b = tokenizer.encode(r["pair"]) if "pair" in r else None
            need = len(a) + 2 + (len(b) + 1 if b is not None else 0)
            if need > n:
                raise DataError(f"is {need} tokens with [cls]/[sep]; config.data.seq_len={n}")
            row = objectives_tasks.encoder_row(a, b, cls=cls, sep=sep, pad=tokenizer.pad_id, seq_len=n)
            return row | {"label": np.float32(0) if data.options.get("labels", ()) is None else np.int32(0)}

        return classification
    if objective == "token_classification":
        tagger = objectives_tasks.TaggingRow(tokenizer, seq_len=n, labels=data.options["labels"])

        def tagging(r: dict) -> dict:
            words = r["tokens"]
            row = tagger.map(
                {"record": {"tokens": words, "tags": [data.options["labels"][0]] * len(words)}, "index": 0}
            )
            if words and len(words) - 1 not in set(row["word_ids"].tolist()):
                raise DataError(f"has {len(words)} words, more than fit in config.data.seq_len={n}")
            return row

        return tagging
    if objective == "qa":
        qa = objectives_tasks.QARow(
            tokenizer, seq_len=n, max_question_len=config.task.max_question_len, impossible="mark"
        )

        def question(r: dict) -> dict:
            need = min(len(tokenizer.encode(r["question"])), config.task.max_question_len) + 3
            need += len(tokenizer.encode(r["context"]))
            if need > n:
                raise DataError(f"question and context are {need} tokens; config.data.seq_len={n}")
            record = {"question": r["question"], "context": r["context"], "answers": {"text": [], "answer_start": []}}
            return qa.map({"record": record, "index": 0})

        return question
    row = objectives_tasks.Seq2SeqRow(
        tokenizer,
        inputs_length=n,
        targets_length=data.options["targets_len"] or n,
        prefix=config.task.prefix,
        decoder_only=data.options["decoder_only"],
    )

    def seq2seq(r: dict) -> dict:
        room = n - 1 - (data.options["targets_len"] if data.options["decoder_only"] else 0)
        need = len(tokenizer.encode(config.task.prefix + r["source"]))
        if need > room:
            raise DataError(f"source is {need} tokens; at most {room} fit (config.data.seq_len={n})")
        return row.map({"record": {"source": r["source"], "target": ""}, "index": 0})

    return seq2seq


def _answer(record: dict, ids: np.ndarray, start: int, end: int, tokenizer: Tokenizer) -> dict:
    if start == 0 and end == 0:
        return {"text": [], "answer_start": []}
    text = tokenizer.decode([int(t) for t in ids[start : end + 1]])
    return {"text": [text], "answer_start": [record["context"].find(text)]}


def _beam_targets(
    exp: Any, params: Any, tokenizer: Tokenizer, config: Config, rows: list[dict], decoder_only: bool
) -> np.ndarray:
    """Seq2seq targets by beam search (``config.decode.beam_size > 1``): the best beam of each row, ``[R, N]``.

    One row at a time, since a decoder-only model's prompts (its source parts) differ in length;
    the search itself is :func:`jaxlm.beam_search.beam_search` over the model's cache, as
    ``jaxlm generate`` runs it.
    """
    d, n = config.decode, evaluator.eval_options(config)["num_tokens"]
    settings = dict(
        beam_size=d.beam_size,
        max_new_tokens=n,
        eos_id=tokenizer.eos_id,
        length_penalty=d.length_penalty,
        early_stopping=d.early_stopping,
        pad_id=tokenizer.pad_id,
    )
    k, max_len = d.beam_size, exp.model_cfg.max_len

    @jax.jit
    def encoder_decoder(params: Any, inputs: jax.Array) -> jax.Array:
        encoded = exp.model.apply({"params": params}, inputs, method="encode")
        step = generate.make_seq2seq_step_fn(
            exp.model, params, jnp.repeat(encoded, k, axis=0), jnp.repeat(inputs, k, axis=0)
        )
        start = jnp.zeros((1, 1), jnp.int32)  # the decoder starts from id 0, as in training
        return beam_search.beam_search(step, generate.cache_fn(exp.model, max_len, inputs.shape[1]), start, **settings)[
            0
        ]

    @jax.jit
    def decoder(params: Any, prompt: jax.Array) -> jax.Array:
        step = generate.make_step_fn(exp.model, params)
        return beam_search.beam_search(step, generate.cache_fn(exp.model, max_len), prompt, **settings)[0]

    out = np.zeros((len(rows), n), np.int32)
    for i, row in enumerate(rows):
        if decoder_only:
            prompt_len = int(np.argmax(row["weights"] > 0)) + 1  # source and its eos
            tokens = decoder(params, jnp.asarray(row["inputs"][None, :prompt_len], jnp.int32))
        else:
            length = int(row["inputs_segment_ids"].sum())
            tokens = encoder_decoder(params, jnp.asarray(row["inputs"][None, :length], jnp.int32))
        out[i] = np.asarray(tokens)[0, 0, :n]
    return out


def run(config: Config, workdir: str, input_path: str, output_path: str) -> int:
    """Predict for every record of ``input_path`` and write ``output_path``; returns the number of records."""
    objective = config.data.objective
    if objective not in PREDICTED_FIELD:
        raise UserError(
            f"jaxlm predict needs a fine-tuned task; config.data.objective={objective!r} is not one of: "
            f"{', '.join(PREDICTED_FIELD)} (use jaxlm generate for language models)"
        )
    parent = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(parent):
        raise UserError(f"--output {output_path}: its directory {parent} does not exist; create it first")
    fields = parse_fields(config.data.fields) or {}
    records = _read(input_path, fields, objective)
    exp, params, tokenizer, _ = restore.open_trained(config, workdir)
    data = task_data.resolve(config)
    build = _row_builder(config, tokenizer, data)
    rows = []
    for line_no, record in records:
        try:
            rows.append(build(_canonical(record, fields, INPUT_FIELDS[objective] + ("pair",))))
        except DataError as e:
            raise DataError(f"{input_path}:{line_no}: {e}") from None
    batch_size = config.data.batch_size
    eval_fn = evaluator.make_eval_fn(exp)
    outputs: dict[str, list[np.ndarray]] = {}
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
            batch = evaluator.pad_batch(batch, batch_size)
            _, out = eval_fn(params, sharding.host_to_global(batch, exp.mesh, exp.rules))
            for k, v in jax.device_get(out).items():
                outputs.setdefault(k, []).append(np.asarray(v)[: len(chunk)])
    out = {k: np.concatenate(v) for k, v in outputs.items()}
    if objective == "seq2seq" and config.decode.beam_size > 1:
        out["generated"] = _beam_targets(exp, params, tokenizer, config, rows, data.options["decoder_only"])
    key = fields.get(PREDICTED_FIELD[objective], PREDICTED_FIELD[objective])
    lines = []
    for i, (_, record) in enumerate(records):
        r = _canonical(record, fields, INPUT_FIELDS[objective])
        if objective == "classification":
            pred = out["pred"][i]
            value: Any = float(pred) if data.options.get("labels", ()) is None else data.label_names[int(pred)]
        elif objective == "token_classification":
            firsts = np.flatnonzero(rows[i]["weights"] > 0)
            value = [data.label_names[int(out["pred"][i][p])] for p in firsts]
        elif objective == "qa":
            value = _answer(r, rows[i]["inputs"], int(out["pred_start"][i]), int(out["pred_end"][i]), tokenizer)
        else:
            tokens = []
            for t in out["generated"][i]:
                if t == tokenizer.eos_id:
                    break
                tokens.append(int(t))
            value = tokenizer.decode(tokens)
        lines.append(json.dumps(record | {key: value}, ensure_ascii=False))
    tmp = output_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, output_path)
    return len(lines)
