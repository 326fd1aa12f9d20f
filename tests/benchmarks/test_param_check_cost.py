"""benchmarks/param_check_cost.py, run as a file: three timed ratios, an unknown model refused."""

from tests.benchmarks.scripts import run_script


def test_param_check_cost_runs_and_refuses_an_unknown_model():
    result = run_script("param_check_cost", "smallcnn")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ratio") == 3
    refused = run_script("param_check_cost", "nope")
    assert refused.returncode == 2 and "invalid choice: 'nope'" in refused.stderr
