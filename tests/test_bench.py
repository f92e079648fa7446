"""The README's Performance table is the newest full bench run, as bench/readme.py renders it."""

from bench.readme import README, newest_full_run, render


def test_readme_performance_table_is_the_newest_results_file():
    assert f"<!-- bench:begin -->\n{render(newest_full_run())}\n<!-- bench:end -->" in README.read_text()
