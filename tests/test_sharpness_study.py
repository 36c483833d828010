"""experiments.sharpness_study: its grid, its arithmetic, and a tiny study end to end."""

import os

import pytest

from experiments import seed_flags
from experiments import sharpness_study as study_lib
from satm_jax import flatness
from tests.helpers import tiny_overrides


def test_points_cover_mtt_truncated_mtt_and_every_radius_and_ball():
    pts = study_lib.points([0.01, 0.1], ["global", "per_example"], "relative")
    assert [p[0] for p in pts] == [
        "mtt",
        "mtt_tuh",
        "satm_global_r0.01",
        "satm_global_r0.1",
        "satm_perimg_r0.01",
        "satm_perimg_r0.1",
    ]
    assert pts[1][2] == {"hypergrad": "truncated"}
    assert pts[4][2] == {"rho": 0.01, "rho_scale": "relative", "rho_ball": "per_example"}


def test_aggregate_pairs_each_seed_with_mtt_at_the_same_seed():
    f = lambda w: {"worst_case_increase_rel": w, "hessian_top_eig": 1.0, "generalisation_gap": 0.1}  # noqa: E731
    rows = [
        {"point": "mtt", "seed": 0, "acc_mean": 70.0, "flatness": f(0.2), "distill_s": 10},
        {"point": "mtt", "seed": 1, "acc_mean": 72.0, "flatness": f(0.4), "distill_s": 10},
        {
            "point": "satm_global_r0.1",
            "seed": 0,
            "acc_mean": 71.0,
            "flatness": f(0.1),
            "distill_s": 20,
        },
        {
            "point": "satm_global_r0.1",
            "seed": 1,
            "acc_mean": 72.5,
            "flatness": f(0.3),
            "distill_s": 20,
        },
    ]
    mtt, satm = study_lib.aggregate(rows)
    assert mtt["acc_mean"] == pytest.approx(71.0) and mtt["acc_std"] == pytest.approx(2**0.5)
    assert satm["vs_mtt_mean"] == pytest.approx(0.75)  # (+1.0, +0.5)
    assert satm["vs_mtt_std"] == pytest.approx(0.5 / 2**0.5)
    assert satm["worst_case_increase_rel"] == pytest.approx(0.2)
    md = study_lib.format_markdown({"points": [mtt, satm]}, "cmd", 1.0)
    assert "| satm_global_r0.1 | 2 | 71.75 +- 1.06 | +0.75 +- 0.35 |" in md
    # Rows measured before a measure existed (no scaled eigenvalue here) leave its cell empty.
    assert "hessian_top_eig_scaled" not in satm and "| 0.2 +- 0.1414 | 1 | - |" in md


def test_other_networks_are_aggregated_per_network_and_paired_with_mtt():
    def row(point, seed, acc, alex, **flags):
        return {
            "point": point,
            "seed": seed,
            "acc_mean": acc,
            "distill_s": 1,
            "xarch": {"alexnet": {"acc_mean": alex, "acc_std": 1.0, **flags}},
        }

    rows = [
        row("mtt", 0, 70.0, 60.0),
        row("mtt", 1, 72.0, 64.0),
        row("satm_global_r0.1", 0, 71.0, 58.0, collapsed=1),
        row("satm_global_r0.1", 1, 72.0, 61.0),
    ]
    mtt, satm = study_lib.aggregate(rows)
    assert mtt["xarch"]["alexnet"]["acc_mean"] == pytest.approx(62.0)
    assert "vs_mtt_mean" not in mtt["xarch"]["alexnet"]
    x = satm["xarch"]["alexnet"]
    assert x["acc_mean"] == pytest.approx(59.5) and x["seeds"] == 2
    assert x["vs_mtt_mean"] == pytest.approx(-2.5)  # (-2, -3)
    assert x["vs_mtt_std"] == pytest.approx(0.5**0.5) and x["collapsed"] == 1
    md = study_lib.format_markdown({"points": [mtt, satm]}, "cmd", 1.0)
    assert "| satm_global_r0.1 | alexnet | 2 | 59.50 +- 2.12 | -2.50 +- 0.71 | 1 collapsed |" in md
    assert "| mtt | alexnet | 2 | 62.00 +- 2.83 | - | - |" in md
    # The main row is the distillation network's, wherever --eval_models lists it.
    assert study_lib._main_row([{"model": "alexnet"}, {"model": "convnet"}], "convnet") == {
        "model": "convnet"
    }


