"""The class-incremental protocol (DM's CL_DM.py): class orders, stage data, memory, evaluation.

Most tests run the protocol on digits with the expensive pieces replaced by recorders (expert
training, condensation and the evaluation networks record what they are given; herding's
feature network is left untrained), so what each stage is given can be checked cheaply; the
``slow`` test runs everything for real on a tiny configuration.
"""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import datasets, evaluate, experts, herding, jsonio, outputs
from satm_jax.experiment import configs, continual, pipeline
from tests.helpers import run_module

TINY = dict(
    width=8,
    depth=1,
    dsa_strategy="none",
    num_experts=2,
    expert_parallel=2,
    expert_train_epochs=3,
    max_start_epoch=2,
    expert_epochs=1,
    iterations=2,
    syn_steps=2,
    steps_per_call=1,
    checkpoint_every=1,
    eval_epochs=2,
    num_eval=2,
)


@pytest.fixture(scope="module")
def digits_ds():
    return datasets.load_dataset("digits")


def _literal_orders(num_classes, seeds):
    out = []
    for s in seeds:
        np.random.seed(s)
        out.append(np.random.permutation(num_classes))
    return out


def _prepared(ds):
    """The full splits as the protocol preprocesses them (fitted on the whole training split)."""
    prep = datasets.fit_preprocessing(ds.train_images, datasets.Preprocessing(zca=False))
    return prep.forward(ds.train_images), prep.forward(ds.test_images)


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def test_class_orders_are_np_random_permutation_under_the_seeds():
    seeds = [0, 1, 2, 3, 4, 7, 123]
    for n in (10, 100):
        got = continual.class_orders(n, seeds)
        want = _literal_orders(n, seeds)
        assert [g.tolist() for g in got] == [w.tolist() for w in want]
        # RandomState(s).permutation is the same stream (checked, not assumed).
        assert [g.tolist() for g in got] == [
            np.random.RandomState(s).permutation(n).tolist() for s in seeds
        ]
        for g in got:
            assert sorted(g.tolist()) == list(range(n))
    assert continual.class_orders(10, [0])[0].tolist() == [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]
    # The global NumPy stream is left as it was.
    np.random.seed(99)
    expected = np.random.rand(3)
    np.random.seed(99)
    continual.class_orders(10, [0, 1])
    np.testing.assert_array_equal(np.random.rand(3), expected)


def test_stages_split_the_order_into_equal_consecutive_parts_and_refuse_bad_counts():
    order = continual.class_orders(10, [0])[0]
    stages = continual.split_stages(order, 5)
    assert [s.tolist() for s in stages] == [[2, 8], [4, 9], [1, 6], [7, 3], [0, 5]]
    assert [s.tolist() for s in continual.split_stages(order, 1)] == [order.tolist()]
    for bad, message in ((3, "do not divide 10 classes"), (0, ">= 1"), (-2, ">= 1")):
        with pytest.raises(configs.ConfigError, match=message):
            continual.split_stages(order, bad)


def test_config_refuses_bad_names_and_ranges():
    ok = dict(dataset="digits", ipc=1, stages=5)
    for bad, message in (
        (dict(methods=("random", "dm")), "unknown continual method 'dm'"),
        (dict(methods=()), "non-empty"),
        (dict(methods=("mtt", "mtt")), "distinct"),
        (dict(class_orders=(0, 0)), "distinct"),
        (dict(ipc=0), "ipc must be >= 1"),
        (dict(stages=0), ">= 1"),
        (dict(lr=0.0), "positive"),
        (dict(herding_epochs=0), "herding_epochs"),
    ):
        with pytest.raises(configs.ConfigError, match=message):
            continual.ContinualConfig(**{**ok, **bad}).validate()
    with pytest.raises(configs.ConfigError, match="soft labels"):
        continual.method_config(
            continual.ContinualConfig(**ok, overrides={"soft_labels": True}), "satm"
        )


