"""Runs that survive: kill and resume, corrupt checkpoints, outputs after a restart."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import satm_jax
from satm_jax import checkpoint, distill, outputs
from satm_jax.experiment import configs
from tests.helpers import read_text, run_module, tiny_overrides, tree_allclose

ARGS = [
    "--ipc=1",
    "--method=satm",
    "--baselines=false",
    "--iterations=60",
    "--checkpoint_every=5",
    "--steps_per_call=5",
    "--syn_steps=3",
    "--num_experts=2",
    "--expert_train_epochs=3",
    "--max_start_epoch=2",
    "--expert_epochs=1",
    "--eval_epochs=2",
    "--num_eval=2",
    "--width=8",
    "--depth=1",
    "--progress=false",
]


def _run(wd, **kw):
    return run_module("run", f"--workdir={wd}", *ARGS, **kw)


def _steps(wd):
    d = os.path.join(wd, "runs", "digits_ipc1_satm", "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_gives_the_same_set_bit_for_bit(tmp_path):
    wd_a, wd_b = str(tmp_path / "a"), str(tmp_path / "b")
    r = _run(wd_a)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(os.path.join(wd_a, "experts"), os.path.join(wd_b, "experts"))

    p = _run(wd_b, background=True)
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in _steps(wd_b) if s >= 15]:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = max(_steps(wd_b))
    assert 15 <= killed_at < 60, f"the run was not interrupted mid-way ({killed_at})"
    assert not os.path.exists(os.path.join(wd_b, "runs", "digits_ipc1_satm", "distilled.npz"))
    # Mark the first session's time: its kept metrics lines say 100 s per iteration.
    mpath = os.path.join(wd_b, "runs", "digits_ipc1_satm", "metrics.jsonl")
    marked = []
    for line in read_text(mpath).splitlines():
        rec = json.loads(line)
        if "wall_s" in rec and rec["iteration"] <= killed_at:
            rec["wall_s"] = 100.0
        marked.append(json.dumps(rec) + "\n")
    Path(mpath).write_text("".join(marked))

    r = _run(wd_b)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from iteration" in r.stdout
    a = satm_jax.load_distilled(os.path.join(wd_a, "runs", "digits_ipc1_satm", "distilled.npz"))
    b = satm_jax.load_distilled(os.path.join(wd_b, "runs", "digits_ipc1_satm", "distilled.npz"))
    assert np.array_equal(a["images"], b["images"])  # bit for bit
    assert a["syn_lr"] == b["syn_lr"] and int(b["iteration"]) == 60
    recs = [
        json.loads(x)
        for x in read_text(
            os.path.join(wd_b, "runs", "digits_ipc1_satm", "metrics.jsonl")
        ).splitlines()
    ]
    its = [x["iteration"] for x in recs if "loss" in x]
    assert its == list(range(1, 61))  # no gaps or duplicates across the restart
    # The reported distillation time covers both sessions: the sum of the kept lines' wall_s.
    walls = [x["wall_s"] for x in recs if "loss" in x]
    assert all(w > 0 for w in walls)
    (row,) = json.loads(read_text(os.path.join(wd_b, "results.json")))["results"]
    assert row["distill_s"] == pytest.approx(sum(walls), abs=0.1)
    assert row["distill_s"] > 100.0 * killed_at  # the first session's (marked) lines count


def _state(seed=0):
    cfg = distill.DistillConfig(
        ipc=1, max_start_epoch=2, sharpness="smooth_sam", soft_labels=True, ema_decay=0.5
    )
    x = jax.random.normal(jax.random.PRNGKey(seed), (3, 4, 4, 1))
    return distill.init_state(cfg, x, jnp.arange(3, dtype=jnp.int32), label_logits=jnp.eye(3))


def test_checkpoint_round_trip_and_keeps_the_last_two(tmp_path):
    ck = checkpoint.DistillCheckpointer(str(tmp_path), {"a": 1})
    s = _state()
    for it in (5, 10, 15):
        ck.save(s._replace(iteration=jnp.asarray(it, jnp.int32), images=s.images + it))
    assert ck.steps() == [10, 15]
    restored = ck.restore_latest(_state(seed=1), log=lambda m: None)
    assert int(restored.iteration) == 15
    tree_allclose(
        restored,
        s._replace(iteration=jnp.asarray(15, jnp.int32), images=s.images + 15),
        rtol=0,
        atol=0,
    )


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    ck = checkpoint.DistillCheckpointer(str(tmp_path), {"a": 1})
    s = _state()
    ck.save(s._replace(iteration=jnp.asarray(5, jnp.int32)))
    ck.save(s._replace(iteration=jnp.asarray(10, jnp.int32)))
    for root, _, files in os.walk(tmp_path / "10"):
        for f in files:
            Path(root, f).write_bytes(b"\x00garbage")
    msgs = []
    restored = checkpoint.DistillCheckpointer(str(tmp_path), {"a": 1}).restore_latest(
        _state(), log=msgs.append
    )
    assert int(restored.iteration) == 5
    assert any("unreadable" in m and "falling back" in m for m in msgs)
    assert any("resuming from iteration 5" in m for m in msgs)
    for root, _, files in os.walk(tmp_path / "5"):
        for f in files:
            Path(root, f).write_bytes(b"\x00garbage")
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        checkpoint.DistillCheckpointer(str(tmp_path), {"a": 1}).restore_latest(
            _state(), log=lambda m: None
        )


def test_resuming_under_another_configuration_is_refused(tmp_path):
    cfg = {"distill": {"lr_img": 100.0, "iterations": 10}, "ipc": 1}
    keep = configs.RESUMABLE_CHANGES
    ck = checkpoint.DistillCheckpointer(str(tmp_path), cfg, resumable=keep)
    ck.save(_state()._replace(iteration=jnp.asarray(5, jnp.int32)))
    # More iterations is a continuation, not a conflict.
    checkpoint.DistillCheckpointer(
        str(tmp_path), {"distill": {"lr_img": 100.0, "iterations": 50}, "ipc": 1}, resumable=keep
    )
    # So is the same run under an ablation's label.
    checkpoint.DistillCheckpointer(
        str(tmp_path),
        {"distill": {"lr_img": 100.0, "iterations": 10}, "ipc": 1, "variant": "mtt"},
        resumable=keep,
    )
    with pytest.raises(
        checkpoint.ConfigMismatchError, match="distill.lr_img: checkpoint 100.0, now 10.0"
    ):
        checkpoint.DistillCheckpointer(
            str(tmp_path), {"distill": {"lr_img": 10.0, "iterations": 10}, "ipc": 1}, resumable=keep
        )
    # the storage layer itself knows no field names: without ``resumable`` nothing may change
    with pytest.raises(checkpoint.ConfigMismatchError, match="iterations"):
        checkpoint.DistillCheckpointer(
            str(tmp_path), {"distill": {"lr_img": 100.0, "iterations": 50}, "ipc": 1}
        )


def test_metrics_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    w = outputs.MetricsWriter(str(tmp_path), tensorboard=False)
    for i in range(1, 8):
        w.iteration(i, {"loss": float(i)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 8, "lo')  # a line cut by a kill
    w = outputs.MetricsWriter(str(tmp_path), start_iteration=5, tensorboard=False)
    w.close()
    its = [r["iteration"] for r in outputs.read_metrics(str(tmp_path))]
    assert its == [1, 2, 3, 4, 5]


def test_load_distilled_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        satm_jax.load_distilled(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a satm-jax distilled-set export"):
        satm_jax.load_distilled(str(tmp_path / "other.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable"):
        satm_jax.load_distilled(str(tmp_path / "junk.npz"))


@pytest.mark.slow
def test_a_checkpoint_past_the_requested_iterations_is_refused_not_reported(tmp_path, digits):
    import dataclasses

    from satm_jax.experiment import pipeline

    tiny = tiny_overrides(iterations=4, syn_steps=2, num_experts=1, eval_epochs=1)
    cfg = configs.make_run_config("digits", 1, "mtt", overrides={**tiny, "checkpoint_every": 2})
    quiet = dict(dataset=digits, baselines=False, progress=False, log=lambda m: None)
    pipeline.train_and_evaluate([cfg], str(tmp_path), **quiet)
    fewer = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, iterations=2))
    with pytest.raises(configs.ConfigError, match="already at iteration 4, past the 2"):
        pipeline.train_and_evaluate([fewer], str(tmp_path), **quiet)