@pytest.mark.slow
def test_a_tiny_study_runs_reports_and_resumes(tmp_path, digits, monkeypatch):
    from satm_jax import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, data_dir=None: digits)
    tiny = tiny_overrides(
        iterations=2,
        steps_per_call=2,
        eval_models=("convnet", "alexnet"),
        eval_model_lr="alexnet:0.02",
    )
    flat = flatness.FlatnessConfig(heldout_experts=1, samples=1, ascent_steps=1, power_iterations=1)
    wd = str(tmp_path)
    args = ("digits", 1, "default", dict(tiny), None, [0.05], ["per_example"], [0], flat)
    logs = []
    # One reference point (mtt_tuh is the same kind of point: test_points_cover_...).
    kw = dict(references=["mtt"], progress=False, log=logs.append)
    study = study_lib.run_study(*args, wd, **kw)
    assert [r["point"] for r in study["rows"]] == ["mtt", "satm_perimg_r0.05"]
    assert all("flatness" in r for r in study["rows"])
    # The distillation network's row, the other network's accuracy beside it.
    assert all(r["model"] == "convnet" for r in study["rows"])
    assert all(r["xarch"]["alexnet"]["eval_lr"] == 0.02 for r in study["rows"])
    assert "xarch" in study["points"][1] and "vs_mtt_mean" in study["points"][1]["xarch"]["alexnet"]
    assert (
        "sharpness_last_tenth" in study["rows"][1]
        and "sharpness_last_tenth" not in study["rows"][0]
    )
    # one expert store for every point (and one held-out store)
    assert len(os.listdir(os.path.join(wd, "experts"))) == 2
    paths = study_lib.plot(study, wd)
    assert all(os.path.getsize(p) > 0 for p in paths)
    logs.clear()
    again = study_lib.run_study(*args, wd, **kw)
    assert sum("finished earlier" in x for x in logs) == 2
    assert [r["acc_mean"] for r in again["rows"]] == [r["acc_mean"] for r in study["rows"]]


def test_each_ball_can_have_its_own_radius_grid():
    pts = study_lib.points(
        {"global": [0.1], "per_example": [0.01, 0.1]}, ["global", "per_example"], "relative"
    )
    assert [p[0] for p in pts[2:]] == ["satm_global_r0.1", "satm_perimg_r0.01", "satm_perimg_r0.1"]


def test_references_choose_the_reference_points_and_reject_unknown_names():
    pts = study_lib.points([0.1], ["global"], "relative", references=["mtt"])
    assert [p[0] for p in pts] == ["mtt", "satm_global_r0.1"]
    assert [p[0] for p in study_lib.points([], ["global"], "relative", [])] == []
    with pytest.raises(study_lib.configs_lib.ConfigError, match="unknown reference point"):
        study_lib.points([0.1], ["global"], "relative", references=["mttt"])


def test_bad_radii_or_seeds_stop_the_study_before_anything_is_trained(tmp_path):
    flat = flatness.FlatnessConfig(heldout_experts=1, samples=1, ascent_steps=1, power_iterations=1)
    wd = str(tmp_path / "wd")
    # A negative radius used to surface only at its point, after the MTT points had trained.
    with pytest.raises(study_lib.configs_lib.ConfigError, match="rho must be a finite number"):
        study_lib.run_study(
            "digits", 1, "default", tiny_overrides(), None, [-0.1], ["global"], [0], flat, wd
        )
    with pytest.raises(study_lib.configs_lib.ConfigError, match="at least one seed"):
        study_lib.run_study(
            "digits", 1, "default", tiny_overrides(), None, [0.1], ["global"], [], flat, wd
        )
    assert not os.path.exists(wd)  # nothing made, nothing trained
    with pytest.raises(study_lib.configs_lib.ConfigError, match="--radii takes .* floats"):
        seed_flags.numbers("radii", ["0.1", "abc"], float)
    assert seed_flags.numbers("seeds", ["0", "2"]) == [0, 2]
