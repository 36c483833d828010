"""Several networks in one program: ``train.over_models`` (vmap or lax.map), and that experts and
evaluation give the same results either way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import augment, evaluate, experts, models, train
from tests.helpers import tiny_eval_problem, tree_allclose


def test_map_and_vmap_agree_on_mapped_and_shared_arguments():
    def f(a, b, c):
        return {"sum": a + b * c, "dot": jnp.sum(a * c)}

    a = jnp.arange(12.0).reshape(3, 4)
    b = jnp.float32(2.0)
    c = jnp.arange(4.0) + 1.0
    axes = (0, None, None)
    by_map = jax.jit(train.over_models(f, axes, how="map"))(a, b, c)
    by_vmap = jax.jit(train.over_models(f, axes, how="vmap"))(a, b, c)
    assert by_map["sum"].shape == (3, 4) and by_map["dot"].shape == (3,)
    np.testing.assert_array_equal(by_map["sum"], by_vmap["sum"])
    np.testing.assert_array_equal(by_map["dot"], by_vmap["dot"])
    np.testing.assert_array_equal(by_map["dot"], np.asarray(a) @ np.asarray(c))


def test_map_runs_the_networks_one_after_another():
    # lax.map is a scan over the networks; vmap batches them into one call of fn's operations.
    def f(a):
        return jnp.sin(a) * 2.0

    x = jnp.ones((5, 3))

    def primitives(how):
        return {
            e.primitive.name for e in jax.make_jaxpr(train.over_models(f, (0,), how=how))(x).eqns
        }

    assert "scan" in primitives("map")
    assert "scan" not in primitives("vmap")


def test_auto_is_map_on_one_cpu_device_and_vmap_when_sharded():
    assert jax.default_backend() == "cpu"
    assert train.resolve_model_axis("auto") == "map"
    assert train.resolve_model_axis("auto", sharded=True) == "vmap"
    assert train.resolve_model_axis("vmap") == "vmap"
    assert train.resolve_model_axis("map", sharded=True) == "map"


def test_unknown_axis_and_unsupported_in_axes_are_refused():
    with pytest.raises(ValueError, match="model axis must be one of"):
        train.resolve_model_axis("pmap")
    with pytest.raises(ValueError, match="in_axes entries must be 0 or None"):
        train.over_models(lambda a: a, (1,), how="map")
    with pytest.raises(TypeError, match="expected 2 arguments"):
        train.over_models(lambda a, b: a, (0, None), how="map")(jnp.ones(2))


def test_evaluation_gives_the_same_accuracies_with_map_and_vmap():
    net, x, y, tx, ty = tiny_eval_problem(30)
    cfg = evaluate.EvalConfig(epochs=4, num_models=3, dsa_strategy="crop")
    res = {
        how: evaluate.evaluate_set(net, x, y, 0.05, tx, ty, cfg, progress=False, model_axis=how)
        for how in ("map", "vmap")
    }
    np.testing.assert_allclose(res["map"].accs, res["vmap"].accs, atol=1e-6)
    assert len(set(np.round(res["map"].accs, 6))) > 1  # three different networks, not one


def test_experts_train_the_same_trajectories_with_map_and_vmap(digits):
    net = models.ConvNet(num_classes=10, width=4, depth=1)
    x = jnp.asarray(digits.train_images[:128], jnp.float32) / 255.0
    y = jnp.asarray(digits.train_labels[:128])
    cfg = experts.ExpertConfig(num_experts=2, epochs=2, batch_size=64, dsa_strategy="crop")
    aug = augment.make_augment("crop")
    out = {
        how: experts.train_experts(
            net,
            cfg,
            x,
            y,
            [0, 1],
            augment_fn=aug,
            test_images=x,
            test_labels=y,
            progress=False,
            model_axis=how,
        )
        for how in ("map", "vmap")
    }
    for (i, traj_m, acc_m), (j, traj_v, acc_v) in zip(out["map"], out["vmap"]):
        assert i == j and len(traj_m) == 3
        for pm, pv in zip(traj_m, traj_v):
            tree_allclose(pm, pv, rtol=1e-5, atol=1e-6)
        assert acc_m == pytest.approx(acc_v, abs=1e-6)
    k0 = out["map"][0][1][-1]["Dense_0"]["kernel"]
    k1 = out["map"][1][1][-1]["Dense_0"]["kernel"]
    assert not np.allclose(k0, k1)  # two experts, not one trained twice
