r"""Ablation: MTT and the SATM variants on one dataset and budget, as Markdown and JSON tables.

Every variant shares the experts and the evaluation protocol of the preset; only the outer loop
changes. Variants (``--variants``, default all):

====================  ==============================================================
mtt                   MTT: exact hypergradient, no sharpness, back-propagated step size
mtt_tuh               MTT with the truncated hypergradient only (K = ceil(N/3))
satm                  SATM: SAM, K = ceil(N/3), trajectory reusing, back-propagated step size
satm_exact            SATM with the exact hypergradient (K = N)
satm_k_half           SATM with K = ceil(N/2)
satm_no_tr            SATM without trajectory reusing (second pass from theta_0)
satm_first_order_lr   SATM with the paper's closed-form first-order step-size update
satm_window_lr        SATM with the first-order step size over the differentiated window (ours)
satm_asam             ASAM in SAM's place
satm_gsam             GSAM in SAM's place
satm_smooth           Gaussian-smoothed SAM
satm_soft             SATM with learnable soft labels (DATM initialisation)
satm_ema              SATM with an EMA of the images (decay 0.99) for evaluation
====================  ==============================================================

Example (725 s on the 2-core development CPU, 2026-11-28)::

    python -m experiments.ablate --dataset=digits --ipc=1 --seeds=0,1 --workdir=./ablate_digits

writes ``ablation.md`` and ``ablation.json`` in the workdir (and, while it runs,
``ablation_results.{json,md}``; a run's own ``results.json`` in the same workdir is left
alone). Runs of ``experiments.run`` already finished in the workdir are reused. Any flag of
``experiments.run`` (``--iterations``, ``--rho``...) applies to every variant; the random-real-image
and full-data baselines are evaluated too unless ``--baselines=false``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time

from absl import app, flags, logging

from experiments import run as run_lib
from experiments import seed_flags
from satm_jax import jsonio, matching
from satm_jax.experiment import configs as configs_lib

FLAGS = flags.FLAGS

VARIANTS: dict[str, tuple[str, str]] = {
    "mtt": ("mtt", "MTT: exact hypergradient, no sharpness, back-propagated step size"),
    "mtt_tuh": ("mtt", "MTT with the truncated hypergradient only (K = ceil(N/3))"),
    "satm": ("satm", "SATM: SAM, K = ceil(N/3), trajectory reusing, back-propagated step size"),
    "satm_exact": ("satm", "SATM with the exact hypergradient (K = N)"),
    "satm_k_half": ("satm", "SATM with K = ceil(N/2)"),
    "satm_no_tr": ("satm", "SATM without trajectory reusing (second pass from theta_0)"),
    "satm_first_order_lr": (
        "satm",
        "SATM with the paper's closed-form first-order step-size update (all N steps)",
    ),
    "satm_window_lr": (
        "satm",
        "SATM with the first-order step size over the last K (differentiated) steps only",
    ),
    "satm_asam": ("satm", "ASAM in SAM's place"),
    "satm_gsam": ("satm", "GSAM in SAM's place"),
    "satm_smooth": ("satm", "Gaussian-smoothed SAM"),
    "satm_soft": ("satm", "SATM with learnable soft labels (DATM initialisation)"),
    "satm_ema": ("satm", "SATM with an EMA of the images (decay 0.99) for evaluation"),
}

flags.DEFINE_list("variants", None, f"Variants to run (default all): {', '.join(VARIANTS)}.")


def variant_config(base: configs_lib.RunConfig, variant: str, seed: int) -> configs_lib.RunConfig:
    """``base`` (the method's config) changed into ``variant`` with distillation seed ``seed``."""
    d = base.distill
    n = d.syn_steps
    changes: dict = {}
    if variant == "mtt_tuh":
        changes = dict(hypergrad="truncated", truncate=matching.default_truncation(n))
    elif variant == "satm_exact":
        changes = dict(hypergrad="exact", truncate=None)
    elif variant == "satm_k_half":
        changes = dict(truncate=max(1, math.ceil(n / 2)))
    elif variant == "satm_no_tr":
        changes = dict(reuse_trajectory=False)
    elif variant == "satm_first_order_lr":
        changes = dict(lr_update="first_order")
    elif variant == "satm_window_lr":
        changes = dict(lr_update="first_order_window")
    elif variant == "satm_asam":
        changes = dict(sharpness="asam")
    elif variant == "satm_gsam":
        changes = dict(sharpness="gsam")
    elif variant == "satm_smooth":
        changes = dict(sharpness="smooth_sam")
    elif variant == "satm_soft":
        changes = dict(soft_labels=True)
    elif variant == "satm_ema":
        changes = dict(ema_decay=0.99)
    distill = dataclasses.replace(d, seed=seed, **changes).validate()
    name = variant if seed == 0 else f"{variant}_s{seed}"
    return dataclasses.replace(base, distill=distill, variant=name)


def build(dataset, ipcs, variants, seeds, preset, overrides, data_dir):
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise configs_lib.ConfigError(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    out = []
    for ipc in ipcs:
        base = {
            m: configs_lib.make_run_config(
                dataset, ipc, m, preset, overrides, data_dir, strict=False
            )
            for m in ("mtt", "satm")
        }
        for v in variants:
            for s in seeds:
                out.append(variant_config(base[VARIANTS[v][0]], v, s))
    return out


def _variant_of(row: dict) -> str:
    v = row.get("variant", row["method"])
    return v.rsplit("_s", 1)[0] if "_s" in v and v.rsplit("_s", 1)[1].isdigit() else v


def ablation_table(results: dict, variants: list[str], command: str) -> tuple[str, list[dict]]:
    """Aggregates rows per (variant, ipc) over seeds: pooled mean/std of all evaluation nets."""
    rows = [r for r in results["results"] if r["method"] in ("mtt", "satm", "random")]
    ipcs = sorted({r["ipc"] for r in rows})
    table = []
    for v in ["random", *variants]:
        entry = {"variant": v, "description": VARIANTS.get(v, ("", "random real images"))[1]}
        for ipc in ipcs:
            rs = [
                r
                for r in rows
                if r["ipc"] == ipc
                and (_variant_of(r) == v if v != "random" else r["method"] == "random")
            ]
            accs = [a for r in rs for a in r.get("accs", [])]
            if not accs:
                continue
            mean = sum(accs) / len(accs)
            std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
            its = [r.get("distill_s") for r in rs if r.get("distill_s") is not None]
            per_seed = [r["acc_mean"] for r in rs]
            sm = sum(per_seed) / len(per_seed)
            # spread over seeds: sample standard deviation (ddof 1), 0 for one seed
            ss = (
                (sum((a - sm) ** 2 for a in per_seed) / (len(per_seed) - 1)) ** 0.5
                if len(per_seed) > 1
                else 0.0
            )
            conv = [r["convergence"] for r in rs if isinstance(r.get("convergence"), dict)]
            entry[f"ipc{ipc}"] = {
                "acc_mean": round(mean, 2),
                "acc_std": round(std, 2),
                "n": len(accs),
                "seeds": len(rs),
                "seed_mean": round(sm, 2),
                "seed_std": round(ss, 2),
                "distill_s": round(sum(its) / len(its), 1) if its else None,
                "converged": sum(bool(c.get("converged")) for c in conv) if conv else None,
                "syn_lr": [round(r["syn_lr"], 5) for r in rs if "syn_lr" in r] or None,
            }
        table.append(entry)
    cfg = results["config"]
    lines = [
        f"# Ablation on {cfg['dataset']} (preset {cfg['preset']}"
        + (", REDUCED protocol" if cfg.get("reduced") else "")
        + ")",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()} {os.cpu_count()} cores, backend {cfg.get('backend')}; "
        f"date {time.strftime('%Y-%m-%d')}; wall {results['wall_s']:.0f} s.  ",
        "Test accuracy (%) of ConvNets trained on the condensed set: mean +- std over all "
        "evaluation networks of all seeds (n); over seeds: mean +- sample std of the seeds' "
        "means; converged: runs without a convergence warning; distill s = wall time of one "
        "distillation incl. compilation.",
        "",
        "| variant | "
        + " | ".join(f"IPC {i} acc | n | over seeds | converged | distill s" for i in ipcs)
        + " | description |",
        "|---|" + "---|---|---|---|---|" * len(ipcs) + "---|",
    ]
    for e in table:
        cells = []
        for i in ipcs:
            c = e.get(f"ipc{i}")
            cells += (
                [
                    f"{c['acc_mean']:.2f} +- {c['acc_std']:.2f}",
                    str(c["n"]),
                    f"{c['seed_mean']:.2f} +- {c['seed_std']:.2f} ({c['seeds']})",
                    "-" if c["converged"] is None else f"{c['converged']}/{c['seeds']}",
                    str(c["distill_s"] or "-"),
                ]
                if c
                else ["-"] * 5
            )
        lines.append(f"| {e['variant']} | " + " | ".join(cells) + f" | {e['description']} |")
    return "\n".join(lines) + "\n", table


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from satm_jax import datasets as data_lib
    from satm_jax.experiment import pipeline
    from satm_jax.expert_store import ExpertError

    variants = FLAGS.variants or list(VARIANTS)
    try:
        seeds = seed_flags.seeds()
        ipcs = run_lib.parse_ipcs(FLAGS.ipc, FLAGS.dataset)
        data_lib.check_dataset_name(FLAGS.dataset)
        cfgs = build(
            FLAGS.dataset,
            ipcs,
            variants,
            seeds,
            FLAGS.preset,
            run_lib.overrides_from_flags(),
            FLAGS.data_dir,
        )
        results = pipeline.train_and_evaluate(
            cfgs,
            FLAGS.workdir,
            baselines=FLAGS.baselines,
            progress=FLAGS.progress,
            results_name="ablation_results",
        )
    except (configs_lib.ConfigError, data_lib.DatasetError, ExpertError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m experiments.ablate " + " ".join(a for a in argv_global[1:])
    md, table = ablation_table(results, variants, command)
    with open(os.path.join(FLAGS.workdir, "ablation.md"), "w") as f:
        f.write(md)
    jsonio.write_json(
        os.path.join(FLAGS.workdir, "ablation.json"),
        {"command": command, "table": table, "results": results},
    )
    print(md)
    return 0


argv_global: list[str] = []

if __name__ == "__main__":
    argv_global = list(sys.argv)
    app.run(lambda argv: sys.exit(main(argv)))