def test_run_refuses_stages_that_do_not_divide_and_ipc_above_a_class(digits_ds, tmp_path):
    wd = str(tmp_path / "wd")
    with pytest.raises(configs.ConfigError, match="do not divide"):
        continual.run_continual(
            continual.ContinualConfig("digits", 1, 4, preset="default"), wd, dataset=digits_ds
        )
    smallest = int(digits_ds.class_counts().min())
    with pytest.raises(datasets.DatasetError, match=f"ipc={smallest + 1} exceeds"):
        continual.run_continual(
            continual.ContinualConfig("digits", smallest + 1, 5, preset="default"),
            wd,
            dataset=digits_ds,
        )
    assert not os.path.exists(wd)  # refused before any work


def test_stage_dataset_holds_exactly_the_images_of_its_classes(digits_ds):
    classes = np.array([7, 3])
    sub, tr, te = continual.stage_dataset(digits_ds, classes)
    assert set(digits_ds.train_labels[tr].tolist()) == {3, 7}
    assert len(tr) == int(np.sum(np.isin(digits_ds.train_labels, classes)))  # all of them
    assert len(te) == int(np.sum(np.isin(digits_ds.test_labels, classes)))
    np.testing.assert_array_equal(sub.train_images, digits_ds.train_images[tr])
    # Labels remapped in the order's order: 7 -> 0, 3 -> 1, and back.
    np.testing.assert_array_equal(sub.train_labels, (digits_ds.train_labels[tr] == 3).astype(int))
    np.testing.assert_array_equal(
        continual.to_global(sub.test_labels, classes), digits_ds.test_labels[te]
    )
    assert sub.num_classes == 2 and sub.class_names == ("7", "3")
    with pytest.raises(ValueError, match="outside the stage's classes"):
        continual.remap_labels([7, 4], classes, 10)


def test_random_memory_draws_distinct_images_of_the_stage_classes_only(digits_ds):
    labels = digits_ds.train_labels
    idx = continual.random_indices(labels, [4, 9], 5, np.random.default_rng(0))
    assert len(set(idx.tolist())) == 10
    assert labels[idx].tolist() == [4] * 5 + [9] * 5
    again = continual.random_indices(labels, [4, 9], 5, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, again)
    with pytest.raises(datasets.DatasetError, match="fewer than ipc"):
        continual.random_indices(labels, [4], 10_000, np.random.default_rng(0))


def test_memory_union_concatenates_stage_memories_in_order():
    a = continual.StageMemory(np.zeros((2, 3, 3, 1), np.float32), np.array([5, 1], np.int32), None)
    b = continual.StageMemory(
        np.ones((4, 3, 3, 1), np.float32), np.array([0, 0, 2, 2], np.int32), None
    )
    x, y = continual.memory_union([a, b])
    assert x.shape == (6, 3, 3, 1) and y.tolist() == [5, 1, 0, 0, 2, 2] and y.dtype == np.int32
    np.testing.assert_array_equal(x[:2], a.images)
    with pytest.raises(ValueError):
        continual.memory_union([])


def test_eval_keys_depend_on_seed_order_and_stage_only():
    keys = [continual.eval_key(0, 1, k) for k in range(5)]
    assert len({tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}) == 5
    np.testing.assert_array_equal(
        jax.random.key_data(continual.eval_key(0, 1, 3)),
        jax.random.key_data(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 1), 3)),
    )


# --------------------------------------------------------------------------------------------
# The protocol with recorders in place of the expensive pieces
# --------------------------------------------------------------------------------------------


def _fake_acc(images, labels) -> float:
    """A deterministic 'accuracy' of a memory, so that reruns can be compared."""
    v = float(np.abs(np.asarray(images, np.float64)).mean()) + 0.01 * len(np.asarray(labels))
    return v % 1.0


