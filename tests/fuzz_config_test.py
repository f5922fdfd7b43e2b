"""Fuzzed configs and command lines never crash: validation succeeds or raises one UserError line.

Property-based (hypothesis): random overrides for every key of ``base_config()`` (enumerated
when the test runs, so sections added later are covered too) with wrong types, negative,
zero, huge, NaN and infinite numbers, empty strings and unknown names; random values of any
type in a saved ``config.json``; and random argument lists for every subcommand of the CLI
parser, run through ``cli.execute`` with the commands themselves stubbed out. Only the
validator and the parser run (no model is built), so a few hundred examples take seconds.

``JAXLM_FUZZ_EXAMPLES=5000`` explores longer (the default run is derandomized: the same
examples every time, so CI cannot flake on a new draw).
"""

import argparse
import json
import math
import os

import ml_collections
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxlm import cli, config_lib, distributed
from jaxlm.common_types import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = int(os.environ.get("JAXLM_FUZZ_EXAMPLES", "150"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="JAXLM_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LEAVES = sorted(config_lib.flatten(config_lib.base_config().to_dict()))
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in LEAVES if "." in k})
CONFIG_FILES = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))

# Texts that have broken parsers and validators elsewhere.
NASTY = [
    "",
    " ",
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "8",
    "16",
    "-5",
    "1e9",
    "1e20",
    "1e400",
    "-1e400",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e-30",
    "0.5",
    "1.5",
    "-0.5",
    "0.999999",
    "true",
    "false",
    "yes",
    "none",
    "None",
    "null",
    "abc",
    "[]",
    "()",
    "(1, 2)",
    "[1, 'a']",
    "{}",
    "{'a': 1}",
    "'x'",
    '"x"',
    "1_000",
    "0x10",
    "9" * 40,
    ",",
    ",,",
    "a,b",
    "data",
    "fsdp,tensor",
    "model",
    "auto",
    "on",
    "off",
    "gpt",
    "rotary",
    "\x00",
    "~",
    "/",
    "/nonexistent/x",
    "configs/gpt.py",
    "\u00e9\u4e2d",
    "1 2",
    "--",
    "=",
    "a=b",
]


def _value_text(key):
    options = [st.sampled_from(NASTY), st.text(max_size=10)]
    options.append(st.integers(-(10**25), 10**25).map(str))
    options.append(st.floats(allow_nan=True, allow_infinity=True).map(repr))
    if key in config_lib.CHOICES:
        options.append(st.sampled_from(config_lib.CHOICES[key]))
    return st.one_of(*options)


override = st.one_of(
    st.sampled_from(LEAVES).flatmap(lambda k: st.tuples(st.just(k), _value_text(k))),
    # Sections, unknown keys and malformed paths.
    st.tuples(
        st.sampled_from(SECTIONS + ["", ".", "nope", "model.nope", "model..kind", "mesh.shape.model"]), st.text()
    ),
)


def _assert_one_line(error: BaseException, keys=()) -> None:
    message = str(error)
    assert isinstance(error, UserError), repr(error)
    assert message.strip() and "\n" not in message, repr(message)
    if not any(k.startswith(".") or ".." in k for k in keys):  # else the user typed it
        assert "config.." not in message, message


def _start_config(index: int) -> ml_collections.ConfigDict:
    if index == 0:
        return config_lib.base_config()
    return config_lib.load_config_file(os.path.join(REPO, "configs", CONFIG_FILES[index - 1]))


@SETTINGS
@given(start=st.integers(0, len(CONFIG_FILES)), overrides=st.lists(override, min_size=1, max_size=4))
def test_random_overrides_validate_or_raise_one_user_error(start, overrides):
    try:
        config = _start_config(start)
    except UserError:
        return  # a config file that needs an argument
    try:
        config_lib.apply_overrides(config, dict(overrides))
        config_lib.validate(config)
    except UserError as e:
        _assert_one_line(e, [k for k, _ in overrides])


def _any_value():
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**30), 10**30),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
        st.sampled_from(NASTY),
    )
    return st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


@SETTINGS
@given(changes=st.lists(st.tuples(st.sampled_from(LEAVES + SECTIONS), _any_value()), min_size=1, max_size=4))
def test_any_value_in_a_saved_config_json_is_one_user_error(changes):
    raw = config_lib.base_config().to_dict()
    for key, value in changes:
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part] if isinstance(node.get(part), dict) else node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value
    try:
        text = json.dumps(raw)
    except ValueError:
        return
    for attempt in (lambda: config_lib.validate(config_lib.from_json(text)), lambda: config_lib.validate(raw)):
        try:
            attempt()
        except UserError as e:
            _assert_one_line(e)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


SUBCOMMANDS = _subcommands()


def _option_tokens(name):
    options = []
    for action in SUBCOMMANDS[name]._actions:
        options += [o for o in action.option_strings if o not in ("-h", "--help")]
    return options


CONFIG_SPECS = [
    "configs/gpt.py:size=tiny",
    "configs/gpt.py:size=huge",
    "configs/gpt.py:oops",
    "configs/gpt.py:size=tiny,x=1",
    "nope.py",
    "configs",
    "/dev/null",
] + [f"configs/{f}" for f in CONFIG_FILES]


def _argv(name):
    token = st.one_of(
        st.sampled_from(_option_tokens(name)),
        st.sampled_from(NASTY),
        st.sampled_from(CONFIG_SPECS).map(lambda s: os.path.join(REPO, s) if s.startswith("configs") else s),
        st.sampled_from(LEAVES).map(lambda k: f"--config.{k}"),
        st.tuples(st.sampled_from(LEAVES), _value_text("")).map(lambda kv: f"--config.{kv[0]}={kv[1]}"),
        st.text(max_size=8),
    )
    return st.lists(token, max_size=8).map(lambda rest: [name, *rest])


@pytest.fixture
def stubbed_commands(monkeypatch, tmp_path):
    """The commands do nothing: only parsing, config loading and validation run."""
    from jaxlm.main import convert, evaluate, generate, info, train

    calls = []
    monkeypatch.setattr(train, "run", lambda *a, **k: calls.append("train") or {})
    monkeypatch.setattr(info, "run", lambda *a, **k: calls.append("info"))
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: calls.append("eval") or {})
    monkeypatch.setattr(generate, "run", lambda *a, **k: calls.append("generate") or [])
    monkeypatch.setattr(convert, "run_from_hf", lambda *a, **k: calls.append("convert"))
    monkeypatch.setattr(convert, "run_to_hf", lambda *a, **k: calls.append("convert"))
    monkeypatch.setattr(distributed, "_join", lambda *a, **k: None)  # never wait for other processes
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_random_arguments_exit_0_or_2_with_one_line(name, stubbed_commands, capsys):
    @SETTINGS
    @given(argv=_argv(name))
    def check(argv):
        capsys.readouterr()
        try:
            status = cli.execute(argv)
        except SystemExit as e:  # argparse's --help / --version
            status = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert status in (0, 2), (argv, status, err)
        if status == 2:
            assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)

    check()


def test_the_fuzzer_reaches_every_section_and_subcommand():
    # New sections (task, peft, gan, ...) are fuzzed as soon as base_config() has them.
    assert {"model", "data", "optim", "train", "checkpoint", "mesh", "decode"} <= {s.split(".")[0] for s in SECTIONS}
    assert {"train", "eval", "generate", "info", "convert"} <= set(SUBCOMMANDS)
    assert not math.isnan(EXAMPLES)
