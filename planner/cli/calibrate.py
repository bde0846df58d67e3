"""`planner calibrate measured/*.json --profile p.json --out p_calibrated.json`."""

import json
import sys

from planner.cli.common import print_json
from planner.hardware import load_profile

DESCRIPTION = """\
Fit correction factors of a profile to measured runs: kernel efficiency, fixed overheads and
collective latency, each within its bound (planner/limits.py). A factor no run is sensitive to,
or that the runs cannot tell from another, is left alone (stays 1). Errors are
(predicted - measured) / measured, as in planner compare. A fit that stays absurd (a factor at
its bound, or mean |error| above 100% after fitting) is refused unless --force."""


def add_parser(sub):
    p = sub.add_parser("calibrate", help="fit a profile's efficiency terms to measured runs",
                       description=DESCRIPTION)
    p.add_argument("measured", nargs="+", help="measured.json files from the runtime")
    p.add_argument("--profile", required=True, help="profile name or JSON to calibrate")
    p.add_argument("--out", required=True, help="calibrated profile JSON to write")
    p.add_argument("--force", action="store_true",
                   help="write the calibrated profile even when the fit stays absurd")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the file written, the factors, the errors)")
    return p


def _mean_abs(errors: list) -> float:
    return sum(map(abs, errors)) / len(errors)


def _table(paths: list, before: list, after: list) -> None:
    print(f"{'run':<40} {'error before':>13} {'error after':>12}")
    for path, b, a in zip(paths, before, after):
        print(f"{path[-40:]:<40} {100 * b:>+12.1f}% {100 * a:>+11.1f}%")
    mean_b, mean_a = (100 * _mean_abs(xs) for xs in (before, after))
    print(f"{'mean |error|':<40} {mean_b:>12.1f}% {mean_a:>11.1f}%")
    print("error = (predicted - measured) / measured step time (as in planner compare)")


def run(args) -> int:
    from planner.calibration import calibrate as cal  # the cost model: only here
    from planner.measured import Measured
    runs = [Measured.load(path) for path in args.measured]  # each with the plan it ran
    base = load_profile(args.profile)
    cal._check_runs(runs)
    fitted, left = cal.identify(runs, base)
    profile, factors, before, after = cal.calibrate(runs, base)
    if not args.json:
        print("fitted factors: " + (", ".join(f"{k} x{factors.get(k, 1.0):.3g}"
                                              for k in fitted) or "none"))
        for name, why in left.items():
            print(f"left alone (x1): {name}: {why}")
        _table(args.measured, before, after)
    problems = cal.fit_problems(factors, fitted, after)
    if problems and not args.force:
        raise ValueError(f"the fit cannot be right: {'; '.join(problems)}; nothing was written "
                         f"(check the profile and the runs; --force writes it anyway)")
    for problem in problems:
        print(f"planner calibrate: WARNING: {problem} (written because of --force)",
              file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(profile.to_dict(), f, indent=1)
        f.write("\n")
    if args.json:
        print_json(_result(args, fitted, factors, left, before, after, problems))
    else:
        print(f"wrote {args.out}")
    return 0


def _result(args, fitted, factors, left, before, after, problems) -> dict:
    """--json: what was written and the figures of the fit (errors as fractions)."""
    return {"wrote": args.out, "fitted": {k: factors.get(k, 1.0) for k in fitted},
            "left_alone": dict(left), "forced_problems": list(problems),
            "runs": [{"measured": path, "error_before": b, "error_after": a}
                     for path, b, a in zip(args.measured, before, after)],
            "mean_abs_error_before": _mean_abs(before), "mean_abs_error_after": _mean_abs(after)}