class Recorder:
    """Replaces expert training, condensation and evaluation; records their inputs."""

    def __init__(self, mp, crash_at_eval=None):
        self.experts, self.distills, self.herding, self.evals = [], [], [], []
        self.crash_at_eval = crash_at_eval

        def ensure_experts(cfg, data_, workdir, *, progress=True, log=print):
            self.experts.append(
                dict(
                    x=np.asarray(data_.train_x),
                    y=np.asarray(data_.train_y),
                    classes=data_.dataset.class_names,
                    workdir=workdir,
                    num_classes=data_.num_classes,
                )
            )
            return "store"

        def distill_and_evaluate(cfg, data_, store, workdir, *, progress=True, log=print):
            assert store == "store"
            images, labels, _ = pipeline.initial_set(cfg, data_)  # real images of the stage
            rundir = os.path.join(workdir, "runs", cfg.name)
            os.makedirs(rundir, exist_ok=True)
            state = types.SimpleNamespace(labels=labels, syn_lr=0.01, iteration=0)
            outputs.export_distilled(
                os.path.join(rundir, "distilled.npz"), cfg, data_, state, images
            )
            self.distills.append(
                dict(
                    x=np.asarray(data_.train_x),
                    y=np.asarray(data_.train_y),
                    method=cfg.method,
                    images=np.asarray(images),
                    labels=np.asarray(labels),
                )
            )
            return []

        def train_feature_network(model, images, labels, cfg, *, key=None):
            self.herding.append(dict(x=np.asarray(images), y=np.asarray(labels)))
            x0 = jnp.zeros((1, *images.shape[1:]), jnp.float32)
            return dict(jax.jit(lambda k: model.init(k, x0, train=False))(key))  # untrained

        def evaluate_set(model, images, labels, lr, test_images, test_labels, cfg, **kw):
            if self.crash_at_eval is not None and len(self.evals) == self.crash_at_eval:
                raise KeyboardInterrupt("killed")
            self.evals.append(
                dict(
                    model=model,
                    x=np.asarray(images),
                    y=np.asarray(labels),
                    lr=float(lr),
                    test_x=np.asarray(test_images),
                    test_y=np.asarray(test_labels),
                    key=np.asarray(jax.random.key_data(kw["key"])),
                    desc=kw.get("desc"),
                )
            )
            return evaluate.EvalResult(np.full(cfg.num_models, _fake_acc(images, labels)))

        mp.setattr(pipeline, "ensure_experts", ensure_experts)
        mp.setattr(pipeline, "distill_and_evaluate", distill_and_evaluate)
        mp.setattr(herding, "train_feature_network", train_feature_network)
        mp.setattr(evaluate, "evaluate_set", evaluate_set)


def _ccfg(methods=continual.METHODS, orders=(0,), ipc=2, stages=5):
    return continual.ContinualConfig(
        dataset="digits",
        ipc=ipc,
        stages=stages,
        methods=tuple(methods),
        class_orders=tuple(orders),
        preset="default",
        overrides=dict(TINY),
        herding_epochs=1,
    )


@pytest.fixture(scope="module")
def recorded(digits_ds, tmp_path_factory):
    """One run of all four methods, 5 stages, class orders 0 and 1, with recorders."""
    wd = str(tmp_path_factory.mktemp("recorded"))
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        out = continual.run_continual(
            _ccfg(orders=(0, 1)), wd, dataset=digits_ds, progress=False, log=lambda m: None
        )
    return types.SimpleNamespace(rec=rec, out=out, wd=wd)


def _stage_rows(ds, classes):
    return np.flatnonzero(np.isin(ds.train_labels, classes))


