"""Fit `jaxtune estimate`'s constants for a compiler (estimate.CALIBRATIONS) on that compiler's own
memory figures, and print each run's estimate / compiler ratio before and after.

    python bench/calibrate.py --platform tpu configs/*.py --topology v4-8 --topology v4-32 ...
    python bench/calibrate.py --platform tpu --figures bench/tpu_figures.json   # the figures of the docs' tables

Each (config, topology) is compiled by `jaxtune compile`'s code (answered from its cache when the table
was made before: lowering only). The estimate is linear in each constant within its two phases
(activations + max(loss, one layer's backward)), so each run is decomposed once, by estimating it with
one constant at a time set to 1, and the fit is a grid search for the smallest worst-case error, with
underestimates (which say a run fits when it does not) counted 1.5x.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np

CONSTANTS = ("residuals_kept", "logit_copies", "layer_cotangents", "blocked_score_copies", "tied_copies",
             "largest_kernel_copies", "layer_kernels_f32", "gathered_layers")
GRID = {
    "residuals_kept": np.round(np.arange(0.5, 1.21, 0.05), 2),
    "logit_copies": np.array([2.0]),
    "layer_cotangents": np.round(np.arange(0.0, 1.51, 0.05), 2),
    "blocked_score_copies": np.array([0.0, 0.25, 0.5, 1.0, 1.5]),
    "tied_copies": np.array([0.0, 1.0, 2.0]),
    "largest_kernel_copies": np.array([0.0, 1.0, 2.0]),
    "layer_kernels_f32": np.arange(0.0, 2.01, 0.25),
    "gathered_layers": np.array([0.0, 1.0, 2.0]),
}


def decompose(cfg, target, platform: str) -> dict:
    """The estimate of cfg on target as fixed bytes + per-constant coefficients, per phase."""
    from jaxtune import estimate as est

    def run(**values):
        cal = est.Calibration("fit", **{name: values.get(name, 0.0) for name in CONSTANTS})
        saved = est.CALIBRATIONS.get(platform)
        est.CALIBRATIONS[platform] = cal
        try:
            e = est.estimate(cfg, len(target.devices), platform=platform, capacity=target.chip.hbm,
                             device_kind=target.chip.device_kind)
        finally:
            if saved is None:
                est.CALIBRATIONS.pop(platform)
            else:
                est.CALIBRATIONS[platform] = saved
        return {"fixed": e.total - e.parts["activations"] - e.parts["backward peak"],
                "activations": e.parts["activations"], **e.phases}

    base = run()
    out = {"fixed": base["fixed"], "activations": [base["activations"]], "loss": [base["loss"]],
           "layer": [base["layer"]]}
    for name in CONSTANTS:
        one = run(**{name: 1.0})
        for phase in ("activations", "loss", "layer"):
            out[phase].append(one[phase] - base[phase])
    return out


def total(parts: dict, values: np.ndarray) -> np.ndarray:
    """Estimated bytes for each row of `values` ([n, len(CONSTANTS)])."""
    phase = {p: parts[p][0] + values @ np.asarray(parts[p][1:], float) for p in ("activations", "loss", "layer")}
    return parts["fixed"] + phase["activations"] + np.maximum(phase["loss"], phase["layer"])


def fit(rows: list) -> tuple[dict, float]:
    grid = np.array(list(itertools.product(*GRID.values())), float)
    worst = np.zeros(len(grid))
    for parts, compiler in rows:
        ratio = total(parts, grid) / compiler - 1
        worst = np.maximum(worst, np.where(ratio < 0, -1.5 * ratio, ratio))
    best = int(np.argmin(worst))
    return dict(zip(CONSTANTS, grid[best].tolist())), float(worst[best])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*")
    parser.add_argument("--topology", action="append", default=[])
    parser.add_argument("--figures", help="a JSON list of compiler figures to fit to without compiling "
                                          "(bench/tpu_figures.json: docs/tpu.md's and docs/long-context.md's)")
    parser.add_argument("--platform", default="tpu")
    parser.add_argument("--json", help="write the decomposed rows here")
    args = parser.parse_args()

    import jax

    jax.config.update("jax_platforms", "cpu")
    from jaxtune import aot, config, estimate as est

    built, abstract_run = {}, est.abstract_run

    def remembered(cfg, platform=None, device_kind=None, context=1):  # the same model for every constant
        key = (cfg.to_json_best_effort(sort_keys=True), platform, device_kind, context)
        if key not in built:
            built[key] = abstract_run(cfg, platform, device_kind, context)
        return built[key]

    est.abstract_run = remembered
    rows, names = [], []
    for figure in json.loads(open(args.figures).read()) if args.figures else []:  # compiler figures already known
        overrides = [f"--config.{k}={v}" for k, v in figure["overrides"].items()]
        cfg = config.load(figure["config"], overrides + [f"--config.model.remat={figure['remat']}"])
        rows.append((decompose(cfg, aot.target(figure["topology"]), args.platform), figure["compiler_gib"] * 2**30))
        names.append(f"{figure['config'].split('/')[-1].removesuffix('.py')} on {figure['topology']} "
                     f"{' '.join(overrides)} (remat {figure['remat']})")
    for path in args.configs:
        cfg = config.load(path, [])
        for name in args.topology:
            target = aot.target(name)
            report = aot.compile_run(cfg, target)  # as `jaxtune compile` does: the same cache entry
            if report.memory is None:  # no figure to fit to (a compile error, or out of memory)
                print(f"{path} on {name}: skipped ({report.error[:80]})", file=sys.stderr)
                continue
            resolved = est.with_remat(cfg, report.estimate.remat)
            rows.append((decompose(resolved, target, args.platform), report.peak))
            names.append(f"{path.split('/')[-1].removesuffix('.py')} on {name} (remat {report.estimate.remat})")
            print(f"{names[-1]}: compiler {report.peak / 2**30:.2f} GiB, estimate "
                  f"{report.estimate.total / 2**30:.2f} ({report.estimate.calibration})", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"names": names, "rows": rows}, f)
    values, worst = fit(rows)
    current = est.calibration(args.platform)
    now = np.array([[getattr(current, name) for name in CONSTANTS]], float)
    new = np.array([[values[name] for name in CONSTANTS]], float)
    print(f"fitted for {args.platform}: {values} (worst weighted error {worst:.3f})")
    print(f"{'run':<60}{'compiler GiB':>13}{current.name:>12}{'fitted':>9}")
    for name, (parts, compiler) in zip(names, rows):
        print(f"{name:<60}{compiler / 2**30:>13.2f}{total(parts, now)[0] / compiler:>12.3f}"
              f"{total(parts, new)[0] / compiler:>9.3f}")


if __name__ == "__main__":
    main()
