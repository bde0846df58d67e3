"""CLI start-up: wall and CPU time of whole `planner` processes, each beside a bare
`python -c pass` measured in the same run.

  planner --help
  planner models
  planner suggest for the 1T GPT on 3072 A100-80GB (the first case of search_speed.py; the
      search itself is ~0.3 s, so the rest of the process is start-up and output)

Every command runs `repeats` times as a child process; the figures are the medians.  CPU time
is the children's user + system time from resource.getrusage(RUSAGE_CHILDREN), so it counts
only the child, not this script or other processes sharing the cores (the wall time does).
Usage: python benchmarks/cli_startup.py [repeats]"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_speed import GPT_1T  # noqa: E402  (the same 1T model as the search benchmark)


def planner_cmd() -> list:
    """The installed `planner` script next to this interpreter, else `python -m planner.cli`."""
    script = Path(sys.executable).with_name("planner")
    if script.is_file():
        return [sys.executable, str(script)]
    found = shutil.which("planner")
    return [sys.executable, found] if found else [sys.executable, "-m", "planner.cli"]


def measure(cmd: list) -> tuple:
    """(wall s, CPU s) of one child process running `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def measurements(repeats: int = 5) -> list:
    """(command, median wall s, median CPU s) of each case, `python -c pass` first."""
    planner = planner_cmd()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "gpt-1t.json")
        with open(model, "w") as f:
            json.dump(GPT_1T.to_dict(), f)
        cases = [
            ("python -c pass", [sys.executable, "-c", "pass"]),
            ("planner --help", planner + ["--help"]),
            ("planner models", planner + ["models"]),
            ("planner suggest (1T GPT, 3072 x A100-80G)",
             planner + ["suggest", "--model", model, "--cluster", "a100-80g", "--nodes", "384",
                        "--global-batch", "3072", "--seq-len", "2048", "--top", "10"]),
        ]
        measure(cases[0][1])  # warm the file cache once
        rows = []
        for name, cmd in cases:
            runs = [measure(cmd) for _ in range(repeats)]
            rows.append((name, statistics.median(w for w, _ in runs),
                         statistics.median(c for _, c in runs)))
    return rows


def main(repeats: int = 5) -> None:
    rows = measurements(repeats)
    base_wall, base_cpu = rows[0][1], rows[0][2]
    print(f"median of {repeats} runs; {os.cpu_count()} cores; {sys.executable}")
    print("| command | wall s | CPU s | wall over python -c pass | CPU over python -c pass |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {wall - base_wall:+.3f} | "
              f"{cpu - base_cpu:+.3f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
