"""What a config's objective needs from its data: the batch builder's options and the task's label names.

Programs (train, eval, predict) build batches through ``data.pipeline.OBJECTIVES[objective]``
with the options from :func:`objective_options`, and size and name a task head from
:func:`labels`. Label values come from ``config.task.labels``, else the dataset (a catalog
dataset's ``ClassLabel`` names, a built-in task's label set), else ``0..num_labels-1``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxlm.common_types import ConfigError
from jaxlm.config_lib import Config
from jaxlm.data import builtin_tasks, catalog


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The batch builder's keyword options and the label names of a task (empty for LM objectives)."""

    options: dict[str, Any]
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        """Classes of the task head (0 for objectives without one)."""
        return len(self.label_names)


def _dataset_options(config: Config) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Options and label names the data source itself defines (catalog or built-in task)."""
    d = config.data
    if d.source == "tfds" and d.name and d.objective in ("classification", "token_classification"):
        try:
            catalog.lookup(d.name)
        except Exception:  # noqa: BLE001  (a tfds name outside jaxlm's catalog: the config must name the labels)
            return {}, ()
        options = catalog.objective_options(d.name, d.data_dir)
        if d.objective == "classification":
            names = catalog.label_names(d.name, d.data_dir).get("label", [])
            return options, tuple(str(n) for n in names)
        return options, tuple(str(v) for v in options.get("labels", ()))
    if d.source == "builtin" and d.name:
        options = dict(builtin_tasks.builtin_task_options(d.name))
        return options, tuple(str(v) for v in options.get("labels", ()))
    return {}, ()


def lm_packing(config: Config) -> str:
    """``config.data.packing`` with ``'auto'`` resolved: random windows over local text, concat for catalog streams.

    ``windows`` holds the tokenized training text in memory (nanoGPT's recipe: its loss per
    token, see ``bench/recipe_parity.py``); a catalog dataset is streamed instead.
    """
    if config.data.packing != "auto":
        return config.data.packing
    return "concat" if config.data.source == "tfds" else "windows"


def resolve(config: Config) -> TaskData:
    """The objective's builder options and label names for ``config`` (one-line errors when labels are unknown)."""
    d, t = config.data, config.task
    if d.objective == "causal_lm":
        return TaskData({"packing": lm_packing(config), "long_documents": d.long_documents}, ())
    if d.objective == "masked_lm":
        return TaskData({"long_documents": d.long_documents}, ())
    if d.objective in ("nsp", "span_corruption"):
        return TaskData({}, ())
    if d.objective == "seq2seq":
        options = {
            "targets_len": t.targets_len,
            "prefix": t.prefix,
            "decoder_only": config.model.kind != "encoder_decoder",
        }
        if config.model.kind != "encoder_decoder" and not t.targets_len:
            options["targets_len"] = max(2, d.seq_len // 4)  # one row holds source and target
        return TaskData(options, ())
    if d.objective == "qa":
        return TaskData({"max_question_len": t.max_question_len, "impossible": t.qa_impossible}, ())
    # classification / token_classification: the label set.
    options, names = _dataset_options(config)
    if t.label_list:
        names = tuple(t.label_list)
        options["labels"] = list(t.label_list)
    elif not names and t.num_labels:
        names = tuple(str(i) for i in range(t.num_labels))
        options["labels"] = list(range(t.num_labels))
    if t.num_labels == 1 and d.objective == "classification":  # regression: float targets, one output
        return TaskData(options | {"labels": None}, ("value",))
    if not names:
        raise ConfigError(
            f"config.data.objective={d.objective!r} needs its labels: set config.task.labels='neg,pos' "
            "(values in class order) or config.task.num_labels=N for labels 0..N-1"
        )
    if t.num_labels and t.num_labels != len(names):
        raise ConfigError(
            f"config.task.num_labels={t.num_labels} but the dataset has {len(names)} labels ({', '.join(names[:8])}); "
            "set num_labels=0 to follow the dataset"
        )
    return TaskData(options, names)


def with_resolved_labels(config: Config, data: TaskData) -> Config:
    """``config`` with the task's label count (and label values, when they are the names) filled in.

    Written into the workdir's ``config.json``, so ``eval``, ``predict`` and ``convert --to hf``
    size the head and name the labels without opening the dataset again.
    """
    if config.data.objective not in ("classification", "token_classification") or not data.label_names:
        return config
    task = config.task
    values = data.options.get("labels")
    same = values is not None and [str(v) for v in values] == list(data.label_names)
    labels = (
        ",".join(data.label_names) if same and not task.labels and "," not in "".join(data.label_names) else task.labels
    )
    num = task.num_labels or (0 if labels else len(data.label_names))
    return dataclasses.replace(config, task=dataclasses.replace(task, labels=labels, num_labels=num))
