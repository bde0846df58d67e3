"""`planner profile`: measure this machine and write a hardware profile every command accepts."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from planner.hardware import load_profile


def add_parser(sub):
    p = sub.add_parser("profile", help="measure local GPUs (or CPU processes) into a profile")
    p.add_argument("--out", default="my_cluster.json", help="profile JSON to write")
    p.add_argument("--ranks", type=int, default=8,
                   help="local ranks for collectives (default 8; 1 measures no collectives)")
    p.add_argument("--base", default="cpu",
                   help="profile whose unmeasured terms (network, overheads) are kept")
    p.add_argument("--name", default=None, help="profile name (default: the --out file stem)")
    return p


def run(args) -> int:
    from planner.calibration.profile_fit import profile_from_measurements  # the cost model
    from planner.measured import ProfileMeasurements
    base = load_profile(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "measurements.json"
        # the measuring runs in runtime/ (torch), in its own process; planner stays torch-free
        cmd = [sys.executable, "-m", "runtime.hwprofile", "--out", str(raw),
               "--ranks", str(args.ranks)]
        code = subprocess.run(cmd).returncode
        if code:
            raise ValueError(f"measurement failed (exit code {code})")
        measurements = ProfileMeasurements.load(raw)
    profile = profile_from_measurements(base, measurements, args.name or Path(args.out).stem)
    with open(args.out, "w") as f:
        json.dump(profile.to_dict(), f, indent=1)
        f.write("\n")
    peak = profile.gpu.peak_flops[measurements.precision]
    print(f"wrote {args.out}: {profile.gpu.name}, GEMM e_max {profile.gpu.gemm_efficiency_max:.2f}"
          f" of {peak / 1e9:.1f} GFLOP/s, "
          f"all-reduce {profile.intra_node.bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    return 0