def test_stage_experts_condensation_and_herding_see_only_their_stage(recorded, digits_ds):
    rec = recorded.rec
    train_x, _ = _prepared(digits_ds)
    stages = [continual.split_stages(o, 5) for o in _literal_orders(10, [0, 1])]
    expected = [s for order in stages for s in order]  # order 0's 5 stages, then order 1's
    # Per stage: the experts are ensured by mtt and by satm (the second call finds the store
    # the first one filled), one condensation per method, one herding feature network.
    assert len(rec.experts) == len(rec.distills) == 20 and len(rec.herding) == 10
    for j, classes in enumerate(expected):
        rows = _stage_rows(digits_ds, classes)
        local = continual.remap_labels(digits_ds.train_labels[rows], classes, 10)
        calls = [rec.herding[j], *rec.experts[2 * j : 2 * j + 2], *rec.distills[2 * j : 2 * j + 2]]
        for call in calls:
            # Exactly the stage's images (all of them, nothing else), labels remapped to 0..1.
            np.testing.assert_array_equal(call["x"], train_x[rows])
            np.testing.assert_array_equal(call["y"], local)
        assert [d["method"] for d in calls[3:]] == ["mtt", "satm"]
        for e in rec.experts[2 * j : 2 * j + 2]:
            assert e["num_classes"] == 2 and e["classes"] == tuple(str(c) for c in classes)
            # Each stage's experts live in the stage's own folder.
            assert e["workdir"] == rec.experts[2 * j]["workdir"]
            assert os.path.basename(e["workdir"]).startswith(f"stage_{j % 5}_")
    assert len({e["workdir"] for e in rec.experts}) == 10
    # The condensation's starting images are images of the stage's classes.
    for j, classes in enumerate(expected):
        rows = _stage_rows(digits_ds, classes)
        for d in rec.distills[2 * j : 2 * j + 2]:
            for img in d["images"]:
                assert np.any(np.all(train_x[rows] == img, axis=(1, 2, 3)))


def test_memory_grows_stage_by_stage_with_global_labels(recorded, digits_ds):
    train_x, _ = _prepared(digits_ds)
    order_stages = continual.split_stages(_literal_orders(10, [0])[0], 5)
    for m in continual.METHODS:
        evals = [e for e in recorded.rec.evals if e["desc"].startswith(f"eval {m} order0 ")]
        assert len(evals) == 5
        for k, e in enumerate(evals):
            seen = np.concatenate(order_stages[: k + 1])
            assert e["x"].shape == ((k + 1) * 2 * 2, 8, 8, 1)  # 2 classes x IPC 2 per stage
            assert e["y"].dtype == np.int32
            assert sorted(set(e["y"].tolist())) == sorted(seen.tolist())
            # The newest block holds the stage's classes, IPC images each ...
            block = e["y"][k * 4 :]
            assert sorted(block.tolist()) == sorted(np.repeat(order_stages[k], 2).tolist())
            # ... and everything before it is the previous memory, unchanged.
            if k:
                prev = evals[k - 1]
                np.testing.assert_array_equal(e["x"][: k * 4], prev["x"])
                np.testing.assert_array_equal(e["y"][: k * 4], prev["y"])
            if m in ("random", "herding"):
                for img, lab in zip(e["x"], e["y"]):  # real images of their labelled class
                    rows = np.flatnonzero(digits_ds.train_labels == lab)
                    assert np.any(np.all(train_x[rows] == img, axis=(1, 2, 3)))
    # The stage memories on disk hold the stage's images only, by index.
    for k, classes in enumerate(order_stages):
        sdir = continual.stage_dir(recorded.wd, "digits", 0, k, classes)
        for m in ("random", "herding"):
            with np.load(os.path.join(sdir, m, "memory.npz")) as z:
                assert set(digits_ds.train_labels[z["indices"]].tolist()) == set(classes.tolist())
                np.testing.assert_array_equal(z["images"], train_x[z["indices"]])


