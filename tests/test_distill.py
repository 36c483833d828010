"""The outer step: SATM's reductions to MTT, trajectory reusing, guards, labels, EMA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import distill, expert_store, matching, sharpness
from tests.helpers import DISTILL_SYN_STEPS as N
from tests.helpers import distill_problem, tree_allclose


def _steps(cfg, apply_fn, bank, images, labels, n=2, **init_kw):
    from satm_jax import augment

    state = distill.init_state(cfg, images, labels, **init_kw)
    step = jax.jit(distill.make_outer_step(apply_fn, augment.make_augment(cfg.dsa_strategy), cfg))
    for _ in range(n):
        state, metrics = step(state, bank)
    return state, metrics


@pytest.mark.slow
@pytest.mark.parametrize("lr_update", ["backprop", "first_order"])
def test_satm_with_rho_zero_equals_the_plain_mtt_update(lr_update):
    cfg, apply_fn, bank, x, y = distill_problem(lr_update=lr_update)
    mtt, _ = _steps(cfg, apply_fn, bank, x, y)
    satm_cfg = dataclasses.replace(cfg, sharpness="sam", rho=0.0, reuse_trajectory=True)
    satm, _ = _steps(satm_cfg, apply_fn, bank, x, y)
    tree_allclose(satm.images, mtt.images, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(satm.syn_lr, mtt.syn_lr, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [True, False])
def test_trajectory_reusing_with_rho_zero_equals_the_truncated_update(reuse):
    cfg, apply_fn, bank, x, y = distill_problem(
        hypergrad="truncated", truncate=2, lr_update="first_order"
    )
    tuh, _ = _steps(cfg, apply_fn, bank, x, y)
    satm, _ = _steps(
        dataclasses.replace(cfg, sharpness="sam", rho=0.0, reuse_trajectory=reuse),
        apply_fn,
        bank,
        x,
        y,
    )
    tree_allclose(satm.images, tuh.images, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_window_step_size_update_differs_from_first_order_only_when_truncated():
    # K < N: the window sums fewer gradients than SATM's all-steps form, so the step sizes
    # part after one iteration; K = N: the window is the whole unroll and they agree.
    lrs = {}
    for truncate in (1, None):
        for lr_update in ("first_order", "first_order_window"):
            hypergrad = "exact" if truncate is None else "truncated"
            cfg, apply_fn, bank, x, y = distill_problem(
                hypergrad=hypergrad, truncate=truncate, lr_update=lr_update
            )
            state, _ = _steps(cfg, apply_fn, bank, x, y, n=1)
            lrs[truncate, lr_update] = float(state.syn_lr)
    assert lrs[1, "first_order"] != pytest.approx(lrs[1, "first_order_window"], rel=1e-6)
    assert lrs[None, "first_order"] == pytest.approx(lrs[None, "first_order_window"], rel=1e-6)


def _second_pass_points(reuse):
    """What the second pass differentiates, rebuilt by hand from the same random draws."""
    from satm_jax import augment

    cfg, apply_fn, bank, x, y = distill_problem(
        hypergrad="truncated", truncate=2, sharpness="sam", rho=0.5, reuse_trajectory=reuse
    )
    aug = augment.make_augment(cfg.dsa_strategy)
    state = distill.init_state(cfg, x, y)
    sample = distill.sample_iteration(state, bank, cfg)
    _, perturbed = distill.make_passes(apply_fn, aug, cfg)(state, sample)
    x_adv = x + 0.3 * jax.random.normal(jax.random.PRNGKey(5), x.shape)
    got = jax.grad(perturbed)(x_adv)
    b = sample.batches
    lr = state.syn_lr
    # TR on: theta_{N-K} of the FIRST pass (computed at x), then K steps at x_adv.
    head_x, _ = matching.unroll(apply_fn, sample.start, x, y, lr, b.slice(0, N - 2), augment_fn=aug)
    # TR off: theta_{N-K} recomputed from the expert checkpoint at x_adv.
    head_adv, _ = matching.unroll(
        apply_fn, sample.start, x_adv, y, lr, b.slice(0, N - 2), augment_fn=aug
    )

    def tail_from(head):
        def f(xx):
            final, _ = matching.unroll(apply_fn, head, xx, y, lr, b.slice(N - 2, N), augment_fn=aug)
            return matching.normalized_distance(final, sample.start, sample.target)

        return jax.grad(f)(x_adv)

    return got, tail_from(head_x), tail_from(head_adv)


@pytest.mark.slow
def test_trajectory_reusing_restarts_the_second_pass_from_the_first_pass_step_n_minus_k():
    got, from_first_pass, from_expert = _second_pass_points(reuse=True)
    np.testing.assert_allclose(got, from_first_pass, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, from_expert, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_without_trajectory_reusing_the_second_pass_starts_from_the_expert_checkpoint():
    got, from_first_pass, from_expert = _second_pass_points(reuse=False)
    np.testing.assert_allclose(got, from_expert, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, from_first_pass, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_sam_changes_the_update_when_rho_is_positive():
    cfg, apply_fn, bank, x, y = distill_problem()
    mtt, _ = _steps(cfg, apply_fn, bank, x, y, n=1)
    satm, _ = _steps(dataclasses.replace(cfg, sharpness="sam", rho=1.0), apply_fn, bank, x, y, n=1)
    assert not np.allclose(satm.images, mtt.images)


@pytest.mark.slow
def test_every_sharpness_runs_in_the_outer_step_and_changes_the_update():
    """Every minimiser of ``sharpness.SHARPNESS`` drives the outer step; from the same start
    and random draws, each moves the images differently from plain MTT and from each other
    (the option reaches the images' transform, none is silently another)."""
    moves = {}
    for name in sharpness.SHARPNESS:
        cfg, apply_fn, bank, x, y = distill_problem(
            sharpness=name, rho=0.1, hypergrad="truncated", truncate=2
        )
        state, _ = _steps(cfg, apply_fn, bank, x, y)
        assert int(state.iteration) == 2 and bool(jnp.all(jnp.isfinite(state.images))), name
        moves[name] = np.asarray(state.images - x)
    assert set(moves) == {"none", "sam", "asam", "gsam", "smooth_sam"}
    scale = np.abs(moves["none"]).max()
    assert scale > 0
    names = sorted(moves)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            # The closest pairs (SAM vs its GSAM and smoothed variants) differ by ~1% of the
            # move; float32 reduction noise is ~1e-6 of it.
            gap = np.abs(moves[a] - moves[b]).max()
            assert gap > 1e-3 * scale, (a, b, gap, scale)


@pytest.mark.slow
def test_non_finite_iteration_leaves_the_state_unchanged_and_is_counted():
    cfg, apply_fn, bank, x, y = distill_problem()
    bad = x.at[0, 0, 0, 0].set(jnp.nan)
    state0 = distill.init_state(cfg, bad, y)
    from satm_jax import augment

    step = jax.jit(distill.make_outer_step(apply_fn, augment.make_augment("none"), cfg))
    state1, m = step(state0, bank)
    assert int(m["finite"]) == 0
    assert int(state1.num_nonfinite) == 1 and int(state1.consecutive_nonfinite) == 1
    assert int(state1.iteration) == 1
    np.testing.assert_array_equal(np.asarray(state1.images), np.asarray(state0.images))
    assert float(state1.syn_lr) == float(state0.syn_lr)
    assert not np.array_equal(np.asarray(state1.key), np.asarray(state0.key))
    with pytest.raises(distill.DistillError, match="consecutive"):
        distill.run_distillation(
            state0,
            bank,
            dataclasses.replace(cfg, iterations=4, max_consecutive_nonfinite=3, steps_per_call=1),
            distill.make_outer_step(apply_fn, augment.make_augment("none"), cfg),
            progress=False,
            log=lambda m: None,
        )


@pytest.mark.slow
def test_step_size_stays_positive():
    cfg, apply_fn, bank, x, y = distill_problem(lr_lr=1e6, lr_floor=1e-3)
    state, _ = _steps(cfg, apply_fn, bank, x, y, n=3)
    assert float(state.syn_lr) >= 1e-3 * cfg.lr_teacher * (1 - 1e-6)


@pytest.mark.slow
def test_soft_labels_reduce_to_hard_labels_when_one_hot_and_frozen():
    cfg, apply_fn, bank, x, y = distill_problem()
    hard, _ = _steps(cfg, apply_fn, bank, x, y)
    soft_cfg = dataclasses.replace(cfg, soft_labels=True, lr_label=0.0)
    logits = 100.0 * jax.nn.one_hot(y, 2)  # softmax(100 e_y) is one-hot in float32
    soft, _ = _steps(soft_cfg, apply_fn, bank, x, y, label_logits=logits)
    tree_allclose(soft.images, hard.images, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(soft.labels), np.asarray(logits))


@pytest.mark.slow
def test_soft_labels_are_learned():
    cfg, apply_fn, bank, x, y = distill_problem(soft_labels=True, lr_label=10.0)
    logits = jax.random.normal(jax.random.PRNGKey(3), (4, 2))
    state, _ = _steps(cfg, apply_fn, bank, x, y, label_logits=logits)
    assert not np.allclose(np.asarray(state.labels), np.asarray(logits))


@pytest.mark.slow
def test_ema_with_decay_zero_is_the_raw_set_and_decay_averages():
    cfg, apply_fn, bank, x, y = distill_problem(ema_decay=0.0)
    state, _ = _steps(cfg, apply_fn, bank, x, y)
    np.testing.assert_array_equal(np.asarray(state.ema), np.asarray(state.images))
    cfg9 = dataclasses.replace(cfg, ema_decay=0.9)
    s1, _ = _steps(cfg9, apply_fn, bank, x, y, n=1)
    np.testing.assert_allclose(s1.ema, 0.9 * x + 0.1 * s1.images, rtol=1e-5, atol=1e-6)


def test_matching_range_grows_to_its_final_upper_bound():
    cfg = distill.DistillConfig(
        iterations=100, max_start_epoch=2, max_start_epoch_final=6, grow_until=40
    )
    vals = [int(distill.current_max_start(cfg, jnp.asarray(i))) for i in (0, 10, 20, 40, 90)]
    assert vals == [2, 3, 4, 6, 6]
    assert cfg.max_epoch_needed == 6 - 1 + cfg.expert_epochs


@pytest.mark.slow
def test_chunking_does_not_change_the_result():
    cfg, apply_fn, bank, x, y = distill_problem(iterations=6)
    from satm_jax import augment

    outs = []
    for spc in (1, 3):
        c = dataclasses.replace(cfg, steps_per_call=spc)
        step = distill.make_outer_step(apply_fn, augment.make_augment(c.dsa_strategy), c)
        st = distill.run_distillation(
            distill.init_state(c, x, y), bank, c, step, progress=False, log=lambda m: None
        )
        outs.append(st)
    assert int(outs[0].iteration) == int(outs[1].iteration) == 6
    tree_allclose(outs[0].images, outs[1].images, rtol=1e-5, atol=1e-6)


def test_boundaries_fall_on_absolute_multiples():
    assert distill._boundaries(0, 10, [4, 5]) == [4, 5, 8, 10]
    assert distill._boundaries(5, 10, [4, 0]) == [8, 10]


def test_config_validation_messages():
    with pytest.raises(ValueError, match="truncate"):
        distill.DistillConfig(hypergrad="truncated").validate()
    with pytest.raises(ValueError, match="sharpness"):
        distill.DistillConfig(sharpness="adam").validate()
    with pytest.raises(ValueError, match="min_start_epoch"):
        distill.DistillConfig(min_start_epoch=5, max_start_epoch=5).validate()
    for name in ("rho", "sigma", "asam_eta", "gsam_alpha", "lr_label"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            distill.DistillConfig(**{name: -1.0}).validate()


@pytest.mark.slow
def test_nan_loss_from_a_bad_expert_skips_only_those_iterations():
    cfg, apply_fn, bank, x, y = distill_problem(iterations=8, steps_per_call=4, dsa_strategy="none")
    # Expert 1's checkpoints are NaN: every iteration that samples it has a NaN loss.
    bad = expert_store.ExpertBank(jax.tree.map(lambda a: a.at[1].set(jnp.nan), bank.params))
    from satm_jax import augment

    seen = []
    step = distill.make_outer_step(apply_fn, augment.make_augment("none"), cfg)
    state = distill.run_distillation(
        distill.init_state(cfg, x, y),
        bad,
        cfg,
        step,
        progress=False,
        log=seen.append,
        metrics_fn=lambda it, m: seen.append((it, m)),
    )
    recs = [m for m in seen if isinstance(m, tuple)]
    nan_its = [m for _, m in recs if m["expert"] == 1]
    assert nan_its and all(m["finite"] == 0 and np.isnan(m["loss"]) for m in nan_its)
    assert all(m["finite"] == 1 for _, m in recs if m["expert"] == 0)
    assert int(state.num_nonfinite) == len(nan_its)
    assert bool(jnp.all(jnp.isfinite(state.images)))
    assert any(isinstance(m, str) and "non-finite" in m for m in seen)


@pytest.mark.slow
def test_calibrated_outer_loop_runs_in_the_donating_multi_step_loop():
    from satm_jax import augment

    cfg, apply_fn, bank, x, y = distill_problem(
        iterations=4,
        steps_per_call=2,
        img_optimizer="adam",
        lr_img_rel=0.01,
        lr_space="log",
        lr_init="closed_form",
        lr_init_samples=2,
    )
    state = distill.init_state(cfg, x, y)
    aug = augment.make_augment(cfg.dsa_strategy)
    state, _ = distill.calibrate_step_size(state, bank, apply_fn, aug, cfg)
    lr0 = float(state.syn_lr)
    step = distill.make_outer_step(apply_fn, aug, cfg)
    out = distill.run_distillation(state, bank, cfg, step, progress=False, log=lambda m: None)
    assert int(out.iteration) == 4 and int(out.num_nonfinite) == 0
    assert float(out.syn_lr) != lr0 and not np.allclose(out.images, x)


@pytest.mark.slow
def test_sharpness_metrics_measure_the_perturbation_and_its_loss_increase():
    """``eps_norm`` is the ball's radius (absolute: rho; per-image relative: rho ||X||);
    ``sharpness`` is the second pass minus the first and, for a small ball, its first-order
    value rho ||h|| (trajectory reusing differentiates exactly the function it perturbs)."""
    rho = 0.05
    kw = dict(hypergrad="truncated", truncate=2, sharpness="sam", reuse_trajectory=True)
    cfg, apply_fn, bank, x, y = distill_problem(rho=rho, **kw)
    state, m = _steps(cfg, apply_fn, bank, x, y, n=1)
    assert float(m["eps_norm"]) == pytest.approx(rho, rel=1e-5)
    assert float(m["sharpness"]) == pytest.approx(float(m["perturbed_loss"] - m["loss"]), 1e-6)
    assert float(m["sharpness"]) == pytest.approx(rho * float(m["grad_norm"]), rel=0.05)
    assert float(m["img_norm"]) == pytest.approx(float(jnp.linalg.norm(x)), rel=1e-5)
    assert float(m["update_norm"]) == pytest.approx(
        float(jnp.linalg.norm(state.images - x)), rel=1e-5
    )
    rel = dataclasses.replace(cfg, rho=0.01, rho_ball="per_example", rho_scale="relative")
    _, m = _steps(rel, apply_fn, bank, x, y, n=1)
    assert float(m["eps_norm"]) == pytest.approx(0.01 * float(jnp.linalg.norm(x)), rel=1e-5)
    _, m = _steps(dataclasses.replace(cfg, sharpness="none"), apply_fn, bank, x, y, n=1)
    assert "eps_norm" not in m and "sharpness" not in m
    with pytest.raises(ValueError, match="rho_ball"):
        dataclasses.replace(cfg, sharpness="none", rho_ball="per_example").validate()


@pytest.mark.parametrize("method", ["mtt", "satm"])
def test_second_order_reaches_the_unroll_and_both_modes_give_the_same_update(method, monkeypatch):
    from satm_jax import augment
    from satm_jax.experiment import configs

    calls = []
    custom = matching._unroll_forward_over_reverse
    monkeypatch.setattr(
        matching,
        "_unroll_forward_over_reverse",
        lambda *a, **k: calls.append(1) or custom(*a, **k),
    )
    cfg, apply_fn, bank, x, y = distill_problem()
    cfg = dataclasses.replace(cfg, **configs.method_settings(method, N, rho=0.05))
    out = {}
    for mode in ("reverse", "forward"):
        c = dataclasses.replace(cfg, second_order=mode)
        state = distill.init_state(c, x, y)
        step = distill.make_outer_step(apply_fn, augment.make_augment(c.dsa_strategy), c)
        calls.clear()
        out[mode] = jax.jit(step)(state, bank)[0]
        assert bool(calls) == (mode == "forward")
    tree_allclose(out["forward"].images, out["reverse"].images, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["forward"].syn_lr, out["reverse"].syn_lr, rtol=1e-5)
    with pytest.raises(ValueError, match="second_order"):
        dataclasses.replace(cfg, second_order="sideways").validate()
