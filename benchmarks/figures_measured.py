"""Generators of the README's measured figure blocks: timings of this machine, each from the
benchmark that measures it.  The cheap ones (seconds to a minute) are here; the expensive ones
(minutes) in benchmarks/figures_expensive.py.  None of them runs in the tests."""

from benchmarks.figures_computed import printed
from benchmarks.readme_figures import Block

SEARCH_REPEATS = 5  # median of 5 fresh-cluster searches per case
STARTUP_REPEATS = 5  # median of 5 child processes per command


def search_speed() -> str:
    from benchmarks import search_speed as script
    return printed(script.main, SEARCH_REPEATS)


def simulate_speed() -> str:
    from benchmarks import simulate_speed as script
    lines = ["| micro-batches | events | time to simulate (wall, best of 3) | CPU s (best of 3) |",
             "|---:|---:|---:|---:|"]
    for m, events, wall, cpu, *_ in script.measurements():
        lines.append(f"| {m} | {events:,} | {wall:.2f} s | {cpu:.2f} s |")
    return "\n".join(lines)


def cli_startup() -> str:
    from benchmarks import cli_startup as script
    lines = ["| command | wall s | CPU s |", "|---|---:|---:|"]
    for name, wall, cpu in script.measurements(STARTUP_REPEATS):
        lines.append(f"| `{name}` | {wall:.3f} | {cpu:.3f} |")
    return "\n".join(lines)


def _expensive() -> list:
    from benchmarks.figures_expensive import EXPENSIVE
    return EXPENSIVE


MEASURED = [
    Block("search-speed", "measured", search_speed,
          f"`python benchmarks/search_speed.py {SEARCH_REPEATS}`"),
    Block("cli-startup", "measured", cli_startup,
          f"`python benchmarks/cli_startup.py {STARTUP_REPEATS}`"),
    Block("simulate-speed", "measured", simulate_speed, "`python benchmarks/simulate_speed.py`"),
    *_expensive(),
]