def test_every_stage_trains_a_fresh_network_on_all_classes_tested_on_the_seen_ones(
    recorded, digits_ds
):
    _, test_x = _prepared(digits_ds)
    order_stages = continual.split_stages(_literal_orders(10, [0])[0], 5)
    inits = []
    for m in continual.METHODS:
        evals = [e for e in recorded.rec.evals if e["desc"].startswith(f"eval {m} order0 ")]
        for k, e in enumerate(evals):
            # One output per class of the whole dataset, unmasked, at DM's learning rate.
            assert e["model"].num_classes == 10 and e["lr"] == pytest.approx(0.01)
            # The test set: every test image of the classes seen so far, nothing else.
            rows = np.flatnonzero(
                np.isin(digits_ds.test_labels, np.concatenate(order_stages[: k + 1]))
            )
            np.testing.assert_array_equal(e["test_y"], digits_ds.test_labels[rows])
            np.testing.assert_array_equal(e["test_x"], test_x[rows])
            # The initialisation key is a function of (evaluation seed, order, stage) only.
            np.testing.assert_array_equal(
                e["key"], jax.random.key_data(continual.eval_key(0, 0, k))
            )
        if m == "random":
            x0 = jnp.zeros((1, 8, 8, 1), jnp.float32)
            init = jax.jit(lambda key, e=evals[0]: e["model"].init(key, x0, train=False))
            for k in range(len(evals)):
                # evaluate_set initialises network i from fold_in(key, i) then fold_in(., 0).
                key = jax.random.fold_in(jax.random.fold_in(continual.eval_key(0, 0, k), 0), 0)
                inits.append(np.concatenate([np.ravel(p) for p in jax.tree.leaves(init(key))]))
    # Five stages, five different initialisations: nothing is carried from stage to stage.
    for a in range(5):
        for b in range(a + 1, 5):
            assert not np.allclose(inits[a], inits[b])
    # The same stage of another class order starts from other networks too.
    e1 = next(e for e in recorded.rec.evals if e["desc"] == "eval random order1 stage0")
    assert not np.array_equal(e1["key"], jax.random.key_data(continual.eval_key(0, 0, 0)))


def test_outputs_hold_one_row_per_method_and_stage(recorded):
    out = recorded.out
    saved = jsonio.read_json(os.path.join(recorded.wd, "continual.json"))
    assert set(saved) == {"stages", "ipc", "results", "paired", "config", "wall_s"}
    assert saved["stages"] == 5 and saved["ipc"] == 2 and saved["wall_s"] > 0
    assert saved["results"] == json.loads(json.dumps(out["results"]))
    rows = saved["results"]
    assert [(r["method"], r["stage"]) for r in rows] == [
        (m, k) for m in continual.METHODS for k in range(5)
    ]
    for r in rows:
        assert r["num_classes_seen"] == 2 * (r["stage"] + 1)
        assert r["n"] == 4  # 2 class orders x 2 evaluation networks
        # mean and std over orders x networks of what the evaluations returned
        evals = [
            e
            for e in recorded.rec.evals
            if e["desc"] in (f"eval {r['method']} order{o} stage{r['stage']}" for o in (0, 1))
        ]
        accs = [100 * _fake_acc(e["x"], e["y"]) for e in evals for _ in range(2)]
        assert r["acc_mean"] == pytest.approx(np.mean(accs), abs=1e-3)
        assert r["acc_std"] == pytest.approx(np.std(accs), abs=1e-3)
    assert saved["config"]["class_orders"] == [o.tolist() for o in _literal_orders(10, [0, 1])]
    with open(os.path.join(recorded.wd, "continual.md")) as f:
        md = f.read()
    assert "| herding |" in md and "10 classes" in md
    assert "| satm - mtt |" in md and "| herding - random |" in md
    assert {(p["a"], p["b"]) for p in saved["paired"]} == set(
        continual.paired_pairs(continual.METHODS)
    )
    assert os.path.getsize(os.path.join(recorded.wd, "continual.png")) > 0


