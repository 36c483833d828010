"""Out-of-domain evaluation: networks trained on a (condensed) set, tested on corrupted data.

An evaluation trains fresh networks on a set (``satm_jax.evaluate``); with an :class:`OodConfig`
the same trained networks are also tested on corrupted copies of the test split, one per
corruption and severity. Two sources of corrupted data:

* ``synthetic``: :mod:`satm_jax.corruptions` applied to a fixed random subset of the test split
  (any dataset). The corruptions follow the MNIST-C / CIFAR-10-C families but their severity
  parameters are this project's choice, so the numbers are not those of the published
  benchmarks.
* ``official``: the published files, found under the run's ``data_dir``: ``CIFAR-10-C`` for
  cifar10, ``CIFAR-100-C`` for cifar100 (one ``<corruption>.npy`` with the five severities in
  blocks, and ``labels.npy``), ``mnist_c`` for mnist (``<corruption>/test_images.npy``; MNIST-C
  has one severity, reported as severity 1).

``source="auto"`` takes the official files when their folder exists and the synthetic ones
otherwise. Only ``samples`` test images per corruption and severity are used (the same indices
for every corruption, so corruptions are compared on the same images): testing the networks
on every corruption at every severity on the whole test split would cost more than training
them at IPC 1. This subset is our choice; ``samples=0`` uses the whole split.

Every corrupted set is stored as uint8 pixels (as the official files are) and goes through the
run's preprocessing before the networks see it.

The summary of one evaluated set (``results.json``'s ``"ood"`` object of a row) is::

    {"source": "synthetic", "samples": 1000, "severities": [1, 2, 3, 4, 5],
     "acc": {"fog": {"1": 81.2, ...}, ...},        # mean over networks, percent
     "std": {"fog": {"1": 0.7, ...}, ...},         # std over networks, percent
     "corruption_acc": {"fog": 74.9, ...},         # mean over severities
     "mean_corruption_acc": 70.3,                  # mean over corruptions and severities
     "mean_corruption_acc_std": 0.6,               # its std over networks (each network's mean)
     "worst": {"corruption": "zigzag", "acc": 41.0}}

Example:
  >>> import numpy as np
  >>> from satm_jax import ood
  >>> cfg = ood.parse_eval_ood("gaussian_noise,rotate", dataset="digits", samples=50)
  >>> cfg.corruptions, cfg.source
  (('gaussian_noise', 'rotate'), 'synthetic')
  >>> accs = {("gaussian_noise", s): np.array([0.9, 0.8]) for s in cfg.severities}
  >>> accs.update({("rotate", s): np.array([0.5, 0.7]) for s in cfg.severities})
  >>> s = ood.summarise(accs, cfg)
  >>> s["mean_corruption_acc"], s["worst"]
  (72.5, {'corruption': 'rotate', 'acc': 60.0})
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from satm_jax import corruptions as corruptions_lib
from satm_jax import parallel

SOURCES = ("auto", "synthetic", "official")
DEFAULT_SAMPLES = 1000
"""Test images per corruption and severity (our choice; 0 = the whole test split)."""

OFFICIAL_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C", "mnist": "mnist_c"}
"""The official corrupted benchmark of a dataset, as a folder under ``data_dir``."""


class OodError(ValueError):
    """A bad out-of-domain request: unknown corruption or source, no official data."""


@dataclasses.dataclass(frozen=True)
class OodConfig:
    """What an out-of-domain evaluation tests on.

    Attributes:
      corruptions: corruption names (keys of ``corruptions.CORRUPTIONS`` for ``synthetic``,
        file or folder names of the official set for ``official``).
      source: ``"synthetic"`` or ``"official"`` (resolved, never ``"auto"``).
      severities: severities tested (MNIST-C: ``(1,)``).
      samples: test images per corruption and severity (0: all).
      seed: key of the subset and of the synthetic corruptions.
      root: the official set's folder (``official`` only).
    """

    corruptions: tuple[str, ...]
    source: str = "synthetic"
    severities: tuple[int, ...] = corruptions_lib.SEVERITIES
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    root: str | None = None

    def identity(self) -> dict[str, Any]:
        """What a cached result must match (JSON-able)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}


def _official_names(root: Path, dataset: str) -> list[str]:
    if dataset == "mnist":
        return sorted(p.name for p in root.iterdir() if (p / "test_images.npy").is_file())
    return sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")


