"""Smoke test of scripts/check_pipeline_grid.py --quick (ZB-H1, pp2+tp4, m4, both forms): it
runs, compares with the single-device gradient and writes every field. The whole grid's
result is docs/pipeline_grid.json."""


def test_quick_grid_equals_single_device(quick_script):
    result = quick_script("check_pipeline_grid.py")
    cases = result["cases"]
    assert {c["form"] for c in cases} == {"mpmd", "spmd"}
    assert all(c["schedule"] == "zero_bubble_h1" for c in cases)
    for c in cases:  # errors within the tolerance, and not exactly zero (it really compared)
        assert 0 < c["grad_excess"] <= 1 and c["loss_excess"] <= 1 and c["equal"]
    assert result["targets"]["cases"] == 2 and result["targets"]["all_equal"]