def test_a_killed_run_resumes_stage_by_stage(digits_ds, tmp_path):
    methods = ("random", "herding", "mtt")
    clean = str(tmp_path / "clean")
    with pytest.MonkeyPatch.context() as mp:
        Recorder(mp)
        want = continual.run_continual(
            _ccfg(methods, stages=5), clean, dataset=digits_ds, progress=False, log=lambda m: None
        )
    wd = str(tmp_path / "wd")
    with pytest.MonkeyPatch.context() as mp:
        first = Recorder(mp, crash_at_eval=7)  # killed during stage 2's second evaluation
        with pytest.raises(KeyboardInterrupt):
            continual.run_continual(
                _ccfg(methods, stages=5), wd, dataset=digits_ds, progress=False, log=lambda m: None
            )
    # stages 0 and 1 done, stage 2's random memory evaluated, its herding memory stored
    assert len(first.evals) == 7 and len(first.experts) == 2 and len(first.herding) == 3
    partial = jsonio.read_json(os.path.join(wd, "continual.json"))
    assert {r["stage"] for r in partial["results"]} == {0, 1}  # written stage by stage
    order = continual.split_stages(_literal_orders(10, [0])[0], 5)
    done = os.path.join(continual.stage_dir(wd, "digits", 0, 0, order[0]), "mtt", "memory.npz")
    stamp = os.stat(done).st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        second = Recorder(mp)
        got = continual.run_continual(
            _ccfg(methods, stages=5), wd, dataset=digits_ds, progress=False, log=lambda m: None
        )
    # Stages 0 and 1 are read back; stage 2 redoes only what had not finished.
    assert [e["desc"] for e in second.evals][0] == "eval herding order0 stage2"
    assert len(second.evals) == 15 - 7
    # stage 2's random and herding memories were stored before the kill; mtt's was not
    assert len(second.herding) == 2 and len(second.experts) == len(second.distills) == 3
    assert os.stat(done).st_mtime_ns == stamp
    for a, b in zip(got["results"], want["results"]):
        assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}
    # A changed setting is not mistaken for a finished stage: another selection seed redoes
    # the random memories (and their evaluations), not mtt's, which it does not concern.
    with pytest.MonkeyPatch.context() as mp:
        third = Recorder(mp)
        cfg = dataclasses.replace(_ccfg(("random", "mtt"), stages=5), seed=1)
        continual.run_continual(cfg, wd, dataset=digits_ds, progress=False, log=lambda m: None)
    assert [e["desc"] for e in third.evals] == [f"eval random order0 stage{k}" for k in range(5)]
    assert not third.distills and not third.experts


@pytest.mark.slow
def test_cli_refuses_bad_input_with_a_clear_message(tmp_path):
    for args, message in (
        (["--stages=3"], "do not divide 10 classes"),
        (["--method=random,gdumb"], "unknown continual method 'gdumb'"),
        (["--ipc=1,10"], "one --ipc"),
    ):
        r = run_module("continual", f"--workdir={tmp_path}", *args, timeout=300)
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_budget_overrides_layer_under_explicit_flags_and_start_from_herding():
    o, herding_epochs = continual.budget_overrides("continual", {"iterations": 7})
    assert o["iterations"] == 7 and o["num_experts"] == continual.CONTINUAL_BUDGET["num_experts"]
    assert herding_epochs == 2
    with pytest.raises(configs.ConfigError, match="unknown budget"):
        continual.budget_overrides("huge")
    cfg = continual.method_config(
        continual.ContinualConfig("fashion_mnist", 10, 5, preset="cpu", overrides=o), "satm"
    )
    assert cfg.distill.iterations == 7 and cfg.experts.num_experts == 2
    # Both budgets start every stage's condensation from herding's picks (our choice); an
    # explicit --syn_init wins.
    assert cfg.distill.init == "herding"
    o_smoke, _ = continual.budget_overrides("smoke")
    smoke = continual.method_config(
        continual.ContinualConfig("digits", 1, 5, preset="default", overrides=o_smoke), "mtt"
    )
    assert smoke.distill.init == "herding"
    o_real, _ = continual.budget_overrides("continual", {"syn_init": "real"})
    real = continual.method_config(
        continual.ContinualConfig("fashion_mnist", 10, 5, preset="cpu", overrides=o_real), "mtt"
    )
    assert real.distill.init == "real"
    assert cfg.eval.width == 32 and cfg.eval.num_models == 2 and cfg.distill.syn_steps == 10
    # mtt/satm stage runs keep their own evaluation at a token size; the protocol's is the preset's.
    assert continual.stage_run_config(cfg).eval.epochs == 1 and cfg.eval.epochs == 250
    assert cfg.eval.momentum == 0.9 and cfg.eval.weight_decay == 5e-4


