"""Out-of-domain evaluation: the request, the corrupted sets, the summary and the pipeline."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import corruptions, evaluate, models, ood
from satm_jax.experiment import configs, pipeline
from tests.helpers import TINY, read_text, run_module

OVERRIDES = {
    "iterations": 2,
    "syn_steps": 2,
    "num_experts": 1,
    "expert_train_epochs": 2,
    "max_start_epoch": 1,
    "expert_epochs": 1,
    "eval_epochs": 2,
    "num_eval": 2,
    "width": 4,
    "depth": 1,
    "full_epochs": 1,
    "steps_per_call": 1,
}


def _mnist_c(root, names, n=12, seed=0):
    rng = np.random.default_rng(seed)
    files = {}
    for name in names:
        os.makedirs(root / "mnist_c" / name)
        x = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.int64)
        np.save(root / "mnist_c" / name / "test_images.npy", x)
        np.save(root / "mnist_c" / name / "test_labels.npy", y)
        files[name] = (x, y)
    return files


def test_parse_all_names_and_unknown_names():
    cfg = ood.parse_eval_ood("all", dataset="fashion_mnist")
    assert cfg.source == "synthetic" and cfg.corruptions == tuple(sorted(corruptions.CORRUPTIONS))
    assert cfg.severities == (1, 2, 3, 4, 5) and cfg.samples == ood.DEFAULT_SAMPLES
    cfg = ood.parse_eval_ood("fog, rotate,fog", dataset="digits", samples=7)
    assert cfg.corruptions == ("fog", "rotate") and cfg.samples == 7
    assert ood.parse_eval_ood(None, dataset="digits") is None
    assert ood.parse_eval_ood("", dataset="digits") is None
    with pytest.raises(ood.OodError, match="unknown corruption.*'snoww'.*gaussian_noise"):
        ood.parse_eval_ood("fog,snoww", dataset="digits")
    with pytest.raises(ood.OodError, match="unknown OOD source"):
        ood.parse_eval_ood("all", dataset="digits", source="web")
    with pytest.raises(ood.OodError, match="no official corrupted benchmark"):
        ood.parse_eval_ood("all", dataset="digits", source="official")
    with pytest.raises(ood.OodError, match=">= 0"):
        ood.parse_eval_ood("all", dataset="digits", samples=-1)


def test_official_source_is_found_under_data_dir_or_refused(tmp_path):
    with pytest.raises(corruptions.CorruptionDataError, match="missing folder.*mnist_c"):
        ood.parse_eval_ood("all", dataset="mnist", data_dir=str(tmp_path), source="official")
    # auto without the folder: synthetic
    assert ood.parse_eval_ood("fog", dataset="mnist", data_dir=str(tmp_path)).source == "synthetic"
    _mnist_c(tmp_path, ["zigzag", "fog"])
    cfg = ood.parse_eval_ood("all", dataset="mnist", data_dir=str(tmp_path))
    assert cfg.source == "official" and cfg.corruptions == ("fog", "zigzag")
    assert cfg.severities == (1,) and cfg.root == str(tmp_path / "mnist_c")
    with pytest.raises(ood.OodError, match="unknown corruption.*'rotate'.*fog, zigzag"):
        ood.parse_eval_ood("rotate", dataset="mnist", data_dir=str(tmp_path))


def test_official_mnist_c_sets_are_read_back_exactly(tmp_path):
    files = _mnist_c(tmp_path, ["fog", "zigzag"], n=12)
    cfg = ood.parse_eval_ood("all", dataset="mnist", data_dir=str(tmp_path), samples=5, seed=3)
    test_images = np.zeros((3, 28, 28, 1), np.uint8)
    sets = ood.corrupted_test_sets(cfg, test_images, np.zeros(3, np.int64), "mnist")
    idx = ood.subset_indices(12, 5, 3)
    assert sorted(sets) == [("fog", 1), ("zigzag", 1)]
    for name, (x, y) in files.items():
        got_x, got_y = sets[(name, 1)]
        assert got_x.dtype == np.uint8
        np.testing.assert_array_equal(got_x, x[idx])
        np.testing.assert_array_equal(got_y, y[idx])


def test_official_cifar_c_severity_blocks_are_read_back_exactly(tmp_path):
    root = tmp_path / "CIFAR-10-C"
    os.makedirs(root)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)  # 5 severities x 4 images
    y = np.tile(np.arange(4), 5).astype(np.int64)
    np.save(root / "fog.npy", x)
    np.save(root / "labels.npy", y)
    cfg = ood.parse_eval_ood("all", dataset="cifar10", data_dir=str(tmp_path), samples=0)
    assert cfg.corruptions == ("fog",) and cfg.severities == (1, 2, 3, 4, 5)
    sets = ood.corrupted_test_sets(cfg, np.zeros((4, 32, 32, 3), np.uint8), y[:4], "cifar10")
    for s in range(1, 6):
        np.testing.assert_array_equal(sets[("fog", s)][0], x[(s - 1) * 4 : s * 4])
        np.testing.assert_array_equal(sets[("fog", s)][1], np.arange(4))
    with pytest.raises(corruptions.CorruptionDataError, match="images of shape"):
        ood.corrupted_test_sets(cfg, np.zeros((4, 28, 28, 1), np.uint8), y[:4], "cifar10")


def test_synthetic_sets_use_one_fixed_subset_and_are_deterministic(digits):
    cfg = ood.parse_eval_ood("gaussian_noise,rotate", dataset="digits", samples=40, seed=1)
    sets = ood.corrupted_test_sets(cfg, digits.test_images, digits.test_labels, "digits")
    again = ood.corrupted_test_sets(cfg, digits.test_images, digits.test_labels, "digits")
    idx = ood.subset_indices(len(digits.test_labels), 40, 1)
    assert len(np.unique(idx)) == 40 and np.all(np.diff(idx) > 0)
    assert sorted(sets) == sorted((c, s) for c in cfg.corruptions for s in range(1, 6))
    clean = digits.test_images[idx]
    for k, (x, y) in sets.items():
        assert x.dtype == np.uint8 and x.shape == clean.shape
        np.testing.assert_array_equal(y, digits.test_labels[idx])
        np.testing.assert_array_equal(x, again[k][0])
    # stronger severity moves the images further from the clean ones
    for c in cfg.corruptions:
        change = [np.abs(sets[(c, s)][0].astype(int) - clean).mean() for s in range(1, 6)]
        assert all(a < b for a, b in zip(change, change[1:])), (c, change)
    assert ood.subset_indices(10, 0, 0).tolist() == list(range(10))
    assert ood.subset_indices(10, 50, 0).tolist() == list(range(10))


def test_summary_by_hand():
    cfg = ood.OodConfig(corruptions=("a", "b"), severities=(1, 2), samples=9)
    accs = {
        ("a", 1): np.array([0.9, 0.7]),  # 80
        ("a", 2): np.array([0.6, 0.6]),  # 60
        ("b", 1): np.array([0.5, 0.5]),  # 50
        ("b", 2): np.array([0.2, 0.4]),  # 30
    }
    s = ood.summarise(accs, cfg)
    assert s["acc"] == {"a": {"1": 80.0, "2": 60.0}, "b": {"1": 50.0, "2": 30.0}}
    assert s["std"]["a"]["1"] == pytest.approx(10.0) and s["std"]["b"]["2"] == pytest.approx(10.0)
    assert s["corruption_acc"] == {"a": 70.0, "b": 40.0}
    assert s["mean_corruption_acc"] == 55.0
    # network 0: (90 + 60 + 50 + 20) / 4 = 55; network 1: (70 + 60 + 50 + 40) / 4 = 55
    assert s["mean_corruption_acc_std"] == pytest.approx(0.0)
    apart = {("a", 1): [0.8, 0.4], ("a", 2): [0.6, 0.2], ("b", 1): [0.5, 0.5], ("b", 2): [0.5, 0.5]}
    s2 = ood.summarise({k: np.array(v) for k, v in apart.items()}, cfg)
    # network means 60 and 40: std 10 (over networks), not the mean of the cells' stds (10, 10, 0, 0)
    assert s2["mean_corruption_acc"] == pytest.approx(50.0)
    assert s2["mean_corruption_acc_std"] == pytest.approx(10.0)
    assert s["worst"] == {"corruption": "b", "acc": 40.0}
    assert s["samples"] == 9 and s["severities"] == [1, 2]
    back = ood.accs_from_json(json.loads(json.dumps(ood.accs_to_json(accs))))
    assert sorted(back) == sorted(accs)
    for k in accs:
        np.testing.assert_allclose(back[k], accs[k])
    row = {"method": "mtt", "ipc": 1, "acc_mean": 90.0, "acc_std": 1.0, "ood": s}
    table = ood.format_markdown([row, {"method": "random", "ipc": 1}])
    assert "| mtt ipc1 | 90.00 +- 1.00 | 55.00 +- 0.00 | b 40.00 | 70.00 | 40.00 |" in table
    assert "random" not in table.splitlines()[2:3]


def test_extra_test_sets_are_scored_by_the_same_trained_networks():
    net = models.ConvNet(num_classes=2, width=4, depth=1)
    k = jax.random.PRNGKey(0)
    x = jax.random.normal(k, (6, 8, 8, 1))
    y = jnp.array([0, 0, 0, 1, 1, 1])
    tx = jax.random.normal(jax.random.fold_in(k, 1), (9, 8, 8, 1))
    ty = jnp.array([0, 1, 0, 1, 0, 1, 1, 0, 1])
    cfg = evaluate.EvalConfig(epochs=3, num_models=3, dsa_strategy="none")
    key = jax.random.PRNGKey(5)
    with_extra = evaluate.evaluate_set(
        net, x, y, 0.1, x, y, cfg, key=key, progress=False, extra_tests={"t": (tx, ty)}
    )
    direct = evaluate.evaluate_set(net, x, y, 0.1, tx, ty, cfg, key=key, progress=False)
    plain = evaluate.evaluate_set(net, x, y, 0.1, x, y, cfg, key=key, progress=False)
    np.testing.assert_array_equal(with_extra.extra["t"], direct.accs)
    np.testing.assert_array_equal(with_extra.accs, plain.accs)  # the clean result is unchanged
    assert dict(plain.extra) == {}


@pytest.mark.slow
def test_pipeline_adds_ood_to_every_row_and_leaves_clean_accuracy_alone(tmp_path, digits):
    cfgs = [configs.make_run_config("digits", 1, "mtt", overrides=OVERRIDES)]
    request = ood.parse_eval_ood("brightness,rotate", dataset="digits", samples=30)
    quiet = dict(progress=False, log=lambda m: None)
    wd = str(tmp_path / "wd")
    plain = pipeline.train_and_evaluate(cfgs, wd, dataset=digits, **quiet)
    assert all("ood" not in r for r in plain["results"])
    # The finished run is evaluated again (not distilled again) when OOD is asked; the
    # baselines are recomputed; the clean accuracies stay those of the run without OOD.
    out = pipeline.train_and_evaluate(cfgs, wd, dataset=digits, ood=request, **quiet)
    assert [r["method"] for r in out["results"]] == ["random", "mtt", "full"]
    assert [r["accs"] for r in out["results"]] == [r["accs"] for r in plain["results"]]
    for r in out["results"]:
        o = r["ood"]
        assert set(o["acc"]) == {"brightness", "rotate"} and o["samples"] == 30
        assert all(0.0 <= a <= 100.0 for v in o["acc"].values() for a in v.values())
    assert out["config"]["ood"] == request.identity()
    assert os.path.getsize(os.path.join(wd, "results_ood.png")) > 0
    md = read_text(os.path.join(wd, "results_ood.md"))
    assert "mtt ipc1" in md and "random ipc1" in md and "full" in md
    # Rerun: the finished run and the baselines are reused with their OOD results.
    logs = []
    again = pipeline.train_and_evaluate(
        cfgs, wd, dataset=digits, ood=request, progress=False, log=logs.append
    )
    assert [r["ood"] for r in again["results"]] == [r["ood"] for r in out["results"]]
    assert any("finished earlier" in m for m in logs)
    # A saved set evaluated again with the same request gives the run's OOD results.
    mtt = next(r for r in out["results"] if r["method"] == "mtt")
    rows = pipeline.evaluate_distilled(
        os.path.join(wd, "runs", "digits_ipc1_mtt", "distilled.npz"),
        eval_ood="brightness,rotate",
        ood_samples=30,
        **quiet,
    )
    assert rows[0]["accs"] == mtt["accs"] and rows[0]["ood"] == mtt["ood"]


def test_bad_ood_request_stops_the_command_before_any_work(tmp_path):
    wd = tmp_path / "wd"
    r = run_module("run", f"--workdir={wd}", "--eval_ood=fog,snoww", *TINY)
    assert r.returncode == 2
    assert "unknown corruption(s) ['snoww']" in r.stderr and "zigzag" in r.stderr
    assert not (wd / "experts").exists()
