"""Has the outer loop converged? A report on a run's matching-loss curve and image movement.

The matching loss of trajectory matching is noisy (each iteration draws another expert, start
epoch, minibatches and augmentations), so "still falling" compares the smoothed loss at the end
(the mean of the last tenth of the iterations) with the smoothed loss one tenth earlier (the
mean of the tenth before): the loss is still falling when the drop is both significant (more
than ``t_threshold`` standard errors of the difference of the two means) and material (more
than ``min_drop`` of the last tenth's mean). Which trajectory an iteration drew (expert and
start epoch) moves the loss more than anything else, and a run's draws are shared by every run
with the same seed, so a chance run of hard draws looks like a trend. With ``groups`` (one
trajectory id per iteration) the test runs on losses adjusted for the draw: each loss minus
its trajectory's mean over the second half of the run, plus the second half's mean. The report also gives the smoothed loss at the
start and the end, the step size's trajectory, the relative size of the image update per
iteration and how far the images moved from their initialisation, and a warning for each way a
run can fall short:

* ``not converged``: the loss is still falling over the last tenth;
* ``images barely moved``: the set moved less than ``min_image_move`` of its own norm, or the
  smoothed loss fell by less than ``min_loss_drop`` of its initial value;
* ``matching loss rose``: the smoothed loss ended more than ``min_loss_drop`` above where it
  started although the images moved (by at least ``min_image_move``): the outer update made
  the set worse (an image learning rate or a SAM radius too large), which is not a lack of
  movement;
* ``step size still moving``: the learned step size (which the evaluation trains with) changed
  by more than ``max_lr_drift`` (in log space) over the last tenth of the run, although the loss
  may have levelled off.

The thresholds are **our choice**.

Example:
  >>> import numpy as np
  >>> from satm_jax import convergence
  >>> falling = 1.0 - 0.5 * np.arange(500) / 500
  >>> r = convergence.report(falling, image_move=0.3)
  >>> r["still_falling"], r["warnings"][0][:13]
  (True, 'not converged')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_DROP = 0.01  # of the window's mean loss
T_THRESHOLD = 2.0
MIN_IMAGE_MOVE = 0.02  # of the initial set's norm
MIN_LOSS_DROP = 0.02  # of the initial smoothed loss
MAX_LR_DRIFT = 0.05  # |log(alpha_end / alpha_at_the_start_of_the_last_tenth)|


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over ``window`` values (shorter at the start)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return v
    window = max(1, int(window))
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def drop_between(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """``mean(before) - mean(after)`` and its standard error (Welch)."""
    a, b = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if a.size < 2 or b.size < 2:
        return 0.0, float("inf")
    se = float(np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size))
    return float(a.mean() - b.mean()), se


def adjust_for_groups(values: Sequence[float], groups: Sequence[int]) -> np.ndarray:
    """``values`` with each group's mean over the second half removed (the second half's mean
    added back); groups absent from the second half are left as they are."""
    y = np.asarray(values, np.float64).copy()
    g = np.asarray(groups)
    half = y.size // 2
    if half == 0:
        return y
    late_y, late_g = y[half:], g[half:]
    overall = late_y.mean()
    for k in np.unique(late_g):
        y[g == k] += overall - late_y[late_g == k].mean()
    return y


def report(
    losses: Sequence[float],
    *,
    groups: Sequence[int] | None = None,
    syn_lrs: Sequence[float] | None = None,
    image_updates: Sequence[float] | None = None,
    image_move: float | None = None,
    min_drop: float = MIN_DROP,
    t_threshold: float = T_THRESHOLD,
    min_image_move: float = MIN_IMAGE_MOVE,
    min_loss_drop: float = MIN_LOSS_DROP,
    max_lr_drift: float = MAX_LR_DRIFT,
) -> dict[str, Any]:
    """The convergence report of one run (a JSON-ready dict).

    Args:
      losses: the matching loss per iteration, in order.
      groups: the trajectory drawn at each iteration (e.g. ``start_epoch * 1000 + expert``);
        the "still falling" test then uses ``adjust_for_groups(losses, groups)``.
      syn_lrs: the step size after each iteration.
      image_updates: ``||X_{i+1} - X_i|| / ||X_i||`` per iteration.
      image_move: ``||X_final - X_0|| / ||X_0||``.
      min_drop, t_threshold: what counts as "still falling" over the last tenth.
      min_image_move, min_loss_drop: below either, the images "barely moved".
      max_lr_drift: above this ``|log|`` change of the step size over the last tenth, the step
        size is "still moving".

    Returns:
      ``iterations``, ``loss_start``/``loss_end`` (mean of the first/last tenth),
      ``loss_drop`` (relative), ``last_tenth_drop`` (the smoothed loss's drop over the last
      tenth, relative to its level), ``last_tenth_t`` (its t statistic), ``still_falling``, ``image_move``,
      ``image_update_median``, ``syn_lr`` (start, end, the relative change over the last
      tenth and ``still_moving``), ``converged`` and ``warnings`` (strings).
    """
    y = np.asarray(losses, np.float64)
    finite = np.isfinite(y)
    y = y[finite]
    adj = y if groups is None else adjust_for_groups(y, np.asarray(groups)[finite])
    n = int(y.size)
    out: dict[str, Any] = {"iterations": n, "warnings": []}
    if n == 0:
        out.update(converged=False, still_falling=False)
        out["warnings"].append("no finite matching loss was recorded")
        return out
    tenth = max(1, n // 10)
    loss_start, loss_end = float(y[:tenth].mean()), float(y[-tenth:].mean())
    diff, se = drop_between(adj[-2 * tenth : -tenth], adj[-tenth:])
    drop = diff / max(abs(loss_end), 1e-30)
    t = diff / se if se > 0 else (float("inf") if diff > 0 else 0.0)
    still_falling = bool(n >= 20 and t > t_threshold and drop > min_drop)
    loss_drop = (loss_start - loss_end) / max(abs(loss_start), 1e-30)
    out.update(
        loss_start=loss_start,
        loss_end=loss_end,
        loss_drop=float(loss_drop),
        last_tenth_drop=float(drop),
        last_tenth_t=float(t),
        still_falling=still_falling,
    )
    lr_moving = False
    if syn_lrs is not None and len(syn_lrs):
        lr = np.asarray(syn_lrs, np.float64)
        lt = lr[-tenth:]
        log_change = float(np.log(lt[-1] / lt[0])) if lt[0] > 0 and lt[-1] > 0 else float("inf")
        lr_moving = bool(n >= 20 and abs(log_change) > max_lr_drift)
        out["syn_lr"] = {
            "first": float(lr[0]),
            "last": float(lr[-1]),
            "min": float(lr.min()),
            "max": float(lr.max()),
            "last_tenth_change": float((lt[-1] - lt[0]) / max(abs(lt[0]), 1e-30)),
            "still_moving": lr_moving,
        }
    if image_updates is not None and len(image_updates):
        out["image_update_median"] = float(np.median(np.asarray(image_updates, np.float64)))
    if image_move is not None:
        out["image_move"] = float(image_move)
    moved_little = image_move is not None and image_move < min_image_move
    rose = bool(loss_drop < -min_loss_drop and not moved_little)
    barely = not rose and (loss_drop < min_loss_drop or moved_little)
    out["loss_rose"] = rose
    if still_falling:
        out["warnings"].append(
            f"not converged: the matching loss is still falling over the last tenth of the run "
            f"({100 * drop:.1f}% of its level, t = {t:.1f}); raise --iterations, or the image "
            "learning rate (--lr_img, --lr_img_rel)"
        )
    if barely:
        move = "" if image_move is None else f", images moved {100 * image_move:.2f}% of their norm"
        out["warnings"].append(
            f"images barely moved: the smoothed matching loss fell by {100 * loss_drop:.1f}%"
            f"{move}; raise the image learning rate (--lr_img, or --img_optimizer=adam "
            "--lr_img_rel) or the step size's (--lr_lr, --lr_log_lr)"
        )
    if rose:
        move = (
            ""
            if image_move is None
            else f" while the images moved {100 * image_move:.0f}% of their norm"
        )
        out["warnings"].append(
            f"matching loss rose: the smoothed matching loss ended {100 * -loss_drop:.1f}% above "
            f"its start{move}: the outer update made the set worse; lower the image learning "
            "rate (--lr_img, --lr_img_rel) or, for SATM, the radius (--rho)"
        )
    if lr_moving:
        change = out["syn_lr"]["last_tenth_change"]
        out["warnings"].append(
            f"step size still moving: the learned step size changed by {100 * change:+.1f}% over "
            f"the last tenth of the run (to {out['syn_lr']['last']:.4g}), and the evaluation "
            "trains with it; raise --iterations, or the step size's learning rate "
            "(--lr_log_lr, --lr_lr)"
        )
    out["converged"] = not (still_falling or barely or rose or lr_moving)
    return out
