r"""satm-jax's outer iteration and MTT's own PyTorch code, timed side by side on one host.

CPU hosts differ by up to 2x (anchors.md), so a speed ratio is only meaningful when both sides
run in the same session on the same machine. This script alternates the two, ``--rounds``
times per shape: each round runs ``experiments.bench`` (satm-jax, ``--mode``) and MTT's
``torch_mtt.py`` (MTT's ConvNet and ReparamModule, N unrolled SGD steps with
``create_graph=True``, one backward; no DSA) in fresh processes, one after the other, and
reads each side's median time per iteration. It prints one JSON line per round and a summary
line per (shape, satm-jax setting) with the median ratio ``MTT / satm-jax`` (above 1: satm-jax is
faster) and its range over rounds::

    python -m experiments.side_by_side --steps=2,10 --rounds=3 \
        --torch_python=/path/to/venv-with-torch/bin/python

``--dsa`` chooses satm-jax's augmentation: ``off`` (MTT's script has none: the like-for-like
row), ``on`` (satm-jax's default), or ``both``. ``--conv_impl`` (comma-separated, default
``auto``) times satm-jax with each convolution in the same rounds, e.g.
``--conv_impl=patches,winograd``.

``--path=eval`` times the other hot path, the evaluation training, instead: satm-jax's
``experiments.bench --mode=eval`` (``--num_eval`` networks in one program, ``--model_axis``:
one after another on the CPU by default, or vmapped; ``--eval_epochs`` epochs
on ``--ncls x --ipc`` images) against ``experiments/torch_eval.py`` (the same number of MTT's
ConvNets trained one after another with MTT's evaluation settings); ``--steps`` and ``--mode``
are then unused and the rows carry ``"steps": 0, "mode": "eval"``::

    python -m experiments.side_by_side --path=eval --ipc=10 --eval_epochs=100 --num_eval=3 \
        --dsa=off --rounds=3 --torch_python=/path/to/venv-with-torch/bin/python

``--path=expert`` times the expert training: ``experiments.bench --mode=expert``
(``--num_experts`` experts in one program, ``--model_axis``; ``--expert_epochs`` epochs on
``--expert_images`` images)
against ``experiments/torch_eval.py --expert`` (as many of MTT's ConvNets trained one after
another with ``buffer.py``'s settings); rows carry ``"steps": 0, "mode": "expert"``::

    python -m experiments.side_by_side --path=expert --expert_images=5000 --expert_epochs=1 \
        --dsa=off --rounds=3 --torch_python=/path/to/venv-with-torch/bin/python

The MTT side needs a Python with ``torch==2.13.0`` and numpy (``--torch_python``) and MTT's
files (``--mtt_dir``, default ``../shared/anchors/mtt``).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

from absl import app, flags

from satm_jax.matching import SECOND_ORDER
from satm_jax.models import CONV_IMPLS
from satm_jax.train import MODEL_AXES

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TORCH_MS = re.compile(r"median_iter=([0-9.]+)ms")
_TORCH_EVAL_MS = re.compile(r"total=([0-9.]+)ms")


def define_flags() -> None:
    """The command line (defined only when run as a script, so that importing this module for
    ``summarise`` leaves absl's global flags to the other entry points)."""
    flags.DEFINE_list("steps", ["2", "10"], "Inner steps N to time (comma-separated).")
    flags.DEFINE_integer("ncls", 10, "Classes.")
    flags.DEFINE_integer("ipc", 1, "Images per class.")
    flags.DEFINE_integer("res", 32, "Image side.")
    flags.DEFINE_integer("depth", 3, "ConvNet depth.")
    flags.DEFINE_integer("channels", 3, "Image channels.")
    flags.DEFINE_enum(
        "path",
        "outer",
        ["outer", "eval", "expert"],
        "What to time: the outer iteration, the evaluation or the expert training.",
    )
    flags.DEFINE_integer("eval_epochs", 100, "Epochs per network for --path=eval.")
    flags.DEFINE_integer("num_eval", 3, "Networks for --path=eval.")
    flags.DEFINE_integer("expert_images", 5000, "Training images for --path=expert.")
    flags.DEFINE_integer("expert_epochs", 1, "Epochs per expert for --path=expert.")
    flags.DEFINE_integer("num_experts", 1, "Experts for --path=expert.")
    flags.DEFINE_integer("iters", 5, "Timed iterations per process (after one warm-up).")
    flags.DEFINE_integer("rounds", 3, "Alternating rounds per shape.")
    flags.DEFINE_list("mode", ["exact"], "satm-jax modes (experiments.bench --mode).")
    flags.DEFINE_enum(
        "model_axis",
        "auto",
        list(MODEL_AXES),
        "experiments.bench --model_axis for --path=eval and --path=expert.",
    )
    flags.DEFINE_enum("dsa", "both", ["off", "on", "both"], "satm-jax's DSA setting(s).")
    flags.DEFINE_list(
        "conv_impl", ["auto"], f"satm-jax's convolution(s), of {', '.join(CONV_IMPLS)}."
    )
    flags.DEFINE_list(
        "second_order",
        ["auto"],
        f"satm-jax's second-derivative mode(s) for the outer step, of {', '.join(SECOND_ORDER)}.",
    )
    flags.DEFINE_string(
        "torch_python", sys.executable, "A Python interpreter with torch and numpy."
    )
    flags.DEFINE_string(
        "mtt_dir", os.path.join(os.path.dirname(ROOT), "shared", "anchors", "mtt"), "MTT's files."
    )


def run_jax(
    n: int, mode: str, dsa: bool, conv_impl: str = "auto", second_order: str = "auto"
) -> float:
    """Median ms per outer iteration (or the whole evaluation, ``mode="eval"``) of
    ``experiments.bench`` in a fresh process."""
    args = [
        sys.executable,
        "-m",
        "experiments.bench",
        f"--num_classes={FLAGS.ncls}",
        f"--ipc={FLAGS.ipc}",
        f"--res={FLAGS.res}",
        f"--depth={FLAGS.depth}",
        f"--channels={FLAGS.channels}",
        f"--syn_steps={max(n, 1)}",
        f"--mode={mode}",
        f"--iters={FLAGS.iters}",
        f"--eval_epochs={FLAGS.eval_epochs}",
        f"--num_eval={FLAGS.num_eval}",
        f"--expert_images={FLAGS.expert_images}",
        f"--expert_epochs={FLAGS.expert_epochs}",
        f"--num_experts={FLAGS.num_experts}",
        f"--model_axis={FLAGS.model_axis}",
        f"--conv_impl={conv_impl}",
        f"--second_order={second_order}",
        f"--dsa_strategy={'color_crop_cutout_flip_scale_rotate' if dsa else 'none'}",
    ]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"experiments.bench failed:\n{r.stderr[-2000:]}")
    rec = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")][-1]
    return float(rec["ms_per_iter"])


