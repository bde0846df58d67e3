"""The README's generated figure blocks: every marked block has a generator and every generator
a block, and the computed ones (the cost model's predictions) equal a fresh computation, so a
cost-model change that moves a README number fails here until
`python -m benchmarks.readme_figures` is run.  Measured blocks are never re-measured here."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import readme_figures as rf  # noqa: E402
from benchmarks.figures_expensive import minutes, pytest_summary  # noqa: E402

README = (ROOT / "README.md").read_text()


def test_every_block_has_a_generator_and_every_generator_a_block():
    in_readme = rf.marker_names(README)
    generators = rf.all_blocks()
    assert sorted(in_readme) == sorted(generators), (
        f"blocks without a generator: {sorted(set(in_readme) - set(generators))}; "
        f"generators without a block: {sorted(set(generators) - set(in_readme))}")
    assert {b.kind for b in generators.values()} <= set(rf.KINDS)


def test_computed_blocks_equal_a_fresh_computation():
    blocks = rf.all_blocks()
    computed = [n for n, b in blocks.items() if b.kind == "computed"]
    assert len(computed) >= 6
    stale = rf.stale_blocks(README, blocks, computed)
    assert not stale, (f"README blocks {stale} differ from the code: run "
                       f"`python -m benchmarks.readme_figures --only {' '.join(stale)}`")


def _block(name, kind, text):
    return rf.Block(name, kind, lambda: text, "`the source`")


def test_a_block_on_its_own_lines_gets_its_stamp_as_a_paragraph():
    readme = "before\n<!-- figures: t -->\nold\n<!-- /figures -->\nafter"
    new = rf.replace_block(readme, "t", lambda inline: rf.render(_block("t", "computed",
                                                                        "| a |"), inline))
    assert new.startswith("before\n<!-- figures: t -->\n| a |\n\n*Computed by `the source`")
    assert new.endswith("stale.*\n<!-- /figures -->\nafter")
    assert rf.block_bodies(new)["t"][1] is False


def test_an_inline_block_stays_in_its_sentence_with_a_dated_stamp():
    readme = "It <!-- figures: t -->took 9 s<!-- /figures -->, then more."
    new = rf.replace_block(readme, "t", lambda inline: rf.render(_block("t", "measured",
                                                                        "took 1 s"), inline))
    body, inline = rf.block_bodies(new)["t"]
    assert inline and body.startswith("took 1 s (measured 20") and "load average" in body
    assert new.endswith(" by `python -m benchmarks.readme_figures --only t`)<!-- /figures -->, "
                        "then more.")
    assert f"{rf.machine()}" in body


@pytest.mark.parametrize("bad,why", [
    ("<!-- figures: a -->x", "do not pair up"),
    ("<!-- figures: a -->x<!-- /figures --> <!-- figures: a -->y<!-- /figures -->",
     "more than once: a"),
])
def test_unpaired_or_repeated_markers_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        rf.marker_names(bad)


def test_check_exits_1_on_a_stale_computed_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README.replace("| 22B SP + selective recompute (8 GPUs) | 1.1 s | ",
                                     "| 22B SP + selective recompute (8 GPUs) | 1.2 s | "))
    assert rf.main(["--check", "--only", "published-runs", "--readme", str(readme)]) == 1
    assert "'published-runs' is stale" in capsys.readouterr().err
    assert rf.main(["--check", "--only", "nope", "--readme", str(readme)]) == 2
    assert "no figure block named 'nope'" in capsys.readouterr().err


def test_pytest_summary_reads_the_last_line():
    line = "1553 passed, 2 skipped, 1 xfailed, 3 warnings in 344.12s (0:05:44)"
    assert pytest_summary("dots\n" + line) == "1,553 passed, 2 skipped, 1 xfailed in 5 min 44 s"
    assert minutes(59.4) == "59 s"
