r"""The sharpness study: SATM's SAM radius on a log grid, for the global and the per-image
ball, against MTT and MTT with the truncated hypergradient, with the flatness of every set.

Every point is one ``experiments.run`` configuration per seed, in its own folder
``<workdir>/<point>_s<seed>/`` (the experts are shared through ``<workdir>/experts``);
finished points are reused, so a killed study resumes. Points: ``mtt``, ``mtt_tuh`` (MTT with
``K = ceil(N/3)``), and ``satm_<ball>_r<rho>`` for every radius and ball, the radius relative to
the set's norm by default (``--rho_scale``). Any flag of ``experiments.run`` applies to every
point; ``--flatness`` is always on (its ``--flatness_*`` flags apply). With
``--eval_models=convnet,alexnet`` (and ``--eval_model_lr=alexnet:0.01`` for a network that
does not train at the learned step size) every set is also evaluated on the other networks,
reported in a second table with the paired difference to MTT's set.

Example (digits, one seed, 2-core CPU; docs/SHARPNESS.md has the measured figures)::

    python -m experiments.sharpness_study --dataset=digits --ipc=10 \
        --radii=0.001,0.01,0.03,0.1 --balls=global,per_example --seeds=0 --workdir=./sharp

writes ``sharpness.json`` (rows and per-point aggregates), ``sharpness.md`` (the table),
``sharpness_accuracy.png`` (accuracy against radius) and ``sharpness_flatness.png``
(flatness against radius) in the workdir.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np
from absl import app, flags, logging

from experiments import (
    errors,
    flatness_flags,
    seed_flags,
)
from experiments import run as run_lib
from satm_jax import jsonio
from satm_jax.evaluate import HEALTH_FLAGS as HEALTH
from satm_jax.experiment import configs as configs_lib

FLAGS = flags.FLAGS

flags.DEFINE_list("radii", ["0.001", "0.01", "0.03", "0.1"], "SAM radii of the SATM points.")
flags.DEFINE_list("balls", ["global", "per_example"], "Balls of the SATM points.")
flags.DEFINE_list(
    "per_example_radii", None, "Radii of the per-image ball's points (default: --radii)."
)
flags.DEFINE_list(
    "references",
    None,
    "Reference points to run (default: all of REFERENCES); e.g. --references=mtt to add "
    "mtt_tuh later: finished points are reused.",
)

BALL_LABELS = {"global": "global", "per_example": "perimg"}
FLATNESS_KEYS = (
    "worst_case_increase_rel",
    "hessian_top_eig",
    "hessian_top_eig_scaled",
    "generalisation_gap",
)
# The reference points: MTT, and MTT with the truncated hypergradient (K = ceil(N/3)).
REFERENCES = {"mtt": {}, "mtt_tuh": {"hypergrad": "truncated"}}


def points(
    radii: list[float] | dict[str, list[float]],
    balls: list[str],
    rho_scale: str,
    references: list[str] | None = None,
) -> list[tuple[str, str, dict]]:
    """``(name, method, overrides)`` of every point of the study (``radii``: one grid, or one
    per ball; ``references``: which of ``REFERENCES``, all by default)."""
    references = list(REFERENCES) if references is None else references
    for r in references:
        if r not in REFERENCES:
            raise configs_lib.ConfigError(
                f"unknown reference point {r!r}; choose from {list(REFERENCES)}"
            )
    out = [(r, "mtt", dict(REFERENCES[r])) for r in REFERENCES if r in references]
    for ball in balls:
        if ball not in BALL_LABELS:
            raise configs_lib.ConfigError(f"unknown ball {ball!r}; choose from {list(BALL_LABELS)}")
        for r in radii[ball] if isinstance(radii, dict) else radii:
            o = {"rho": r, "rho_scale": rho_scale}
            if ball != "global":
                o["rho_ball"] = ball
            out.append((f"satm_{BALL_LABELS[ball]}_r{r:g}", "satm", o))
    return out


def run_study(
    dataset: str,
    ipc: int,
    preset: str,
    overrides: dict,
    data_dir: str | None,
    radii: list[float] | dict[str, list[float]],
    balls: list[str],
    seeds: list[int],
    flatness_cfg,
    workdir: str,
    *,
    references: list[str] | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Runs (or reuses) every point for every seed; returns ``{"rows": [...], "points": [...]}``
    with the condensed set's row of each run (its ``flatness`` object included) and the
    per-point aggregates of ``aggregate``."""
    from satm_jax import datasets as data_lib
    from satm_jax import outputs
    from satm_jax.experiment import pipeline

    scale = overrides.pop("rho_scale", "relative")
    if not seeds:
        raise configs_lib.ConfigError("the study needs at least one seed (--seeds)")
    # Every point's config first, so that a bad radius or setting stops the study before
    # anything is trained (not after the points before it).
    runs = [
        (
            name,
            s,
            configs_lib.make_run_config(
                dataset, ipc, method, preset, {**overrides, **point, "seed": s}, data_dir
            ),
        )
        for name, method, point in points(radii, balls, scale, references)
        for s in seeds
    ]
    dataset_obj = data_lib.load_dataset(dataset, data_dir=data_dir)
    os.makedirs(os.path.join(workdir, "experts"), exist_ok=True)
    rows = []
    for name, s, cfg in runs:
        pdir = os.path.join(workdir, f"{name}_s{s}")
        os.makedirs(pdir, exist_ok=True)
        link = os.path.join(pdir, "experts")
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(workdir, "experts")), link)
        out = pipeline.train_and_evaluate(
            [cfg],
            pdir,
            dataset=dataset_obj,
            baselines=False,
            progress=progress,
            log=log,
            flatness=flatness_cfg,
        )
        row = dict(_main_row(out["results"], cfg.model.name), point=name, seed=s)
        others = {r["model"]: r for r in out["results"] if r.get("model") != row.get("model")}
        if others:  # --eval_models: the other networks' accuracy on the same set
            row["xarch"] = {
                m: {k: r[k] for k in ("acc_mean", "acc_std", "eval_lr", *HEALTH) if k in r}
                for m, r in others.items()
            }
        metrics = outputs.read_metrics(os.path.join(pdir, "runs", cfg.name))
        sharp = [m["sharpness"] for m in metrics if "sharpness" in m]
        if sharp:  # the run's own per-iteration sharpness, mean over its last tenth
            row["sharpness_last_tenth"] = float(np.mean(sharp[-max(1, len(sharp) // 10) :]))
        rows.append(row)
    return {"rows": rows, "points": aggregate(rows)}


def _main_row(rows: list[dict], model: str) -> dict:
    """The row of the distillation network (the first row if it was not evaluated)."""
    return next((r for r in rows if r.get("model") == model), rows[0])


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate(rows: list[dict]) -> list[dict]:
    """Per point: accuracy over seeds (mean, sample std of the seeds' means), the paired
    difference to MTT at the same seed, and each flatness measure over seeds."""
    mtt = {r["seed"]: r["acc_mean"] for r in rows if r["point"] == "mtt"}
    mtt_xarch = {
        (m, r["seed"]): x["acc_mean"]
        for r in rows
        if r["point"] == "mtt"
        for m, x in r.get("xarch", {}).items()
    }
    out = []
    for name in dict.fromkeys(r["point"] for r in rows):
        rs = [r for r in rows if r["point"] == name]
        acc = _mean_std([r["acc_mean"] for r in rs])
        entry = {"point": name, "seeds": len(rs), "acc_mean": acc[0], "acc_std": acc[1]}
        entry["net_std"] = float(np.mean([r.get("acc_std", np.nan) for r in rs]))
        paired = [r["acc_mean"] - mtt[r["seed"]] for r in rs if r["seed"] in mtt]
        if paired:
            entry["vs_mtt_mean"], entry["vs_mtt_std"] = _mean_std(paired)
        for k in FLATNESS_KEYS:
            vals = [r["flatness"][k] for r in rs if k in r.get("flatness", {})]
            if vals:
                entry[k], entry[k + "_std"] = _mean_std(vals)
        sh = [r["sharpness_last_tenth"] for r in rs if "sharpness_last_tenth" in r]
        if sh:
            entry["sharpness_last_tenth"] = float(np.mean(sh))
        entry["distill_s"] = float(np.mean([r.get("distill_s", np.nan) for r in rs]))
        xarch = {}
        for m in dict.fromkeys(m for r in rs for m in r.get("xarch", {})):
            per_seed = {r["seed"]: r["xarch"][m] for r in rs if m in r.get("xarch", {})}
            accs = [v["acc_mean"] for v in per_seed.values()]
            x = dict(zip(("acc_mean", "acc_std"), _mean_std(accs)), seeds=len(per_seed))
            paired = [
                v["acc_mean"] - mtt_xarch[m, seed]
                for seed, v in per_seed.items()
                if (m, seed) in mtt_xarch
            ]
            if paired and name != "mtt":
                x["vs_mtt_mean"], x["vs_mtt_std"] = _mean_std(paired)
            for flag in HEALTH:
                n = sum(v.get(flag, 0) for v in per_seed.values())
                if n:
                    x[flag] = n
            xarch[m] = x
        if xarch:
            entry["xarch"] = xarch
        out.append(entry)
    return out


def _radius_of(name: str) -> float | None:
    return float(name.rsplit("_r", 1)[1]) if name.startswith("satm_") else None


def format_markdown(study: dict, command: str, wall_s: float) -> str:
    lines = [
        "Command: `" + command + "`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; date "
        f"{time.strftime('%Y-%m-%d')}; wall {wall_s:.0f} s (this call; reused points cost "
        "nothing).  ",
        "Accuracy: mean +- sample std over seeds of each seed's mean over its evaluation "
        "networks (with one seed: the networks' std); vs MTT: paired difference at the same "
        "seed. Flatness (held-out experts): "
        "worst-case loss increase in the ball over the held-out loss, top Hessian eigenvalue, "
        "the same with every image's norm on the Hessian's diagonal scaling (blind to "
        "rescaled images), held-out minus sampled loss. Sharpness: the run's own L(X+eps) - L(X), last tenth.",
        "",
        "| point | seeds | accuracy | vs MTT | worst-case rel | top eig | top eig, scaled |"
        " gen. gap | sharpness | distill s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(e, k, fmt="{:.4g}"):
        if k not in e:
            return "-"
        std = e.get(k + "_std")
        return fmt.format(e[k]) + (f" +- {fmt.format(std)}" if std else "")

    for e in study["points"]:
        vs = "-"
        if "vs_mtt_mean" in e and e["point"] != "mtt":
            vs = f"{e['vs_mtt_mean']:+.2f} +- {e['vs_mtt_std']:.2f}"
        sharp = f"{e['sharpness_last_tenth']:.3g}" if "sharpness_last_tenth" in e else "-"
        if e["seeds"] > 1:
            acc = f"{e['acc_mean']:.2f} +- {e['acc_std']:.2f}"
        else:  # no spread over seeds: show the evaluation networks' instead
            acc = f"{e['acc_mean']:.2f} (nets +- {e['net_std']:.2f})"
            vs = vs.split(" +-")[0]
        cells = [
            e["point"],
            str(e["seeds"]),
            acc,
            vs,
            *(cell(e, k) for k in FLATNESS_KEYS),
            sharp,
            f"{e['distill_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    xarch = [(e["point"], m, x) for e in study["points"] for m, x in e.get("xarch", {}).items()]
    if xarch:
        lines += [
            "",
            "Other networks (`--eval_models`) trained on the same sets: accuracy over seeds, "
            "paired difference to MTT's set at the same seed, networks flagged diverged or "
            "collapsed.",
            "",
            "| point | network | seeds | accuracy | vs MTT | flagged |",
            "|---|---|---|---|---|---|",
        ]
        for point, m, x in xarch:
            vs = "-"
            if "vs_mtt_mean" in x:
                vs = f"{x['vs_mtt_mean']:+.2f} +- {x['vs_mtt_std']:.2f}"
            flagged = ", ".join(f"{x[f]} {f}" for f in HEALTH if x.get(f)) or "-"
            lines.append(
                f"| {point} | {m} | {x['seeds']} | {x['acc_mean']:.2f} +- {x['acc_std']:.2f} "
                f"| {vs} | {flagged} |"
            )
    return "\n".join(lines) + "\n"


def plot(study: dict, workdir: str) -> list[str]:
    """``sharpness_accuracy.png`` and ``sharpness_flatness.png``: one line per ball against
    the radius (log scale), MTT and MTT + TUH as horizontal bands."""
    from matplotlib.figure import Figure

    pts = study["points"]
    refs = {e["point"]: e for e in pts if e["point"] in ("mtt", "mtt_tuh")}
    ref_style = {"mtt": dict(ls="--", color="k"), "mtt_tuh": dict(ls=":", color="0.45")}
    series: dict[str, list[dict]] = {}
    for e in pts:
        r = _radius_of(e["point"])
        if r is not None:
            series.setdefault(e["point"].split("_")[1], []).append({**e, "radius": r})
    paths = []
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    for ball, es in series.items():
        es = sorted(es, key=lambda e: e["radius"])
        ax.errorbar(
            [e["radius"] for e in es],
            [e["acc_mean"] for e in es],
            yerr=[e["acc_std"] if e["seeds"] > 1 else e["net_std"] for e in es],
            marker="o",
            capsize=3,
            label=f"SATM, {ball} ball",
        )
    for name, e in refs.items():
        ax.axhline(e["acc_mean"], lw=1, label=name.replace("_", " + "), **ref_style[name])
        spread = e["acc_std"] if e["seeds"] > 1 else e["net_std"]
        ax.axhspan(
            e["acc_mean"] - spread,
            e["acc_mean"] + spread,
            alpha=0.08,
            color=ref_style[name]["color"],
        )
    ax.set_xscale("log")
    ax.set_xlabel("rho (relative to ||X||)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "sharpness_accuracy.png"))
    fig.savefig(paths[-1])

    fig = Figure(figsize=(13, 3.2))
    for i, k in enumerate(FLATNESS_KEYS):
        ax = fig.add_subplot(1, len(FLATNESS_KEYS), i + 1)
        for ball, es in series.items():
            es = sorted((e for e in es if k in e), key=lambda e: e["radius"])
            ax.errorbar(
                [e["radius"] for e in es],
                [e[k] for e in es],
                yerr=[e.get(k + "_std", 0.0) for e in es],
                marker="o",
                capsize=3,
                label=ball,
            )
        for name, e in refs.items():
            if k in e:
                ax.axhline(e[k], lw=1, label=name, **ref_style[name])
        ax.set_xscale("log")
        ax.set_xlabel("rho (relative)")
        ax.set_title(k, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "sharpness_flatness.png"))
    fig.savefig(paths[-1])
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)

    t0 = time.time()
    try:
        radii = {
            "global": seed_flags.numbers("radii", FLAGS.radii, float),
            "per_example": seed_flags.numbers(
                "per_example_radii", FLAGS.per_example_radii or FLAGS.radii, float
            ),
        }
        seeds = seed_flags.seeds()
        ipcs = run_lib.parse_ipcs(FLAGS.ipc, FLAGS.dataset)
        if len(ipcs) != 1:
            raise configs_lib.ConfigError("the sharpness study takes one --ipc")
        flat = flatness_flags.config_from_flags()  # always on here
        study = run_study(
            FLAGS.dataset,
            ipcs[0],
            FLAGS.preset,
            run_lib.overrides_from_flags(),
            FLAGS.data_dir,
            radii,
            FLAGS.balls,
            seeds,
            flat,
            FLAGS.workdir,
            references=FLAGS.references,
            progress=FLAGS.progress,
        )
    except (*errors.user_errors(), ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m experiments.sharpness_study " + " ".join(sys.argv[1:])
    md = format_markdown(study, command, time.time() - t0)
    with open(os.path.join(FLAGS.workdir, "sharpness.md"), "w") as f:
        f.write(md)
    jsonio.write_json(os.path.join(FLAGS.workdir, "sharpness.json"), {"command": command, **study})
    plot(study, FLAGS.workdir)
    print(md)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