def run_torch(n: int) -> float:
    """Median ms per outer iteration of MTT's ``torch_mtt.py`` in a fresh process."""
    script = os.path.join(FLAGS.mtt_dir, "torch_mtt.py")
    if not os.path.exists(script):
        raise FileNotFoundError(f"MTT's timing script is not at {script} (--mtt_dir)")
    args = [
        FLAGS.torch_python,
        script,
        f"--ncls={FLAGS.ncls}",
        f"--ipc={FLAGS.ipc}",
        f"--res={FLAGS.res}",
        f"--depth={FLAGS.depth}",
        f"--steps={n}",
        f"--iters={FLAGS.iters}",
    ]
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    m = _TORCH_MS.search(r.stdout)
    if r.returncode or not m:
        raise RuntimeError(f"torch_mtt.py failed (--torch_python?):\n{r.stderr[-2000:]}")
    return float(m.group(1))


def run_torch_eval(expert: bool = False) -> float:
    """Ms of ``experiments/torch_eval.py`` (all networks; ``--expert``: the expert training) in
    a fresh process."""
    script = os.path.join(ROOT, "experiments", "torch_eval.py")
    if not os.path.exists(os.path.join(FLAGS.mtt_dir, "networks.py")):
        raise FileNotFoundError(f"MTT's networks.py is not in {FLAGS.mtt_dir} (--mtt_dir)")
    args = [
        FLAGS.torch_python,
        script,
        f"--ncls={FLAGS.ncls}",
        f"--ipc={FLAGS.ipc}",
        f"--res={FLAGS.res}",
        f"--channels={FLAGS.channels}",
        f"--depth={FLAGS.depth}",
        f"--mtt_dir={FLAGS.mtt_dir}",
    ]
    if expert:
        args += [
            "--expert",
            f"--n_train={FLAGS.expert_images}",
            f"--epochs={FLAGS.expert_epochs}",
            f"--num_eval={FLAGS.num_experts}",
        ]
    else:
        args += [f"--epochs={FLAGS.eval_epochs}", f"--num_eval={FLAGS.num_eval}"]
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    m = _TORCH_EVAL_MS.search(r.stdout)
    if r.returncode or not m:
        raise RuntimeError(f"torch_eval.py failed (--torch_python?):\n{r.stderr[-2000:]}")
    return float(m.group(1))


