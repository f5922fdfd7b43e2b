"""Fine-tuning recipes: the built-in code tasks and five catalog datasets, on BERT, GPT or T5.

Pretrain, then fine-tune from the pretrained workdir (the model section is the pretraining
config's, so the shapes match; keep the tokenizer too, byte-level by default):

    jaxlm train --config configs/bert.py:size=small --workdir runs/bert-small
    jaxlm train --config configs/finetune.py:task=code_topic,model=bert,size=small \\
        --workdir runs/bert-small-code_topic --config.checkpoint.init_from=runs/bert-small
    jaxlm eval --workdir runs/bert-small-code_topic

    jaxlm train --config configs/t5.py:size=small --workdir runs/t5-small
    jaxlm train --config configs/finetune.py:task=code_summary,model=t5,size=small \\
        --workdir runs/t5-small-code_summary --config.checkpoint.init_from=runs/t5-small

Drop ``init_from`` to train the same model from scratch. Arguments:

``task``  (default code_topic)
    ``code_topic`` (classification: a stdlib function -> its package), ``code_tokens`` (BIO
    tagging of Python tokens), ``code_qa`` (extractive QA: docstring line -> function name),
    ``code_summary`` (seq2seq: function -> docstring line): built from the standard library,
    no download (``jaxlm/data/builtin_tasks.py``). ``sst2`` (glue/sst2 sentiment),
    ``conll2003`` (NER), ``squad`` (SQuAD v1.1), ``wmt14_de_en`` (translation),
    ``cnn_dailymail`` (summarization): tfds catalog datasets, prepared once with e.g.
    ``tfds build glue/sst2 --data_dir=~/.cache/jaxlm/datasets --file_format=array_record``
    on a machine with network access (see the README's "Fine-tuning" section).
``model``  (default: bert for classification, tagging and QA; t5 for seq2seq)
    ``bert`` (configs/bert.py), ``gpt`` (configs/gpt.py: classification from the last token,
    seq2seq with the loss on the target part), ``t5`` (configs/t5.py, seq2seq only).
``size``  (default small)
    ``tiny`` (tests, seconds) or ``small`` (the CPU demo), matching the pretraining sizes.
"""

import os

from jaxlm import config_lib

# task: data source and name, objective, default model, and the task's lengths and options.
TASKS = {
    "code_topic": dict(source="builtin", name="builtin_code_topic", objective="classification", seq_len=256),
    "code_tokens": dict(source="builtin", name="builtin_code_tokens", objective="token_classification", seq_len=256),
    "code_qa": dict(source="builtin", name="builtin_code_qa", objective="qa", seq_len=256, max_question_len=96),
    "code_summary": dict(
        source="builtin",
        name="builtin_code_summary",
        objective="seq2seq",
        seq_len=256,
        targets_len=96,
        prefix="summarize: ",
    ),
    "sst2": dict(source="tfds", name="glue/sst2", objective="classification", seq_len=128),
    "conll2003": dict(source="tfds", name="conll2003", objective="token_classification", seq_len=192),
    "squad": dict(source="tfds", name="squad", objective="qa", seq_len=256, max_question_len=64),
    "wmt14_de_en": dict(
        source="tfds",
        name="wmt14_translate/de-en",
        objective="seq2seq",
        seq_len=256,
        targets_len=256,
        prefix="translate German to English: ",
    ),
    "cnn_dailymail": dict(
        source="tfds", name="cnn_dailymail", objective="seq2seq", seq_len=256, targets_len=128, prefix="summarize: "
    ),
}
MODELS = {"bert": "encoder_only", "gpt": "decoder_only", "t5": "encoder_decoder"}
SIZES = {
    # name: (num_steps, batch_size, lr, longest seq_len)
    "tiny": (20, 8, 1e-3, 128),
    "small": (300, 16, 3e-4, 256),
}
BUILTIN_EVAL_FRACTION = 0.1  # of the stdlib files held out: a few hundred validation examples per task


def get_config(arg: str | None = None):
    """The fine-tuning config of ``task=...,model=...,size=...`` (see the module docstring)."""
    args = config_lib.parse_arg(arg)
    task = args.pop("task", "code_topic")
    size = args.pop("size", "small")
    if task not in TASKS:
        raise config_lib.ConfigError(f"configs/finetune.py: task={task!r} is not one of: {', '.join(TASKS)}")
    spec = TASKS[task]
    objective = spec["objective"]
    model = args.pop("model", "t5" if objective == "seq2seq" else "bert")
    if model not in MODELS:
        raise config_lib.ConfigError(f"configs/finetune.py: model={model!r} is not one of: {', '.join(MODELS)}")
    if size not in SIZES:
        raise config_lib.ConfigError(f"configs/finetune.py: size={size!r} is not one of: {', '.join(SIZES)}")
    if args:
        raise config_lib.ConfigError(
            f"configs/finetune.py: unknown argument {next(iter(args))!r}; use task=..., model=..., size=..."
        )
    fits = [m for m, kind in MODELS.items() if kind in config_lib.OBJECTIVE_KINDS[objective]]
    if model not in fits:
        raise config_lib.ConfigError(
            f"configs/finetune.py: task={task} ({objective}) trains model={'|'.join(fits)}, not {model}"
        )

    # The pretraining config of the same model and size: identical architecture for init_from.
    c = config_lib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{model}.py:size={size}"))
    steps, batch, lr, longest = SIZES[size]
    c.data.source = spec["source"]
    c.data.name = spec["name"]
    c.data.objective = objective
    c.data.seq_len = min(spec["seq_len"], c.model.max_len, longest)  # learned positions stop at max_len
    c.data.batch_size = batch
    if spec["source"] == "builtin":
        c.data.eval_fraction = BUILTIN_EVAL_FRACTION
    c.task.head = "auto"
    c.task.prefix = spec.get("prefix", "") if model == "t5" else ""
    c.task.targets_len = min(spec.get("targets_len", 0), longest)
    if model == "gpt" and objective == "seq2seq":  # source and target share one row
        c.task.targets_len = min(c.task.targets_len, c.data.seq_len // 2)
    c.task.max_question_len = min(spec.get("max_question_len", c.task.max_question_len), c.data.seq_len // 2)
    if objective == "seq2seq":
        c.decode.max_new_tokens = c.task.targets_len or c.data.seq_len
    c.train.num_steps = steps
    c.optim.lr = lr
    c.optim.warmup_steps = max(1, steps // 10)
    c.optim.schedule = "linear"
    return c
