"""Several devices: the 8 simulated CPU devices give the single-device results."""

import jax
import jax.numpy as jnp
import numpy as np

from satm_jax import augment, distill, experts, models, parallel
from tests.conftest import tiny_problem, tree_allclose
from tests.test_distill import _bank


def test_eight_simulated_devices_are_present():
    assert len(jax.devices()) == 8
    assert parallel.num_devices(parallel.make_mesh()) == 8


def test_data_parallel_outer_step_matches_one_device():
    _, apply_fn, params, _, x, y = tiny_problem(n=16, classes=4)
    bank = _bank(params)
    cfg = distill.DistillConfig(
        ipc=4,
        syn_steps=3,
        expert_epochs=1,
        max_start_epoch=3,
        lr_img=10.0,
        lr_teacher=0.05,
        batch_syn=8,
        sharpness="sam",
        rho=0.1,
        hypergrad="truncated",
        truncate=2,
        lr_update="first_order",
    )
    aug = augment.make_augment("crop_flip_scale")
    single = jax.jit(distill.make_outer_step(apply_fn, aug, cfg))
    mesh = parallel.make_mesh()
    multi = jax.jit(distill.make_outer_step(apply_fn, aug, cfg, mesh=mesh))
    s1 = distill.init_state(cfg, x, y)
    s8 = parallel.replicate(distill.init_state(cfg, x, y), mesh)
    bank8 = parallel.replicate(bank, mesh)
    for _ in range(2):
        s1, m1 = single(s1, bank)
        s8, m8 = multi(s8, bank8)
    assert len(s8.images.sharding.device_set) == 8
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    tree_allclose(s8.images, s1.images, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s8.syn_lr, s1.syn_lr, rtol=1e-5)
    # The compiled program really splits the batch: it contains cross-device reductions.
    hlo = multi.lower(s8, bank8).compile().as_text()
    assert "all-reduce" in hlo


def test_experts_trained_across_devices_match_one_device(digits):
    net = models.ConvNet(num_classes=10, width=4, depth=1)
    x = jnp.asarray(digits.train_images[:128], jnp.float32) / 255.0
    y = jnp.asarray(digits.train_labels[:128])
    cfg = experts.ExpertConfig(
        num_experts=8, epochs=2, batch_size=64, parallel=8, dsa_strategy="crop"
    )
    aug = augment.make_augment("crop")
    ids = list(range(8))
    one = experts.train_experts(net, cfg, x, y, ids, augment_fn=aug, progress=False)
    many = experts.train_experts(
        net, cfg, x, y, ids, augment_fn=aug, progress=False, mesh=parallel.make_mesh()
    )
    for (i, t1, _), (j, t8, _) in zip(one, many):
        assert i == j
        tree_allclose(t8[-1], t1[-1], rtol=1e-4, atol=1e-5)


def test_shard_leading_refuses_indivisible_axes():
    mesh = parallel.make_mesh()
    out = parallel.shard_leading(jnp.zeros((16, 3)), mesh)
    assert len(out.sharding.device_set) == 8
    import pytest

    with pytest.raises(ValueError, match="not divisible"):
        parallel.shard_leading(jnp.zeros((6, 3)), mesh)


def test_multi_host_initialisation_passes_the_launch_arguments(monkeypatch):
    seen = {}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    parallel.initialize_distributed("10.0.0.1:1234", 4, 2)
    assert seen == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    assert parallel.is_main_process()  # a single process is process 0
