"""The measurement entry points (bench, flops, precision_check, ablate) at tiny sizes, and
the GPU scripts that call them."""

import json
import os
import re
import statistics
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, TINY, read_json, read_text, run, run_module


def _module(name, *args, timeout=600, check=True):
    return run_module(name, *args, timeout=timeout, check=check)


@pytest.mark.slow
def test_side_by_side_times_each_convolution_and_second_order_in_the_same_rounds(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/sh\necho 'mtt steps=2 median_iter=500.0ms'\n")
    fake.chmod(0o755)
    (tmp_path / "torch_mtt.py").write_text("")
    r = _module(
        "side_by_side",
        f"--mtt_dir={tmp_path}",
        f"--torch_python={fake}",
        "--ncls=2",
        "--res=8",
        "--depth=1",
        "--steps=2",
        "--iters=1",
        "--rounds=1",
        "--dsa=off",
        "--conv_impl=patches,winograd",
        "--second_order=reverse,forward",
    )
    recs = _json_lines(r.stdout)
    rows = [x for x in recs if "summary" not in x]
    sums = [x["summary"] for x in recs if "summary" in x]
    settings = [(c, o) for c in ("patches", "winograd") for o in ("reverse", "forward")]
    assert [(x["conv_impl"], x["second_order"]) for x in rows] == settings
    assert all(x["mtt_ms"] == 500.0 and x["jax_ms"] > 0 for x in rows)
    assert sorted((s["conv_impl"], s["second_order"]) for s in sums) == sorted(settings)
    bad = _module("side_by_side", f"--mtt_dir={tmp_path}", "--conv_impl=cudnn", check=False)
    assert bad.returncode != 0 and "--conv_impl" in bad.stderr
    bad = _module("side_by_side", f"--mtt_dir={tmp_path}", "--second_order=up", check=False)
    assert bad.returncode != 0 and "--second_order" in bad.stderr


def _json_lines(text):
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


SMALL = ["--num_classes=2", "--ipc=2", "--res=8", "--channels=1", "--width=8", "--depth=1"]


@pytest.mark.slow
def test_bench_prints_one_record_per_mode():
    r = _module(
        "bench",
        *SMALL,
        "--syn_steps=3",
        "--mode=exact,truncated,satm,eval,expert",
        "--iters=2",
        "--eval_epochs=2",
        "--num_eval=1",
        "--expert_images=8",
        "--num_experts=2",
        "--profile",
    )
    recs = _json_lines(r.stdout)
    assert [x["mode"] for x in recs] == ["exact", "truncated", "satm", "eval", "expert"]
    assert recs[4]["expert_images"] == 8 and recs[4]["num_experts"] == 2
    for x in recs:
        assert x["ms_per_iter"] > 0 and x["peak_mem_gib"] > 0
        assert x["backend"] == "cpu" and x["shape"]["num_classes"] == 2
        assert x["conv_impl"] == "winograd"  # what --conv_impl=auto means on the CPU
        assert x["second_order"] == "forward"  # what --second_order=auto means on the CPU
    for x in recs[:3]:  # --profile: XLA's operations, by kind, with positive times
        assert x["op_ms"] and all(v >= 0 for v in x["op_ms"].values())
        assert not any(k.startswith(("Thunk", "$")) for k in x["op_ms"])


def test_op_profile_sums_operation_kinds_per_call_without_runtime_events():
    from experiments import op_profile

    events = [
        {"ph": "X", "name": "ynn_fusion.87", "dur": 3000.0},
        {"ph": "X", "name": "ynn_fusion.113", "dur": 1000.0},
        {"ph": "X", "name": "copy_bitcast_fusion.1.2", "dur": 2000.0},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000.0},
        {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 9000.0},
        {"ph": "i", "name": "dot.1", "dur": 5.0},  # not a complete event
    ]
    assert op_profile.breakdown(events, calls=2) == {"ynn_fusion": 2.0, "copy_bitcast_fusion": 1.0}
    assert list(op_profile.breakdown(events, calls=1)) == ["ynn_fusion", "copy_bitcast_fusion"]


@pytest.mark.slow
def test_flops_counts_are_positive_and_truncation_does_less_work():
    r = _module("flops", "--config=cpu-n2", "--mode=exact,truncated")
    exact, truncated = _json_lines(r.stdout)
    assert exact["gflop"] > 0 and exact["h100_floor_ms_fp32"] > 0
    assert truncated["gflop"] < exact["gflop"]  # K = 1 of N = 2 steps differentiated


@pytest.mark.slow
def test_precision_check_is_exact_on_the_cpu():
    r = _module("precision_check", *SMALL, "--syn_steps=2", "--iters=1")
    recs = _json_lines(r.stdout)
    assert [x["precision"] for x in recs] == ["highest", "high", "default"]
    assert all(x["rel_error"] < 1e-5 for x in recs)


