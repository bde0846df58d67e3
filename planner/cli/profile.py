"""`planner profile`: measure this machine and write a hardware profile every command accepts."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from planner.cli.common import print_json, require_module
from planner.hardware import load_profile

DESCRIPTION = """\
Measure this machine (GEMMs, copy bandwidth, all-reduce, a layer's host time) into a hardware
profile. The profile captures the machine's state while it was measured: other work on the
cores makes every figure slower, so a busy machine is refused (load average and an idle-core
probe before measuring, the ranks' CPU share while measuring) unless --allow-busy. Each figure
is the median of repeats; the fit quality and the spread of the repeats are printed, and a
fitted term outside its plausible range (planner/limits.py) is refused: nothing is written."""

BUSY_EXIT = 3  # runtime.hwprofile: the machine was busy before measuring


def add_parser(sub):
    p = sub.add_parser("profile", help="measure local GPUs (or CPU processes) into a profile",
                       description=DESCRIPTION)
    p.add_argument("--out", default="my_cluster.json", help="profile JSON to write")
    p.add_argument("--ranks", type=int, default=8,
                   help="local ranks for collectives (default 8; 1 measures no collectives)")
    p.add_argument("--base", default="cpu",
                   help="profile whose unmeasured terms (network, overheads) are kept")
    p.add_argument("--name", default=None, help="profile name (default: the --out file stem)")
    p.add_argument("--allow-busy", action="store_true",
                   help="measure even when other work holds the cores; the profile's "
                        "description and sources then say it was measured under load")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the file written, the fitted figures); the "
                        "measurement's progress goes to standard error")
    return p


def _measure(args, tmp: str):
    from planner.measured import ProfileMeasurements
    raw = Path(tmp) / "measurements.json"
    # the measuring runs in runtime/ (torch), in its own process; planner stays torch-free
    cmd = [sys.executable, "-m", "runtime.hwprofile", "--out", str(raw),
           "--ranks", str(args.ranks)] + (["--allow-busy"] if args.allow_busy else [])
    # with --json standard output carries the JSON only: the measuring prints to stderr
    code = subprocess.run(cmd, check=False, stdout=2 if args.json else None).returncode
    refused = Path(str(raw) + ".refused")
    if code == BUSY_EXIT and refused.exists():
        raise ValueError(f"the machine is busy before measuring: {refused.read_text()}; "
                         f"profile an idle machine, or pass --allow-busy to mark the profile "
                         f"as measured under load")
    if code:
        raise ValueError(f"measurement failed (exit code {code})")
    return ProfileMeasurements.load(raw)


def run(args) -> int:
    from planner.calibration.profile_fit import fit_profile  # the cost model
    base = load_profile(args.base)
    require_module("torch", "measuring (planner profile)")
    with tempfile.TemporaryDirectory() as tmp:
        measurements = _measure(args, tmp)
    profile, report = fit_profile(base, measurements, args.name or Path(args.out).stem,
                                  allow_busy=args.allow_busy)
    for line in report.lines():
        print(line, file=sys.stderr if args.json else sys.stdout)
    for line in report.warnings:
        print(f"planner profile: WARNING: {line}", file=sys.stderr)
    if report.busy:
        print(f"planner profile: WARNING: measured under load ({report.busy}); the profile "
              f"says so in its description", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(profile.to_dict(), f, indent=1)
        f.write("\n")
    peak = profile.gpu.peak_flops[measurements.precision]
    if args.json:
        print_json(_result(args, profile, report, peak))
        return 0
    print(f"wrote {args.out}: {profile.gpu.name}, GEMM e_max {profile.gpu.gemm_efficiency_max:.2f}"
          f" of {peak / 1e9:.1f} GFLOP/s, half dim {profile.gpu.gemm_half_dim:.0f}, "
          f"all-reduce {profile.intra_node.bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    return 0


def _result(args, profile, report, peak: float) -> dict:
    """--json: the file written and the figures it was fitted to."""
    return {"wrote": args.out, "name": profile.name, "gpu": profile.gpu.name,
            "peak_flops": peak, "gemm_efficiency_max": profile.gpu.gemm_efficiency_max,
            "gemm_half_dim": profile.gpu.gemm_half_dim,
            "allreduce_bandwidth_bytes_per_s": profile.intra_node.bandwidth_bytes_per_s,
            "gemm_rms_residual": report.rms(report.gemm_residuals),
            "allreduce_rms_residual": report.rms(report.allreduce_residuals),
            "spread": dict(report.spread), "repeats": report.repeats,
            "warnings": list(report.warnings), "measured_under_load": report.busy}
