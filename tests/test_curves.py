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
