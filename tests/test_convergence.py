"""The convergence report on synthetic loss curves, and its warning on a run that does not move."""

import dataclasses

import jax
import numpy as np
import pytest

from satm_jax import augment, convergence, distill, outputs
from satm_jax.experiment import pipeline
from tests.helpers import distill_problem

ITS = np.arange(500)


def _noise(scale, seed=0):
    return scale * np.random.default_rng(seed).standard_normal(ITS.size)


def test_a_falling_curve_is_not_converged():
    r = convergence.report(1.0 - 0.4 * ITS / ITS.size, image_move=0.5)
    assert r["still_falling"] and not r["converged"]
    assert r["warnings"][0].startswith("not converged") and "--iterations" in r["warnings"][0]
    np.testing.assert_allclose(r["loss_drop"], (0.98 - 0.62) / 0.98, rtol=0.02)


def test_a_curve_that_levelled_off_is_converged():
    flat_end = 0.5 + 0.5 * np.exp(-ITS / 40.0)
    r = convergence.report(flat_end, image_move=0.5)
    assert not r["still_falling"] and r["converged"] and r["warnings"] == []


def test_noise_alone_is_not_a_trend():
    level = 0.6 + np.concatenate([0.3 * np.exp(-ITS[:250] / 30.0), np.zeros(250)])
    r = convergence.report(level + _noise(0.05), image_move=0.5)
    assert not r["still_falling"] and r["converged"], r
    # ... but a real fall under the same noise is found.
    r = convergence.report(1.0 - 0.3 * ITS / ITS.size + _noise(0.05), image_move=0.5)
    assert r["still_falling"] and not r["converged"]


def test_a_flat_curve_from_the_start_means_the_images_barely_moved():
    r = convergence.report(0.9 + _noise(0.01, seed=1), image_move=0.3)
    assert not r["still_falling"] and not r["converged"]
    assert any(w.startswith("images barely moved") for w in r["warnings"])
    r = convergence.report(0.5 + 0.5 * np.exp(-ITS / 40.0), image_move=0.001)
    assert r["warnings"] and "0.10% of their norm" in r["warnings"][0]


def test_a_loss_that_rose_while_the_images_moved_is_not_called_barely_moved():
    # The SAM radius 1.0 runs of the digits sharpness study: loss up 9-39 %, images moved 3x.
    rising = 0.6 + 0.1 * ITS / ITS.size + _noise(0.01, seed=2)
    r = convergence.report(rising, image_move=3.0)
    assert r["loss_rose"] and not r["converged"]
    (w,) = r["warnings"]
    assert w.startswith("matching loss rose") and "300% of their norm" in w and "--rho" in w
    # Rising with images that did not move: that is the lack of movement, not a bad update.
    r = convergence.report(rising, image_move=0.001)
    assert not r["loss_rose"] and r["warnings"][0].startswith("images barely moved")
    # A falling loss sets neither.
    r = convergence.report(0.5 + 0.5 * np.exp(-ITS / 40.0), image_move=0.5)
    assert not r["loss_rose"] and r["converged"] and r["warnings"] == []


def test_step_size_trajectory_and_image_updates_are_summarised():
    lrs = np.linspace(0.01, 0.05, ITS.size)
    r = convergence.report(
        1.0 - 0.4 * ITS / ITS.size, syn_lrs=lrs, image_updates=np.full(ITS.size, 0.003)
    )
    assert r["syn_lr"]["first"] == 0.01 and r["syn_lr"]["last"] == 0.05
    assert r["syn_lr"]["last_tenth_change"] > 0 and r["image_update_median"] == 0.003


def test_a_step_size_still_rising_is_not_converged_although_the_loss_levelled():
    levelled = 0.5 + 0.5 * np.exp(-ITS / 40.0)
    # +12.5% over the last tenth: 49 steps of 1.2 / 500 in log space
    rising = 0.02 * np.exp(1.2 * ITS / ITS.size)
    r = convergence.report(levelled, syn_lrs=rising, image_move=0.5)
    assert not r["still_falling"] and r["syn_lr"]["still_moving"] and not r["converged"]
    (w,) = r["warnings"]
    assert w.startswith("step size still moving") and "+12.5%" in w and "--lr_log_lr" in w
    # A step size that settled (0.1% over the last tenth) raises nothing.
    settled = 0.05 - 0.03 * np.exp(-ITS / 40.0)
    r = convergence.report(levelled, syn_lrs=settled, image_move=0.5)
    assert not r["syn_lr"]["still_moving"] and r["converged"] and r["warnings"] == []
    # Falling counts as moving too, and the threshold is on |log| change.
    r = convergence.report(levelled, syn_lrs=rising[::-1], image_move=0.5)
    assert r["syn_lr"]["still_moving"] and "-11.1%" in r["warnings"][0]
    assert convergence.report(levelled, syn_lrs=rising, image_move=0.5, max_lr_drift=0.2)[
        "converged"
    ]


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(convergence.smooth([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])


@pytest.mark.slow
def test_the_warning_fires_on_a_run_whose_images_do_not_move(tmp_path):
    cfg, apply_fn, bank, x, y = distill_problem(iterations=30, steps_per_call=30)
    cfg = dataclasses.replace(cfg, lr_img=0.0, lr_lr=0.0)  # nothing can move
    state = distill.init_state(cfg, x, y)
    step = distill.make_outer_step(apply_fn, augment.make_augment(cfg.dsa_strategy), cfg)
    writer = outputs.MetricsWriter(str(tmp_path), tensorboard=False)
    state = distill.run_distillation(
        state, bank, cfg, step, metrics_fn=writer.iteration, progress=False, log=lambda m: None
    )
    writer.close()
    report = pipeline.run_convergence(str(tmp_path), x, state.images)
    assert report["image_move"] == 0.0 and report["iterations"] == 30
    assert not report["converged"]
    assert any(w.startswith("images barely moved") for w in report["warnings"])
    # The same run with a learning rate that moves the images reports the movement.
    moving = dataclasses.replace(cfg, lr_img=1000.0)
    state = distill.init_state(moving, x, y)
    state, m = jax.jit(distill.make_outer_step(apply_fn, lambda k, v: v, moving))(state, bank)
    assert float(m["img_update_rel"]) > 0


def test_a_run_of_hard_draws_is_not_a_trend_once_adjusted_for_the_trajectory():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 4, ITS.size)
    groups[400:450] = 3  # a chance run of the hardest trajectory just before the last tenth
    level = np.array([0.2, 0.3, 0.4, 0.6])[groups] + 0.01 * rng.standard_normal(ITS.size)
    level += 0.5 * np.exp(-ITS / 30.0)  # an early fall, then level
    raw = convergence.report(level, image_move=0.5)
    assert raw["still_falling"]  # the raw curve drops after the run of hard draws
    adjusted = convergence.report(level, groups=groups, image_move=0.5)
    assert not adjusted["still_falling"] and adjusted["converged"]
    # A real fall is still found after the adjustment.
    falling = level + 0.2 * (1.0 - ITS / ITS.size)
    assert convergence.report(falling, groups=groups, image_move=0.5)["still_falling"]
