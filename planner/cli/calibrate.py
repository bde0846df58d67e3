"""`planner calibrate measured/*.json --profile p.json --out p_calibrated.json`."""

import json

from planner.hardware import load_profile


def add_parser(sub):
    p = sub.add_parser("calibrate", help="fit a profile's efficiency terms to measured runs")
    p.add_argument("measured", nargs="+", help="measured.json files from the runtime")
    p.add_argument("--profile", required=True, help="profile name or JSON to calibrate")
    p.add_argument("--out", required=True, help="calibrated profile JSON to write")
    return p


def run(args) -> int:
    from planner.calibration.calibrate import calibrate  # the cost model: only here
    from planner.measured import Measured
    runs = [Measured.load(path) for path in args.measured]  # each with the plan it ran
    profile, factors, before, after = calibrate(runs, load_profile(args.profile))
    with open(args.out, "w") as f:
        json.dump(profile.to_dict(), f, indent=1)
        f.write("\n")
    print("fitted factors: " + ", ".join(f"{k} x{v:.3g}" for k, v in factors.items()))
    print(f"{'run':<40} {'error before':>13} {'error after':>12}")
    for path, b, a in zip(args.measured, before, after):
        print(f"{path[-40:]:<40} {100 * b:>12.1f}% {100 * a:>11.1f}%")
    mean = lambda xs: 100 * sum(abs(x) for x in xs) / len(xs)  # noqa: E731
    print(f"{'mean |error|':<40} {mean(before):>12.1f}% {mean(after):>11.1f}%")
    print(f"wrote {args.out}")
    return 0