# --------------------------------------------------------------------------------------------
# Everything for real, tiny
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_end_to_end_run_for_real(digits_ds, tmp_path, monkeypatch):
    seen_by_experts, initial = [], []
    real_train, real_initial, real_eval = (
        experts.train_experts,
        pipeline.initial_set,
        evaluate.evaluate_set,
    )
    evals = []

    def train_experts(model, cfg, train_images, train_labels, indices, **kw):
        seen_by_experts.append((np.asarray(train_images), np.asarray(train_labels)))
        return real_train(model, cfg, train_images, train_labels, indices, **kw)

    def initial_set(cfg, data_, *a, **kw):
        out = real_initial(cfg, data_, *a, **kw)
        initial.append(np.asarray(out[0]))
        return out

    def evaluate_set(*a, **kw):
        res = real_eval(*a, **kw)
        evals.append((a, kw, res))
        return res

    monkeypatch.setattr(experts, "train_experts", train_experts)
    monkeypatch.setattr(pipeline, "initial_set", initial_set)
    monkeypatch.setattr(evaluate, "evaluate_set", evaluate_set)
    wd = str(tmp_path / "wd")
    ccfg = _ccfg(ipc=1, stages=2)
    out = continual.run_continual(ccfg, wd, dataset=digits_ds, progress=False, log=lambda m: None)
    rows = out["results"]
    assert [(r["method"], r["num_classes_seen"]) for r in rows] == [
        (m, s) for m in continual.METHODS for s in (5, 10)
    ]
    assert all(0.0 <= r["acc_mean"] <= 100.0 and r["n"] == 2 for r in rows)
    train_x, _ = _prepared(digits_ds)
    stages = continual.split_stages(_literal_orders(10, [0])[0], 2)
    assert len(seen_by_experts) == 2 and len(initial) == 4
    for k, classes in enumerate(stages):
        rows_k = _stage_rows(digits_ds, classes)
        np.testing.assert_array_equal(seen_by_experts[k][0], train_x[rows_k])
        assert set(np.asarray(seen_by_experts[k][1]).tolist()) == {0, 1, 2, 3, 4}
        for img in np.concatenate(initial[2 * k : 2 * k + 2]):
            assert np.any(np.all(train_x[rows_k] == img, axis=(1, 2, 3)))
    # Stage 1's number is that of fresh networks trained from scratch on stage 1's memory
    # alone: rebuilt here from the stored stage memories, the seen classes' test images and
    # the stage's key, nothing else.
    _, test_x = _prepared(digits_ds)
    mems = []
    for k, classes in enumerate(stages):
        with np.load(
            os.path.join(continual.stage_dir(wd, "digits", 0, k, classes), "satm", "memory.npz")
        ) as z:
            mems.append(continual.StageMemory(z["images"], z["labels"], None))
    x, y = continual.memory_union(mems)
    assert x.shape[0] == 10 and sorted(y.tolist()) == list(range(10))
    cfg = continual.method_config(ccfg, "satm")
    again = real_eval(
        pipeline.eval_model(cfg, "convnet", 10),
        jnp.asarray(x),
        jnp.asarray(y),
        0.01,
        jnp.asarray(test_x),
        jnp.asarray(digits_ds.test_labels, jnp.int32),
        cfg.eval,
        key=continual.eval_key(cfg.eval.seed, 0, 1),
        progress=False,
    )
    satm_1 = next(r for r in rows if r["method"] == "satm" and r["stage"] == 1)
    np.testing.assert_allclose(100 * again.accs, satm_1["accs"], atol=1e-3)
    assert os.path.getsize(os.path.join(wd, "continual.png")) > 0
    # A rerun reads every stage back.
    seen_by_experts.clear(), initial.clear(), evals.clear()
    out2 = continual.run_continual(ccfg, wd, dataset=digits_ds, progress=False, log=lambda m: None)
    assert not seen_by_experts and not initial and not evals
    assert out2["results"] == rows


