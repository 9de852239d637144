"""The learning-curve diagnosis on synthetic curves of each kind, and the plot / CLI."""
import json

import numpy as np

from jaxtune.train import curves


def series(values, every=10):
    return [(i * every, float(v)) for i, v in enumerate(values)]


def test_underfit_flat():
    verdict = curves.diagnose(series(3.0 + 0.001 * np.sin(np.arange(40))), series([3.0, 3.0, 3.0], 130))
    assert verdict["diagnosis"] == "underfit" and "flat" in verdict["reason"]


def test_underfit_still_falling():
    verdict = curves.diagnose(series(3.0 * np.exp(-np.arange(40) / 30)), series([3.0, 2.0, 1.2], 130))
    assert verdict["diagnosis"] == "underfit" and "still falling" in verdict["reason"]


def test_overfit_reports_the_best_step():
    train = series(2.0 * np.exp(-np.arange(40) / 5) + 0.1)
    evals = [(0, 2.5), (100, 1.2), (200, 1.0), (300, 1.1), (390, 1.3)]
    verdict = curves.diagnose(train, evals)
    assert verdict["diagnosis"] == "overfit" and verdict["best_step"] == 200 and "step 200" in verdict["reason"]


def test_well_fit():
    train = series(1.0 + np.exp(-np.arange(60) / 6))
    evals = [(0, 2.2), (200, 1.15), (400, 1.12), (590, 1.11)]
    verdict = curves.diagnose(train, evals)
    assert verdict["diagnosis"] == "well-fit" and verdict["best_step"] == 590


def test_plot_and_cli(tmp_path, capsys):
    from jaxtune.cli import main

    events = [{"step": s, "loss": v, "lr": 1e-3} for s, v in series(1.0 + np.exp(-np.arange(30) / 4))]
    events += [{"step": 0, "eval_loss": 2.1}, {"step": 290, "eval_loss": 1.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert main(["curves", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "diagnosis: well-fit" in out and (tmp_path / "curves.png").stat().st_size > 10_000
    assert main(["curves", str(tmp_path / "nothing")]) == 2


def test_learning_rate_collapse_is_too_high_not_underfit(tmp_path, capsys):
    """Loss pinned at ln(vocab) with vanishing gradients after a good start: the learning rate blew the
    model to a uniform guess. Plain 'underfit' would tell the user to raise it."""
    from jaxtune.cli import main

    vocab = 49152
    losses = np.concatenate([[3.2, 2.9, 2.7], np.full(20, np.log(vocab)) + 1e-4 * np.arange(20)])
    norms = [1.0, 2.0, 40.0] + [0.0] * 20
    assert curves.diagnose(series(losses), [])["diagnosis"] == "underfit"  # what it said before
    verdict = curves.diagnose(series(losses), [], grad_norms=norms, vocab_size=vocab)
    assert verdict["diagnosis"] == "collapsed" and "too high" in verdict["reason"]
    healthy = curves.diagnose(series(losses), [], grad_norms=[1.0] * len(losses), vocab_size=vocab)
    assert healthy["diagnosis"] != "collapsed"  # a model at chance that still learns is not collapsed

    events = [{"step": s, "loss": v, "grad_norm": g} for (s, v), g in zip(series(losses), norms)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "config.json").write_text(json.dumps({"resolved": {"vocab_size": vocab}}))
    assert main(["curves", str(tmp_path)]) == 0
    assert "diagnosis: collapsed" in capsys.readouterr().out
