"""Several devices: the 8 simulated CPU devices give the single-device results."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import augment, distill, expert_store, experts, jsonio, models, parallel
from tests.helpers import synthetic_bank, tiny_problem, tree_allclose


def test_eight_simulated_devices_are_present():
    assert len(jax.devices()) == 8
    assert parallel.num_devices(parallel.make_mesh()) == 8


@pytest.mark.slow
def test_data_parallel_outer_step_matches_one_device():
    _, apply_fn, params, _, x, y = tiny_problem(n=16, classes=4)
    bank = synthetic_bank(params)
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


def _recording_trainer(monkeypatch):
    """Wraps ``experts.make_expert_trainer`` so that every epoch's inputs and output states are
    kept: the arrays ``train_experts`` really trains on, with their shardings."""
    seen = []
    real = experts.make_expert_trainer

    def make(*args, **kw):
        init, epoch = real(*args, **kw)

        def recording_epoch(states, keys, images, labels):
            new_states, metrics = epoch(states, keys, images, labels)
            seen.append({"keys": keys, "images": images, "params": new_states.params})
            return new_states, metrics

        return init, recording_epoch

    monkeypatch.setattr(experts, "make_expert_trainer", make)
    return seen


@pytest.mark.slow
def test_experts_trained_across_devices_match_one_device(digits, monkeypatch):
    net = models.ConvNet(num_classes=10, width=4, depth=1)
    x = jnp.asarray(digits.train_images[:128], jnp.float32) / 255.0
    y = jnp.asarray(digits.train_labels[:128])
    cfg = experts.ExpertConfig(
        num_experts=8, epochs=2, batch_size=64, parallel=8, dsa_strategy="crop"
    )
    aug = augment.make_augment("crop")
    ids = list(range(8))
    seen = _recording_trainer(monkeypatch)
    one = experts.train_experts(net, cfg, x, y, ids, augment_fn=aug, progress=False)
    assert len(seen) == 2
    for leaf in jax.tree.leaves(seen[-1]["params"]):
        assert len(leaf.sharding.device_set) == 1  # no mesh: one device
    seen.clear()
    mesh = parallel.make_mesh()
    messages = []
    many = experts.train_experts(
        net, cfg, x, y, ids, augment_fn=aug, progress=False, mesh=mesh, log=messages.append
    )
    assert messages == [] and len(seen) == 2
    for record in seen:
        # Each of the 8 devices holds one expert's key and parameters, and all the data.
        assert record["keys"].sharding.is_equivalent_to(parallel.leading(mesh), 2)
        assert record["images"].sharding.is_fully_replicated
        assert len(record["images"].sharding.device_set) == 8
        for leaf in jax.tree.leaves(record["params"]):
            assert leaf.shape[0] == 8
            assert leaf.sharding.is_equivalent_to(parallel.leading(mesh), leaf.ndim)
            shards = leaf.addressable_shards
            assert len({s.device for s in shards}) == 8
            assert sorted(s.index[0].start for s in shards) == list(range(8))
            assert all(s.data.shape[0] == 1 for s in shards)
    for (i, t1, _), (j, t8, _) in zip(one, many):
        assert i == j
        tree_allclose(t8[-1], t1[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_group_that_does_not_divide_the_devices_trains_on_one_device_and_says_so(
    digits, monkeypatch, caplog
):
    net = models.ConvNet(num_classes=10, width=4, depth=1)
    x = jnp.asarray(digits.train_images[:32], jnp.float32) / 255.0
    y = jnp.asarray(digits.train_labels[:32])
    cfg = experts.ExpertConfig(
        num_experts=3, epochs=1, batch_size=32, parallel=3, dsa_strategy="none"
    )
    seen = _recording_trainer(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="satm_jax.experts"):
        out = experts.train_experts(
            net,
            cfg,
            x,
            y,
            [0, 1, 2],
            augment_fn=augment.make_augment("none"),
            progress=False,
            mesh=parallel.make_mesh(),
        )
    assert [i for i, _, _ in out] == [0, 1, 2]
    (message,) = [r.getMessage() for r in caplog.records if r.name == "satm_jax.experts"]
    assert "experts 0-2: a group of 3 does not divide across 8 devices" in message
    assert "training it on one device" in message and "--expert_parallel" in message
    for leaf in jax.tree.leaves(seen[-1]["params"]):
        assert len(leaf.sharding.device_set) == 1


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


@pytest.mark.parametrize("index,writes", [(0, True), (1, False)])
def test_only_process_zero_writes_outputs(tmp_path, monkeypatch, index, writes):
    from satm_jax import jsonio, outputs, parallel

    monkeypatch.setattr(parallel.jax, "process_index", lambda: index)
    assert parallel.is_main_process() == writes
    jsonio.write_json(str(tmp_path / "a.json"), {"a": 1})
    w = outputs.MetricsWriter(str(tmp_path), tensorboard=False)
    w.iteration(1, {"loss": 0.5})
    w.scalar(1, "eval/acc_mean", 50.0)
    w.close()
    res = {"results": [{"method": "mtt", "ipc": 1, "acc_mean": 50.0, "acc_std": 1.0, "n_eval": 2}]}
    outputs.write_results_table(str(tmp_path / "results.md"), res)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == (["a.json", "metrics.jsonl", "results.md"] if writes else [])


@pytest.mark.parametrize("index", [0, 1])
def test_every_process_meets_at_a_barrier_before_and_after_each_write(tmp_path, monkeypatch, index):

    seen = []
    monkeypatch.setattr(parallel.jax, "process_index", lambda: index)
    monkeypatch.setattr(parallel, "sync", seen.append)

    @parallel.main_process_only
    def report(path):  # a writer that calls another: it meets only at its own barriers
        jsonio.write_json(path, {"a": 1})

    report(str(tmp_path / "a.json"))
    name = f"{__name__}.{report.__qualname__}"
    assert seen == [f"{name}:before", f"{name}:after"]
    assert os.path.exists(tmp_path / "a.json") == (index == 0)
    seen.clear()
    expert_store.ExpertStore.create(str(tmp_path / "store"), {"a": 1}, num_experts=1, epochs=1)
    assert seen == ["satm_jax.jsonio.write_json:before", "satm_jax.jsonio.write_json:after"]
    assert os.path.exists(tmp_path / "store" / "manifest.json") == (index == 0)


def test_meshes_span_only_this_process_devices():
    from satm_jax import parallel

    assert list(parallel.make_mesh().devices) == jax.local_devices()