@pytest.mark.slow
def test_ablation_table_reuses_the_plain_runs_of_its_workdir(tmp_path):
    wd = str(tmp_path / "wd")
    common = [f"--workdir={wd}", "--ipc=1", *TINY]
    _module("run", *common, "--method=mtt", "--baselines=false")
    run_results = read_text(os.path.join(wd, "results.json"))
    r = _module("ablate", *common, "--variants=mtt,satm_asam", "--baselines=false")
    # The ablation keeps its own results files: the run's are left as they were.
    assert read_text(os.path.join(wd, "results.json")) == run_results
    # --baselines=false is honoured: no random or full-data baseline is evaluated.
    assert not os.path.exists(os.path.join(wd, "baselines"))
    assert "random real images, ipc" not in r.stdout
    assert os.path.exists(os.path.join(wd, "ablation_results.json"))
    assert "finished earlier" in r.stdout  # the "mtt" variant is the plain run, not redone
    table = read_text(os.path.join(wd, "ablation.md"))
    assert "| mtt |" in table and "| satm_asam |" in table
    table = read_json(os.path.join(wd, "ablation.json"))["table"]
    assert {row["variant"] for row in table} >= {"mtt", "satm_asam"}


def _script_invocations(path):
    """(module, flag names) for every `python3 -m experiments.X` (or `bench`) line of a script."""
    text = read_text(path).replace("\\\n", " ")
    calls, pending = [], set()
    for line in text.splitlines():
        line = line.strip()
        found = re.search(r"-m experiments\.(\w+)", line)
        if found:
            module, rest = found.group(1), line[found.end() :]
        elif line.startswith("bench "):
            module, rest = "bench", line
        else:
            # Flags collected in a bash array (`EXTRA+=(--x=1)`) go to the next invocation.
            if re.search(r"\w+\+?=\(", line):
                pending |= set(re.findall(r"--(\w+)=", line))
            continue
        calls.append((module, set(re.findall(r"--(\w+)=", rest)) | pending))
        pending = set()
    return calls


def _help(module):
    """The module's `--helpfull` text (absl exits with status 1 after printing it)."""
    r = run_module(module, "--helpfull", timeout=120)
    assert "--helpfull" in r.stdout + r.stderr, r.stderr[-3000:]
    return r.stdout + r.stderr


def test_gpu_scripts_parse_and_pass_only_defined_flags():
    helps = {}
    for script in ("gpu_fmnist.sh", "gpu_perf.sh"):
        path = os.path.join(ROOT, "experiments", script)
        r = run(["bash", "-n", path], timeout=60)
        assert r.returncode == 0, r.stderr
        calls = _script_invocations(path)
        assert calls, script
        for module, names in calls:
            if module not in helps:
                helps[module] = _help(module)
            for name in names:
                assert re.search(rf"--(\[no\])?{name}:", helps[module]), (script, module, name)


def test_ablation_table_reports_the_spread_over_seeds():
    from experiments import ablate

    def row(variant, accs, converged):
        return {
            "method": "mtt",
            "variant": variant,
            "ipc": 1,
            "accs": accs,
            "acc_mean": sum(accs) / len(accs),
            "syn_lr": 0.01,
            "convergence": {"converged": converged},
        }

    results = {
        "results": [row("mtt", [70.0, 72.0], True), row("mtt_s1", [76.0, 78.0], False)],
        "config": {"dataset": "digits", "preset": "default"},
        "wall_s": 1.0,
    }
    md, table = ablate.ablation_table(results, ["mtt"], "cmd")
    cell = next(e for e in table if e["variant"] == "mtt")["ipc1"]
    assert cell["seeds"] == 2 and cell["seed_mean"] == 74.0
    assert cell["seed_std"] == round(float(np.std([71.0, 77.0], ddof=1)), 2)
    assert cell["converged"] == 1 and cell["n"] == 4
    assert "74.00 +- 4.24 (2)" in md and "| 1/2 |" in md


def test_window_lr_variant_changes_only_the_step_size_update():
    import dataclasses

    from experiments import ablate
    from satm_jax.experiment import configs

    base = configs.make_run_config("digits", 1, "satm")
    v = ablate.variant_config(base, "satm_window_lr", 2)
    assert v.variant == "satm_window_lr_s2"
    assert v.distill == dataclasses.replace(base.distill, lr_update="first_order_window", seed=2)
    assert base.distill.lr_update == "backprop"


@pytest.mark.parametrize(
    "dataset,ipc,preset",
    [("digits", 1, "default"), ("fashion_mnist", 1, "cpu"), ("cifar10", 10, "paper")],
)
def test_satm_back_propagates_its_step_size_in_every_preset_and_keeps_the_closed_form_as_option(
    dataset, ipc, preset
):
    import dataclasses

    from experiments import ablate
    from satm_jax.experiment import configs

    satm = configs.make_run_config(dataset, ipc, "satm", preset)
    assert configs.SATM_LR_UPDATE == "backprop"
    assert satm.distill.lr_update == "backprop"
    # The paper's closed form: a flag, and an ablation variant that changes nothing else.
    literal = configs.make_run_config(dataset, ipc, "satm", preset, {"lr_update": "first_order"})
    assert literal.distill == dataclasses.replace(satm.distill, lr_update="first_order")
    v = ablate.variant_config(satm, "satm_first_order_lr", 0)
    assert v.distill == literal.distill and v.variant == "satm_first_order_lr"