def summarise(rounds: list[dict]) -> list[dict]:
    """Per (N, mode, dsa, conv_impl, second_order): medians of both sides and the ratio's
    median and range."""
    out = []

    def key(r):
        return (
            r["steps"],
            r["mode"],
            r["dsa"],
            r.get("conv_impl", "auto"),
            r.get("second_order", "auto"),
        )

    for n, mode, dsa, conv, order in sorted({key(r) for r in rounds}):
        rs = [r for r in rounds if key(r) == (n, mode, dsa, conv, order)]
        ratios = [r["mtt_ms"] / r["jax_ms"] for r in rs]
        out.append(
            {
                "steps": n,
                "mode": mode,
                "dsa": dsa,
                "conv_impl": conv,
                "second_order": order,
                "rounds": len(rs),
                "jax_ms": statistics.median(r["jax_ms"] for r in rs),
                "mtt_ms": statistics.median(r["mtt_ms"] for r in rs),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
    return out


def training_path(path: str) -> bool:
    """Whether ``--path`` times a network's training (eval, expert), not the outer step."""
    return path in ("eval", "expert")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    dsas = {"off": [False], "on": [True], "both": [False, True]}[FLAGS.dsa]
    unknown = [c for c in FLAGS.conv_impl if c not in CONV_IMPLS]
    if unknown:
        raise app.UsageError(f"--conv_impl: unknown {unknown}; choose from {list(CONV_IMPLS)}")
    unknown = [c for c in FLAGS.second_order if c not in SECOND_ORDER]
    if unknown:
        raise app.UsageError(f"--second_order: unknown {unknown}; choose from {list(SECOND_ORDER)}")
    # satm-jax's settings timed in every round: each convolution, each second-order mode (the
    # latter only matters for the outer step).
    training = training_path(FLAGS.path)
    orders = ["auto"] if training else FLAGS.second_order
    settings = [(c, o) for c in FLAGS.conv_impl for o in orders]
    rounds = []
    try:
        for n in [0] if training else [int(s) for s in FLAGS.steps]:
            for k in range(FLAGS.rounds):
                if training:
                    mtt = run_torch_eval(expert=FLAGS.path == "expert")
                else:
                    mtt = run_torch(n)
                for mode in [FLAGS.path] if training else FLAGS.mode:
                    for dsa in dsas:
                        for conv, order in settings:
                            rec = {
                                "round": k,
                                "steps": n,
                                "mode": mode,
                                "dsa": "on" if dsa else "off",
                                "conv_impl": conv,
                                "second_order": order,
                                "jax_ms": run_jax(n, mode, dsa, conv, order),
                                "mtt_ms": mtt,
                            }
                            print(json.dumps(rec), flush=True)
                            rounds.append(rec)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in summarise(rounds):
        print(json.dumps({"summary": s}), flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