def parse_eval_ood(
    spec: str | None,
    *,
    dataset: str,
    data_dir: str | None = None,
    source: str = "auto",
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> OodConfig | None:
    """The :class:`OodConfig` for a ``--eval_ood`` value (``None`` when ``spec`` is empty).

    Args:
      spec: ``"all"`` or comma-separated corruption names; ``""``/``None``: no OOD evaluation.
      dataset: the dataset's registry name (selects the official set).
      data_dir: where the official set's folder is looked for.
      source: ``"auto"``, ``"synthetic"`` or ``"official"``.
      samples: test images per corruption and severity (0: all).
      seed: subset and corruption key.

    Raises:
      OodError: unknown source or corruption name (the message lists the known ones), negative
        ``samples``, or ``official`` requested where the dataset has no official set or its
        folder is missing.
    """
    if not spec:
        return None
    if source not in SOURCES:
        raise OodError(f"unknown OOD source {source!r}; choose one of {SOURCES}")
    if samples < 0:
        raise OodError(f"the OOD sample count must be >= 0, got {samples}")
    folder = OFFICIAL_FOLDERS.get(dataset)
    root = Path(data_dir).expanduser() / folder if (folder and data_dir) else None
    if source == "official":
        if folder is None:
            raise OodError(
                f"{dataset!r} has no official corrupted benchmark (known: "
                f"{', '.join(f'{k} -> {v}' for k, v in OFFICIAL_FOLDERS.items())}); "
                "use --ood_source=synthetic"
            )
        if root is None or not root.is_dir():
            raise corruptions_lib.CorruptionDataError(
                f"missing folder {root or '<data_dir>/' + folder} for the official {folder}; "
                f"put the extracted {folder} folder under --data_dir, or use "
                "--ood_source=synthetic"
            )
    if source == "auto":
        source = "official" if (root is not None and root.is_dir()) else "synthetic"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if source == "official":
        known = _official_names(root, dataset)
        severities = (1,) if dataset == "mnist" else corruptions_lib.SEVERITIES
    else:
        known = sorted(corruptions_lib.CORRUPTIONS)
        severities = corruptions_lib.SEVERITIES
    if names == ["all"]:
        names = known
    bad = [n for n in names if n not in known]
    if bad or not names:
        where = f"in {root}" if source == "official" else "(synthetic)"
        raise OodError(
            f"unknown corruption(s) {bad or names} {where}; known: {', '.join(known) or 'none'}"
            " (or 'all')"
        )
    return OodConfig(
        corruptions=tuple(dict.fromkeys(names)),
        source=source,
        severities=severities,
        samples=int(samples),
        seed=int(seed),
        root=str(root) if source == "official" else None,
    )


def subset_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """The sorted test indices used: ``samples`` of ``n`` drawn without replacement (all if
    ``samples`` is 0 or at least ``n``)."""
    if samples <= 0 or samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))


