"""Expert training, orbax storage, partial loading, refusal of mismatched stores."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import augment, expert_store, experts, models
from tests.helpers import flatten, read_json, tree_allclose

SPEC = {
    "dataset": "digits",
    "image_shape": [8, 8, 1],
    "num_classes": 3,
    "model": {"name": "convnet", "width": 4, "depth": 1, "norm": "instancenorm"},
    "preprocessing": {"zca": False, "zca_eps": None},
}


def _traj(epochs=3, seed=0):
    net = models.ConvNet(num_classes=3, width=4, depth=1)
    p = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 1)))["params"]
    return net, [jax.tree.map(lambda x: np.asarray(x + e), p) for e in range(epochs + 1)]


def test_save_and_load_round_trip(tmp_path):
    net, traj = _traj()
    store = expert_store.ExpertStore.create(
        str(tmp_path), SPEC, num_experts=2, epochs=3, training={"lr": 0.01}
    )
    store.save_expert(1, traj, test_acc=0.5)
    assert store.completed() == [1] and store.missing() == [0]
    reopened = expert_store.ExpertStore.open(str(tmp_path), SPEC)
    start, target = reopened.load_pair(1, 1, 2, like=traj[0])
    tree_allclose(start, traj[1], rtol=0, atol=0)
    tree_allclose(target, traj[3], rtol=0, atol=0)
    window = reopened.load_window(1, 2)
    assert jax.tree.leaves(window)[0].shape[0] == 3
    bank = reopened.load_bank(2, like=traj[0])
    assert bank.num_experts == 1 and bank.num_epochs == 3
    s, t, e, ep = experts.sample_start_target(bank, jax.random.PRNGKey(0), 0, 2, 1)
    tree_allclose(s, jax.tree.map(lambda x: x + int(ep), traj[0]), rtol=1e-6, atol=1e-6)
    assert read_json(tmp_path / "manifest.json")["test_acc"] == {"1": 0.5}


def test_partial_restore_reads_only_the_requested_epochs(tmp_path, monkeypatch):
    from orbax.checkpoint import type_handlers

    net, traj = _traj(epochs=5)
    store = expert_store.ExpertStore.create(str(tmp_path), SPEC, num_experts=1, epochs=5)
    store.save_expert(0, traj)
    # Record every parameter orbax deserialises from disk, whatever handler reads it.
    read = []
    for cls in (
        type_handlers.NumpyHandler,
        type_handlers.ArrayHandler,
        type_handlers.ScalarHandler,
    ):

        def recording(orig):
            async def deserialize(self, infos, args=None):
                read.extend(i.name for i in infos if not i.skip_deserialize)
                return await orig(self, infos, args)

            return deserialize

        monkeypatch.setattr(cls, "deserialize", recording(cls.deserialize))
    out = store._restore(0, [2, 4], None)
    assert sorted(out) == ["epoch_002", "epoch_004"]
    tree_allclose(out["epoch_002"], traj[2], rtol=0, atol=0)
    tree_allclose(out["epoch_004"], traj[4], rtol=0, atol=0)
    n_leaves = len(jax.tree.leaves(traj[0]))
    assert len(read) == 2 * n_leaves, read  # each leaf of the two epochs once, nothing else
    assert {name.split(".")[0] for name in read} == {"epoch_002", "epoch_004"}
    # load_pair goes through the same partial read.
    read.clear()
    store.load_pair(0, 1, 3)
    assert sorted({name.split(".")[0] for name in read}) == ["epoch_001", "epoch_004"]
    assert len(read) == 2 * n_leaves


def test_mismatched_store_is_refused_with_what_differs(tmp_path):
    expert_store.ExpertStore.create(str(tmp_path), SPEC, num_experts=1, epochs=3)
    other = json.loads(json.dumps(SPEC))
    other["model"]["width"] = 128
    other["preprocessing"]["zca"] = True
    with pytest.raises(expert_store.ExpertMismatchError) as e:
        expert_store.ExpertStore.open(str(tmp_path), other)
    msg = str(e.value)
    assert "model.width: stored 4, requested 128" in msg
    assert "preprocessing.zca: stored False, requested True" in msg
    other = dict(SPEC, dataset="mnist")
    with pytest.raises(
        expert_store.ExpertMismatchError, match="dataset: stored 'digits', requested 'mnist'"
    ):
        expert_store.ExpertStore.open(str(tmp_path), other)


def test_different_training_settings_are_refused(tmp_path):
    expert_store.ExpertStore.create(
        str(tmp_path), SPEC, num_experts=1, epochs=3, training={"lr": 0.01}
    )
    with pytest.raises(expert_store.ExpertMismatchError, match="training.lr"):
        expert_store.ExpertStore.open_or_create(
            str(tmp_path), SPEC, num_experts=1, epochs=3, training={"lr": 0.1}
        )
    with pytest.raises(expert_store.ExpertMismatchError, match="epochs"):
        expert_store.ExpertStore.open_or_create(
            str(tmp_path), SPEC, num_experts=1, epochs=9, training={"lr": 0.01}
        )


def test_parameters_that_do_not_fit_the_model_are_refused(tmp_path):
    net, traj = _traj()
    store = expert_store.ExpertStore.create(str(tmp_path), SPEC, num_experts=1, epochs=3)
    store.save_expert(0, traj)
    wide = models.ConvNet(num_classes=3, width=8, depth=1)
    like = wide.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    with pytest.raises(
        expert_store.ExpertMismatchError,
        match=r"stored shape \(3, 3, 1, 4\), model expects \(3, 3, 1, 8\)",
    ):
        store.load_pair(0, 0, 1, like=like)


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(expert_store.ExpertError, match="no expert store"):
        expert_store.ExpertStore.open(str(tmp_path / "nothing"))
    net, traj = _traj()
    store = expert_store.ExpertStore.create(str(tmp_path), SPEC, num_experts=1, epochs=3)
    store.save_expert(0, traj)
    with pytest.raises(expert_store.ExpertError, match="not finished"):
        store.load_pair(5, 0, 1)
    # Damage the checkpoint's data files.
    for root, _, files in os.walk(tmp_path / "expert_0000"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(expert_store.ExpertError, match="corrupt"):
        store.load_pair(0, 0, 1)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(expert_store.ExpertError, match="corrupt expert manifest"):
        expert_store.ExpertStore.open(str(tmp_path))


@pytest.mark.slow
def test_training_records_every_epoch_and_resumes_expert_by_expert(tmp_path, digits):
    net = models.ConvNet(num_classes=10, width=4, depth=1)
    x = jnp.asarray(digits.train_images[:200], jnp.float32) / 255.0
    y = jnp.asarray(digits.train_labels[:200])
    cfg = experts.ExpertConfig(
        num_experts=3, epochs=2, batch_size=64, parallel=2, dsa_strategy="crop"
    )
    spec = dict(SPEC, num_classes=10)
    store = expert_store.ExpertStore.create(str(tmp_path), spec, num_experts=3, epochs=2)
    aug = augment.make_augment("crop")
    # Train only the first group (an interrupted run), then resume.
    res = experts.train_experts(
        net, cfg, x, y, [0, 1], augment_fn=aug, test_images=x, test_labels=y, progress=False
    )
    for i, t, a in res:
        assert len(t) == 3 and 0.0 <= a <= 1.0
        store.save_expert(i, t, a)
    assert store.missing(3) == [2]
    messages = []
    experts.generate_experts(
        store, net, cfg, x, y, augment_fn=aug, progress=False, log=messages.append
    )
    assert store.completed() == [0, 1, 2]
    assert "2 of 3 already" in messages[0]
    s0, s1 = store.load_pair(0, 0, 1)
    assert not np.allclose(s0["Dense_0"]["kernel"], s1["Dense_0"]["kernel"])  # it trained
    a0 = store.load_pair(0, 0, 2)[0]
    a1 = store.load_pair(1, 0, 2)[0]
    assert not np.allclose(a0["Dense_0"]["kernel"], a1["Dense_0"]["kernel"])  # different inits


@pytest.mark.slow
def test_a_diverged_expert_is_refused_not_saved(tmp_path, digits):
    net = models.ConvNet(num_classes=10, width=4, depth=1)
    x = jnp.asarray(digits.train_images[:64], jnp.float32) / 255.0
    y = jnp.asarray(digits.train_labels[:64])
    cfg = experts.ExpertConfig(
        num_experts=1, epochs=1, batch_size=16, parallel=1, dsa_strategy="none", lr=1e30
    )
    store = expert_store.ExpertStore.create(
        str(tmp_path), dict(SPEC, num_classes=10), num_experts=1, epochs=1
    )
    with pytest.raises(expert_store.ExpertError, match="diverged"):
        experts.generate_experts(
            store,
            net,
            cfg,
            x,
            y,
            augment_fn=augment.make_augment("none"),
            progress=False,
            log=lambda m: None,
        )
    assert store.completed() == []


@pytest.mark.slow
def test_gsam_experts_take_the_gsam_step_by_hand(digits):
    """FTD's flat experts: one full-batch epoch is one SGD step along GSAM's direction."""
    net = models.ConvNet(num_classes=10, width=4, depth=1)
    x = jnp.asarray(digits.train_images[:32], jnp.float32) / 255.0
    y = jnp.asarray(digits.train_labels[:32])
    rho, alpha, lr = 0.05, 0.4, 0.1
    cfg = experts.ExpertConfig(
        num_experts=1,
        epochs=1,
        lr=lr,
        batch_size=32,
        dsa_strategy="none",
        sharpness="gsam",
        rho=rho,
        gsam_alpha=alpha,
    )
    identity = augment.make_augment("none")
    init, epoch = experts.make_expert_trainer(net, x.shape[1:], cfg, identity)
    keys = jnp.stack([jax.random.PRNGKey(3)])
    states = init(keys)
    new_states, _ = epoch(states, keys, x, y)

    p = jax.tree.map(lambda a: a[0], states.params)

    def loss(params):  # one batch holding every image: the permutation does not matter
        logits = net.apply({"params": params}, x, train=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))

    h = jax.grad(loss)(p)
    hf = flatten(h)
    g = flatten(jax.grad(loss)(jax.tree.map(lambda a, b: a + rho * b / np.linalg.norm(hf), p, h)))
    direction = g - alpha * (hf - (hf @ g) / (g @ g) * g)
    got = flatten(jax.tree.map(lambda a: a[0], new_states.params))
    np.testing.assert_allclose(got, flatten(p) - lr * direction, rtol=1e-4, atol=1e-6)

    # Plain experts from the same start take a different step (the option is not ignored).
    plain = dataclasses.replace(cfg, sharpness="none")
    _, epoch_plain = experts.make_expert_trainer(net, x.shape[1:], plain, identity)
    got_plain = flatten(jax.tree.map(lambda a: a[0], epoch_plain(states, keys, x, y)[0].params))
    np.testing.assert_allclose(got_plain, flatten(p) - lr * hf, rtol=1e-4, atol=1e-6)
    assert np.abs(got - got_plain).max() > 1e-6


def test_expert_sharpness_is_part_of_the_store_identity(tmp_path):
    from satm_jax.experiment import configs, pipeline

    cfg = configs.make_run_config("digits", 1, "mtt", "default")
    flat_cfg = configs.make_run_config("digits", 1, "mtt", "default", {"expert_sharpness": "gsam"})
    plain, flat = pipeline.expert_training(cfg), pipeline.expert_training(flat_cfg)
    assert plain["sharpness"] == "none" and flat["sharpness"] == "gsam" and "rho" in flat
    expert_store.ExpertStore.create(str(tmp_path), SPEC, num_experts=1, epochs=3, training=plain)
    with pytest.raises(expert_store.ExpertMismatchError, match="sharpness"):
        expert_store.ExpertStore.open_or_create(
            str(tmp_path), SPEC, num_experts=1, epochs=3, training=flat
        )
    with pytest.raises(ValueError, match="expert sharpness"):
        experts.make_expert_trainer(
            models.ConvNet(num_classes=3, width=4, depth=1),
            (8, 8, 1),
            dataclasses.replace(flat_cfg.experts, sharpness="smooth_sam"),
            augment.make_augment("none"),
        )


def test_a_run_reads_only_as_many_experts_as_it_asks_for(tmp_path):
    import dataclasses

    from satm_jax.experiment import configs, pipeline

    net, traj = _traj()
    store = expert_store.ExpertStore.create(str(tmp_path), SPEC, num_experts=3, epochs=3)
    for i in range(3):
        store.save_expert(i, [jax.tree.map(lambda x, i=i: x + 10 * i, p) for p in traj])
    cfg = configs.make_run_config(
        "digits", 1, "mtt", overrides={"num_experts": 2, "max_start_epoch": 1}
    )
    bank = pipeline.load_expert_bank(store, cfg, traj[0])
    assert bank.num_experts == 2  # not the store's 3
    first = jax.tree.leaves(bank.params)[0]
    np.testing.assert_allclose(first[1, 0], jax.tree.leaves(traj[0])[0] + 10)
    more = dataclasses.replace(cfg, experts=dataclasses.replace(cfg.experts, num_experts=4))
    with pytest.raises(expert_store.ExpertError, match="holds 3 finished experts, the run needs 4"):
        pipeline.load_expert_bank(store, more, traj[0])


def test_find_compatible_needs_the_same_spec_and_training_more_epochs_and_enough_experts(
    tmp_path,
):
    net, traj = _traj()
    store = expert_store.ExpertStore.create(
        str(tmp_path / "b"), SPEC, num_experts=2, epochs=3, training={"lr": 0.01}
    )
    store.save_expert(0, traj)
    store.save_expert(1, traj)
    find = expert_store.find_compatible
    root = str(tmp_path)
    assert find(root, SPEC, {"lr": 0.01}, epochs=2, num_experts=2) == store.directory
    assert find(root, SPEC, {"lr": 0.01}, epochs=3, num_experts=2) is None  # not more epochs
    assert find(root, SPEC, {"lr": 0.01}, epochs=2, num_experts=3) is None  # too few experts
    assert find(root, SPEC, {"lr": 0.1}, epochs=2, num_experts=1) is None  # other training
    assert find(root, dict(SPEC, dataset="mnist"), {"lr": 0.01}, epochs=2, num_experts=1) is None
    assert find(str(tmp_path / "absent"), SPEC, {"lr": 0.01}, epochs=2, num_experts=1) is None
