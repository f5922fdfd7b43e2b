"""``jaxlm plot``: curves of several workdirs from their metrics.jsonl, and one-line errors."""

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from jaxlm import cli  # noqa: E402
from jaxlm.main import plot  # noqa: E402


def _workdir(path, records, tail=""):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return str(path)


def test_reads_metrics_resumes_and_gaps(tmp_path):
    records = [
        {"step": 10, "time": 1.0, "loss": 3.0, "lr": 1e-3},
        {"step": 10, "time": 2.0, "eval_loss": 3.5, "impl": "sacrebleu 2.4"},
        {"step": 20, "time": 3.0, "loss": "nan"},
        {"step": 20, "time": 4.0, "loss": 2.0},  # resumed: the later record of a step counts
    ]
    w = _workdir(tmp_path / "a", records, tail='{"step": 30, "lo')  # killed mid-line
    series = plot.read_series(w)
    assert set(series) == {"loss", "eval_loss", "lr"}
    assert series["loss"] == {10: 3.0, 20: 2.0}
    assert plot.metric_order(set(series)) == ["loss", "eval_loss", "lr"]
    assert np.isnan(plot.read_series(_workdir(tmp_path / "b", records[2:3]))["loss"][20])


def test_cli_draws_one_line_per_workdir(tmp_path, capsys):
    a = _workdir(tmp_path / "run_a", [{"step": s, "loss": 4.0 / s, "eval_loss": 5.0 / s} for s in range(1, 40)])
    b = _workdir(tmp_path / "run_b", [{"step": s, "loss": 3.0 / s, "accuracy": s / 40} for s in range(1, 40)])
    out = tmp_path / "figs" / "curves.png"
    assert cli.execute(["plot", a, b, "--out", str(out)]) == 0
    assert "loss, eval_loss, accuracy" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from matplotlib.figure import Figure

    # The figure itself: panels and the lines in them (drawn here through the same function).
    drawn = {}
    original = Figure.savefig
    Figure.savefig = lambda fig, *_a, **_k: drawn.setdefault("fig", fig)
    try:
        plot.run([a, b], str(out))
    finally:
        Figure.savefig = original
    axes = [ax for ax in drawn["fig"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "eval_loss", "accuracy"]
    assert [len(ax.lines) for ax in axes] == [2, 1, 1]
    assert [line.get_label() for line in axes[0].lines] == ["run_a", "run_b"]
    np.testing.assert_allclose(axes[0].lines[1].get_ydata(), [3.0 / s for s in range(1, 40)])


def test_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    blank = _workdir(tmp_path / "blank", [])
    labels_only = _workdir(tmp_path / "labels", [{"step": 1, "impl": "x"}])
    good = _workdir(tmp_path / "good", [{"step": 1, "loss": 1.0}])
    broken = _workdir(tmp_path / "broken", [{"step": 1, "loss": 1.0}], tail="{oops\n" + json.dumps({"step": 2}) + "\n")
    cases = [
        ([str(empty)], "has no metrics.jsonl"),
        ([str(blank)], "holds no metrics yet"),
        ([str(labels_only)], "holds no metrics yet"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([good, str(empty)], "has no metrics.jsonl"),
        ([broken], "line 2, is not JSON"),
        ([good, "--metrics", "bleu"], "logged: loss"),
        ([good, "--out", str(tmp_path / "x.nope")], "unknown image format"),
        ([good, "--out", str(tmp_path)], "is a directory"),
    ]
    for args, message in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "o.png")]
        assert cli.execute(["plot", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    assert cli.execute(["plot", "--out", str(tmp_path / "o.png")]) == 2  # no workdir at all