def _to_uint8(x: Any) -> np.ndarray:
    return np.round(np.clip(np.asarray(x, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def corrupted_test_sets(
    cfg: OodConfig,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    dataset: str,
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Every ``(corruption, severity)`` test set as uint8 pixels and labels.

    Args:
      cfg: the request.
      test_images: the dataset's uint8 ``(M, H, W, C)`` test split (synthetic source).
      test_labels: its labels.
      dataset: the dataset's name (official source: MNIST-C or CIFAR-C layout).

    Raises:
      corruptions.CorruptionDataError: an official file is missing or malformed, or its images
        do not have the test split's shape.
    """
    out = {}
    if cfg.source == "synthetic":
        idx = subset_indices(len(test_labels), cfg.samples, cfg.seed)
        x = np.asarray(test_images[idx], np.float32) / np.float32(255.0)
        y = np.asarray(test_labels[idx])
        base = jax.random.PRNGKey(cfg.seed)
        for i, name in enumerate(cfg.corruptions):
            key = jax.random.fold_in(base, i)
            for s in cfg.severities:
                out[(name, s)] = (_to_uint8(corruptions_lib.corrupt(name, x, s, key)), y)
        return out
    for name in cfg.corruptions:
        for s in cfg.severities:
            if dataset == "mnist":
                x, y = corruptions_lib.load_mnist_c(cfg.root, name)
            else:
                x, y = corruptions_lib.load_cifar_c(cfg.root, name, s)
            if tuple(x.shape[1:]) != tuple(test_images.shape[1:]):
                raise corruptions_lib.CorruptionDataError(
                    f"{cfg.root}/{name}: images of shape {tuple(x.shape[1:])}, the test split "
                    f"has {tuple(test_images.shape[1:])}"
                )
            idx = subset_indices(len(y), cfg.samples, cfg.seed)
            out[(name, s)] = (_to_uint8(x[idx]), np.asarray(y[idx]))
    return out


def prepared_test_sets(
    cfg: OodConfig,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    dataset: str,
    preprocess: Callable[[np.ndarray], np.ndarray],
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """:func:`corrupted_test_sets` through the run's preprocessing (uint8 -> network input)."""
    sets = corrupted_test_sets(cfg, test_images, test_labels, dataset)
    return {k: (np.asarray(preprocess(x), np.float32), y) for k, (x, y) in sets.items()}


def summarise(accs: Mapping[tuple[str, int], np.ndarray], cfg: OodConfig) -> dict[str, Any]:
    """The ``"ood"`` object of a results row from per-network accuracies (fractions).

    Args:
      accs: ``{(corruption, severity): accuracies of the evaluated networks}``.
      cfg: the request (source, sample count, severities, corruption order).

    Returns:
      The summary documented in the module docstring (percentages, 4 decimals).
    """
    acc: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    cells = []  # per-network accuracies of every (corruption, severity)
    for name in cfg.corruptions:
        acc[name] = {}
        std[name] = {}
        for s in cfg.severities:
            a = 100.0 * np.asarray(accs[(name, s)], np.float64)
            cells.append(a)
            acc[name][str(s)] = round(float(a.mean()), 4)
            std[name][str(s)] = round(float(a.std()), 4)
    per_corruption = {n: round(float(np.mean(list(v.values()))), 4) for n, v in acc.items()}
    worst = min(per_corruption, key=per_corruption.get)
    every = [a for v in acc.values() for a in v.values()]
    # Each network's own mean over every corruption and severity, then the spread of those
    # means: the per-cell stds above cannot give it (the cells share the networks).
    per_net = np.mean(cells, axis=0)
    return {
        "source": cfg.source,
        "samples": cfg.samples,
        "severities": list(cfg.severities),
        "acc": acc,
        "std": std,
        "corruption_acc": per_corruption,
        "mean_corruption_acc": round(float(np.mean(every)), 4),
        "mean_corruption_acc_std": round(float(np.std(per_net)), 4),
        "worst": {"corruption": worst, "acc": per_corruption[worst]},
    }


def _label(row: Mapping[str, Any]) -> str:
    name = row.get("variant", row["method"])
    model = row.get("model", "convnet")
    return f"{name} ipc{row['ipc']}" + ("" if model == "convnet" else f" [{model}]")


def _mean_corr(o: Mapping[str, Any]) -> str:
    std = o.get("mean_corruption_acc_std")  # absent from summaries written before it existed
    return f"{o['mean_corruption_acc']:.2f}" + ("" if std is None else f" +- {std:.2f}")


def format_markdown(rows: list[Mapping[str, Any]]) -> str:
    """A Markdown table of the rows that carry an ``"ood"`` object: clean accuracy, mean
    corruption accuracy, the worst corruption and each corruption's mean over severities."""
    rows = [r for r in rows if r.get("ood")]
    if not rows:
        return ""
    names = list(rows[0]["ood"]["corruption_acc"])
    head = ["set", "clean", "mean corr.", "worst", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o = r["ood"]
        cells = [
            _label(r),
            f"{r['acc_mean']:.2f} +- {r['acc_std']:.2f}",
            _mean_corr(o),
            f"{o['worst']['corruption']} {o['worst']['acc']:.2f}",
            *(f"{o['corruption_acc'].get(n, float('nan')):.2f}" for n in names),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    src = rows[0]["ood"]
    lines.append("")
    lines.append(
        f"test accuracy (%) of the same networks on corrupted test images ({src['source']} "
        f"corruptions, {src['samples'] or 'all'} images per corruption and severity, "
        f"severities {src['severities']}); corruption columns average the severities"
    )
    return "\n".join(lines) + "\n"


@parallel.main_process_only
def write_report(workdir: str, rows: list[Mapping[str, Any]], stem: str = "ood") -> list[str]:
    """Writes ``<stem>.md`` and the heat map ``<stem>.png`` for the rows with an ``"ood"``
    object; returns the paths written (none when no row has one; ``None`` on a process other
    than 0, which writes nothing)."""
    from satm_jax import visualize  # matplotlib only when there is something to draw

    text = format_markdown(rows)
    if not text:
        return []
    md = os.path.join(workdir, f"{stem}.md")
    with open(md, "w") as f:
        f.write(text)
    png = visualize.plot_ood_heatmap(
        os.path.join(workdir, f"{stem}.png"),
        [_label(r) for r in rows if r.get("ood")],
        [r["ood"] for r in rows if r.get("ood")],
    )
    return [md, png]


__all__ = [
    "DEFAULT_SAMPLES",
    "accs_from_json",
    "accs_to_json",
    "OFFICIAL_FOLDERS",
    "SOURCES",
    "OodConfig",
    "OodError",
    "corrupted_test_sets",
    "format_markdown",
    "parse_eval_ood",
    "prepared_test_sets",
    "subset_indices",
    "summarise",
    "write_report",
]


def accs_to_json(extra: Mapping[tuple[str, int], np.ndarray]) -> dict[str, list[float]]:
    """``{(corruption, severity): accs}`` as ``{"corruption/severity": [...]}`` for JSON."""
    return {f"{c}/{s}": [float(a) for a in v] for (c, s), v in extra.items()}


def accs_from_json(d: Mapping[str, list[float]]) -> dict[tuple[str, int], np.ndarray]:
    """The inverse of :func:`accs_to_json`."""
    out = {}
    for k, v in d.items():
        c, s = k.rsplit("/", 1)
        out[(c, int(s))] = np.asarray(v, np.float64)
    return out