def test_the_tables_and_plot_title_count_only_the_class_orders_with_results(recorded, tmp_path):
    out = recorded.out
    assert continual.orders_done(out) == [0, 1]
    # A run stopped after its first order: its rows hold order 0 only.
    partial = dict(out, results=[dict(r, orders=[0]) for r in out["results"]])
    assert continual.orders_done(partial) == [0]
    assert "class orders (seeds) [0] of the requested [0, 1]" in continual.markdown_table(partial)


def test_paired_differences_subtract_each_orders_network_mean_by_hand():
    # Two methods, stage 0, three class orders with 2 networks each (order-major accs).
    results = [
        {"method": "random", "stage": 0, "num_classes_seen": 2, "orders": [0, 1, 2],
         "accs": [90.0, 92.0, 80.0, 80.0, 70.0, 74.0]},
        {"method": "mtt", "stage": 0, "num_classes_seen": 2, "orders": [0, 1, 2],
         "accs": [93.0, 93.0, 79.0, 79.0, 75.0, 75.0]},
        # A method with one order only (a run stopped early) pairs on that order alone.
        {"method": "satm", "stage": 0, "num_classes_seen": 2, "orders": [1],
         "accs": [82.0, 84.0]},
    ]  # fmt: skip
    (d,) = continual.paired_differences(results, "mtt", "random")
    # per order: 93 - 91 = 2, 79 - 80 = -1, 75 - 72 = 3
    assert d["diff_mean"] == pytest.approx(4 / 3, abs=1e-4)
    assert d["diff_std"] == pytest.approx(np.std([2.0, -1.0, 3.0], ddof=1), abs=1e-4)
    assert d["positive"] == 2 and d["orders"] == [0, 1, 2]
    (e,) = continual.paired_differences(results, "satm", "mtt")
    assert (e["diff_mean"], e["diff_std"], e["orders"]) == (4.0, 0.0, [1])
    assert continual.paired_differences(results, "herding", "random") == []
    assert continual.paired_pairs(continual.METHODS) == [
        ("herding", "random"), ("mtt", "random"), ("satm", "random"), ("satm", "mtt")
    ]  # fmt: skip
    assert continual.paired_pairs(("mtt", "satm")) == [("satm", "mtt")]
    out = {"stages": 5, "ipc": 1, "results": results, "wall_s": 1.0,
           "paired": [d, e],
           "config": {"dataset": "digits", "preset": "default", "classes_per_stage": 2,
                      "class_order_seeds": [0, 1, 2], "lr": 0.01, "methods": ["random", "mtt"],
                      "eval": {"epochs": 1, "num_models": 2}}}  # fmt: skip
    for r in results:
        r.update(acc_mean=float(np.mean(r["accs"])), acc_std=0.0, n=len(r["accs"]))
    md = continual.markdown_table(out)
    assert "| mtt - random | +1.33 +- 2.08 (2/3) |" in md
    assert "| satm - mtt | +4.00 +- 0.00 (1/1) |" in md


def test_summary_rows_count_the_networks_that_diverged_or_collapsed():
    records = [
        {"method": "mtt", "order": 0, "stage": 0, "accs": np.array([0.9, 0.5]), "diverged": 1},
        {"method": "mtt", "order": 1, "stage": 0, "accs": np.array([0.8, 0.7]), "collapsed": 2},
        {"method": "mtt", "order": 0, "stage": 1, "accs": np.array([0.6, 0.6])},
    ]
    rows = continual.summarize(records, ["mtt"], classes_per_stage=2)
    flags = [(r["stage"], r.get("diverged"), r.get("collapsed")) for r in rows]
    assert flags == [(0, 1, 2), (1, None, None)]
