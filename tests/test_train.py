"""The training script: loss falls on real text, a resumed run equals an uninterrupted one,
and bad flags end with a one-line message and exit code 2."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxpar.runtime.train import main

FLAGS = ["--model", "tiny", "--plan", "dp2+fsdp2+tp2", "--batch", "16", "--length", "64"]


def _run(tmp_path, name, *flags):
    out = tmp_path / f"{name}.json"
    assert main([*FLAGS, *flags, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _state(directory, step):
    """A saved TrainState as a dict of numpy arrays (step, params, opt_state)."""
    state = ocp.PyTreeCheckpointer().restore(directory / str(step) / "default")
    return jax.tree.map(np.asarray, state)


def test_loss_falls_and_resume_matches_uninterrupted(tmp_path):
    whole = _run(tmp_path, "whole", "--steps", "20", "--checkpoint-dir", str(tmp_path / "a"),
                 "--save-every", "20")
    assert whole["start_step"] == 0
    assert whole["end_loss"] < whole["start_loss"] - 1.0, whole

    first = _run(tmp_path, "first", "--steps", "10", "--schedule-steps", "20",
                 "--checkpoint-dir", str(tmp_path / "b"), "--save-every", "5")
    resumed = _run(tmp_path, "resumed", "--steps", "20", "--checkpoint-dir", str(tmp_path / "b"),
                   "--save-every", "5")
    assert first["start_step"] == 0 and resumed["start_step"] == 10
    assert resumed["final_loss"] == whole["final_loss"]
    assert sorted(int(p.name) for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == [15, 20]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 _state(tmp_path / "a", 20), _state(tmp_path / "b", 20))


def test_bad_batch_is_one_line_and_exit_code_2(capsys):
    assert main([*FLAGS, "--batch", "30", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "batch size 30" in err and "use a batch of 28" in err


def test_mfu_is_the_planners_flop_count_over_the_calibrated_peak(tmp_path, monkeypatch):
    """MFU as MaxText logs it: model FLOP/s over the devices' peak; the FLOPs are the
    planner's count of the traced step (3 x forward), the CPU's peak the matmul rate a
    calibration measured (here a stand-in figure: the suite's calibration runs last)."""
    from jaxpar.cluster import calibration
    from jaxpar.models.gpt import build, lm_loss
    from jaxpar.models.presets import PRESETS
    from jaxpar.planners.pipeline.result import step_flops
    from jaxpar.tracing.graph import trace_graph

    peak = 3.5e10
    monkeypatch.setattr(calibration, "measured_peak", lambda devices: peak)
    got = _run(tmp_path, "mfu", "--steps", "3")
    batch = {k: jax.ShapeDtypeStruct((16, 64), np.int32) for k in ("inputs", "targets")}
    graph = trace_graph(build(PRESETS["tiny"], length=64), lm_loss, batch)
    assert got["model_flops_per_step"] == step_flops(graph, "none")[0]
    assert got["peak_flops_per_device"] == peak and got["peak_source"] == "calibrated matmul rate"
    assert got["mfu"] == got["model_flops_per_s"] / (8 * peak)

    monkeypatch.setattr(calibration, "measured_peak", lambda devices: None)
    assert _run(tmp_path, "uncalibrated", "--steps", "2")["mfu"] is None
