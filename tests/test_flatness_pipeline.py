"""The pipeline's flatness measurement: held-out experts, flatness.json, rows, reuse."""

import os

import pytest

from satm_jax import flatness
from satm_jax.experiment import configs, pipeline
from tests.helpers import read_json, read_text, tiny_overrides


@pytest.mark.slow
def test_flatness_is_measured_on_held_out_experts_and_reused(tmp_path, digits):
    cfg = configs.make_run_config("digits", 1, "satm", overrides=tiny_overrides())
    req = flatness.FlatnessConfig(heldout_experts=1, samples=2, ascent_steps=2, power_iterations=2)
    wd = str(tmp_path)
    logs = []
    out = pipeline.train_and_evaluate(
        [cfg], wd, dataset=digits, baselines=False, progress=False, log=logs.append, flatness=req
    )
    row = out["results"][0]
    f = row["flatness"]
    for k in ("loss_sampled", "loss_heldout", "worst_case_increase", "hessian_top_eig"):
        assert isinstance(f[k], float) and f[k] == f[k], k
    assert f["generalisation_gap"] == pytest.approx(f["loss_heldout"] - f["loss_sampled"])
    assert f["worst_case_increase"] > 0 and f["config"] == req.identity()
    rundir = os.path.join(wd, "runs", cfg.name)
    assert read_json(os.path.join(rundir, "flatness.json")) == f
    # the held-out store is a separate one, trained with another seed
    stores = {
        name: read_json(os.path.join(wd, "experts", name, "manifest.json"))
        for name in os.listdir(os.path.join(wd, "experts"))
    }
    seeds = sorted(m["training"]["seed"] for m in stores.values())
    assert seeds == [cfg.experts.seed, cfg.experts.seed + pipeline.HELDOUT_SEED_OFFSET]
    # the same request again: reused; another one: measured again without distilling again
    metrics = read_text(os.path.join(rundir, "metrics.jsonl"))
    again = pipeline.train_and_evaluate(
        [cfg], wd, dataset=digits, baselines=False, progress=False, log=logs.append, flatness=req
    )
    assert again["results"][0]["flatness"] == f and "finished earlier" in logs[-2]
    other = flatness.FlatnessConfig(
        heldout_experts=1, samples=2, ascent_steps=2, power_iterations=2, radius=0.1
    )
    before = len(logs)
    third = pipeline.train_and_evaluate(
        [cfg], wd, dataset=digits, baselines=False, progress=False, log=logs.append, flatness=other
    )
    assert third["results"][0]["flatness"]["radius"] != f["radius"]
    assert read_text(os.path.join(rundir, "metrics.jsonl")) == metrics
    assert any(": distilling" in x for x in logs[:before])
    assert not any(": distilling" in x for x in logs[before:])
