"""The README's Performance tables are the newest full bench runs, as bench/readme.py renders them."""

import pytest

from bench.readme import MARKERS, README, newest_full_run, render


@pytest.mark.parametrize("accuracy", [False, True])
def test_readme_performance_tables_are_the_newest_results_files(accuracy):
    begin, end = MARKERS[accuracy]
    assert f"{begin}\n{render(newest_full_run(accuracy))}\n{end}" in README.read_text()