def test_side_by_side_summary_is_the_median_ratio_over_rounds():
    from experiments import side_by_side

    rounds = [
        {"steps": 10, "mode": "exact", "dsa": "off", "jax_ms": j, "mtt_ms": m}
        for j, m in ((100.0, 150.0), (200.0, 150.0), (120.0, 120.0))
    ]
    (s,) = side_by_side.summarise(rounds)
    assert s["rounds"] == 3 and s["jax_ms"] == 120.0 and s["mtt_ms"] == 150.0
    assert s["ratio_median"] == 1.0 and s["ratio_min"] == 0.75 and s["ratio_max"] == 1.5


def test_side_by_side_without_mtt_files_says_where_it_looked(tmp_path):
    r = _module("side_by_side", f"--mtt_dir={tmp_path}", "--steps=2", "--rounds=1", check=False)
    assert r.returncode == 2 and "torch_mtt.py" in r.stderr and str(tmp_path) in r.stderr


def test_side_by_side_eval_path_without_mtt_files_says_where_it_looked(tmp_path):
    r = _module("side_by_side", "--path=eval", f"--mtt_dir={tmp_path}", "--rounds=1", check=False)
    assert r.returncode == 2 and "networks.py" in r.stderr and str(tmp_path) in r.stderr


def test_torch_eval_without_mtt_files_says_where_it_looked(tmp_path):
    r = run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "torch_eval.py"),
            f"--mtt_dir={tmp_path}",
        ],
        check=False,
    )
    assert r.returncode == 2 and "networks.py" in r.stderr and str(tmp_path) in r.stderr


def _fake_torch_python(tmp_path, line):
    """A stand-in for the torch interpreter (and an empty MTT ``networks.py`` beside it): it
    writes its arguments to ``tmp_path/args`` and prints ``line``, torch_eval.py's result line,
    so that the plumbing (arguments, parsing, the ratio) is tested where torch is not installed.
    """
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\necho '{line}'\n")
    fake.chmod(0o755)
    (tmp_path / "networks.py").write_text("")
    return fake


@pytest.mark.slow
def test_side_by_side_eval_path_times_both_sides_and_prints_their_ratio(tmp_path):
    fake = _fake_torch_python(tmp_path, "torch-eval ncls=2 total=1234.5ms")
    r = _module(
        "side_by_side",
        "--path=eval",
        f"--mtt_dir={tmp_path}",
        f"--torch_python={fake}",
        "--ncls=2",
        "--ipc=2",
        "--res=8",
        "--channels=1",
        "--depth=1",
        "--eval_epochs=2",
        "--num_eval=1",
        "--rounds=2",
        "--dsa=off",
    )
    recs = _json_lines(r.stdout)
    rows = [x for x in recs if "summary" not in x]
    (s,) = [x["summary"] for x in recs if "summary" in x]
    assert len(rows) == 2 and all(x["mode"] == "eval" and x["steps"] == 0 for x in rows)
    assert all(x["mtt_ms"] == 1234.5 and x["jax_ms"] > 0 for x in rows)
    assert s["ratio_median"] == pytest.approx(statistics.median(1234.5 / x["jax_ms"] for x in rows))
    args = (tmp_path / "args").read_text()
    assert "torch_eval.py" in args and "--epochs=2" in args and "--num_eval=1" in args
    assert "--channels=1" in args and "--ipc=2" in args


@pytest.mark.slow
def test_side_by_side_expert_path_times_both_sides_with_the_expert_settings(tmp_path):
    fake = _fake_torch_python(tmp_path, "torch-eval expert n=8 total=2000.0ms")
    r = _module(
        "side_by_side",
        "--path=expert",
        f"--mtt_dir={tmp_path}",
        f"--torch_python={fake}",
        "--ncls=2",
        "--res=8",
        "--channels=1",
        "--depth=1",
        "--expert_images=8",
        "--expert_epochs=1",
        "--num_experts=1",
        "--eval_epochs=7",
        "--rounds=1",
        "--dsa=off",
    )
    recs = _json_lines(r.stdout)
    rows = [x for x in recs if "summary" not in x]
    assert len(rows) == 1 and rows[0]["mode"] == "expert" and rows[0]["steps"] == 0
    assert rows[0]["mtt_ms"] == 2000.0 and rows[0]["jax_ms"] > 0
    args = (tmp_path / "args").read_text().split()
    assert "--expert" in args and "--n_train=8" in args and "--epochs=1" in args
    assert "--num_eval=1" in args and "--epochs=7" not in args


def test_conv_probe_formulations_compute_the_library_convolution():
    import jax

    from experiments import conv_probe
    from satm_jax import models

    kx, kk = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (2, 6, 6, 3))
    kernel = jax.random.normal(kk, (3, 3, 3, 4))
    want = models.conv2d(x, kernel, padding=1, impl="patches")
    for impl in ("shifted", "rows", "lax"):
        got = conv_probe.dispatch(x, kernel, padding=1, impl=impl)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)
