"""What a run leaves behind: metrics (JSONL and TensorBoard), images, plots, tables, exports.

In a multi-process run only process 0 writes (``satm_jax.parallel.is_main_process``): every
writer here is a no-op elsewhere, so the processes never race on the same files. Readers read
on every process.

JSON files are ``satm_jax.jsonio``'s.

Example:
  >>> import tempfile
  >>> from satm_jax import outputs
  >>> d = tempfile.mkdtemp()
  >>> w = outputs.MetricsWriter(d, tensorboard=False); w.iteration(1, {"loss": 0.5}); w.close()
  >>> outputs.read_metrics(d)
  [{'iteration': 1, 'loss': 0.5}]
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from satm_jax import parallel, visualize
from satm_jax.jsonio import _default, read_json
from satm_jax.parallel import main_process_only

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class MetricsWriter:
    """Per-iteration metrics to ``metrics.jsonl`` and TensorBoard event files in ``rundir``.

    On resume (``start_iteration > 0``) lines past ``start_iteration`` (written after the last
    checkpoint by a run that was then killed) are dropped, so the file matches the state.
    """

    def __init__(self, rundir: str, start_iteration: int = 0, tensorboard: bool = True):
        self.path = os.path.join(rundir, "metrics.jsonl")
        self._f = None
        self._tb = None
        if not parallel.is_main_process():
            return  # only process 0 writes
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if rec.get("iteration", 0) <= start_iteration:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        self._f = open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(
                    os.path.join(rundir, "tensorboard"),
                    purge_step=start_iteration + 1 if start_iteration else None,
                )
            except ImportError:  # pragma: no cover - optional
                self._tb = None

    def iteration(self, it: int, metrics: dict[str, float]) -> None:
        if self._f is None:
            return
        rec = {"iteration": int(it), **{k: float(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()  # a killed run keeps every line up to its last checkpoint
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"distill/{k}", float(v), int(it))

    def scalar(self, it: int, name: str, value: float) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({"iteration": int(it), name: float(value)}) + "\n")
        self._f.flush()
        if self._tb is not None:
            self._tb.add_scalar(name, float(value), int(it))
            self._tb.flush()

    def close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(rundir: str) -> list[dict[str, float]]:
    path = os.path.join(rundir, "metrics.jsonl")
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


# --------------------------------------------------------------------------------------------
# Images, plots, exports
# --------------------------------------------------------------------------------------------


@main_process_only
def save_synthetic_grid(
    rundir: str, cfg: Any, data: Any, images: Any, labels: Any, iteration: int
) -> str:
    """PNG grid of the synthetic set (preprocessing undone) as ``synthetic_<it>.png`` and
    ``synthetic.png`` (the latest)."""
    pixels = data.preprocessor.inverse(np.asarray(images))
    title = f"{cfg.name} iteration {iteration}"
    path = os.path.join(rundir, f"synthetic_{iteration:06d}.png")
    visualize.save_image_grid(path, pixels, np.asarray(labels), data.num_classes, title=title)
    visualize.save_image_grid(
        os.path.join(rundir, "synthetic.png"),
        pixels,
        np.asarray(labels),
        data.num_classes,
        title=title,
    )
    return path


# metrics.jsonl key -> its label in curves.png's norm panel
_NORMS = (
    ("grad_norm", "||h||"),
    ("eps_norm", "||eps||"),
    ("img_norm", "||X||"),
    ("update_norm", "||dX||"),
)


@main_process_only
def plot_run(rundir: str, cfg: Any) -> str | None:
    """``curves.png``: matching loss (raw and smoothed) with evaluation accuracy, the step
    size, the relative image update per iteration and, for a sharpness-aware run, the
    sharpness ``L(X + eps) - L(X)`` and the norms of ``h``, ``eps``, ``X`` and the update."""
    recs = [r for r in read_metrics(rundir) if "loss" in r]
    if not recs:
        return None
    nan = float("nan")
    evals = read_json(os.path.join(rundir, "evals.json")) or {}
    e_its = sorted(int(k) for k in evals)
    return visualize.plot_history(
        os.path.join(rundir, "curves.png"),
        [r["iteration"] for r in recs],
        [r["loss"] for r in recs],
        e_its,
        [evals[str(k)]["acc_mean"] for k in e_its],
        title=cfg.name,
        syn_lrs=[r.get("syn_lr", nan) for r in recs],
        image_updates=[r.get("img_update_rel", nan) for r in recs],
        sharpness=[r.get("sharpness", nan) for r in recs] if "sharpness" in recs[-1] else None,
        norms={label: [r.get(key, nan) for r in recs] for key, label in _NORMS if key in recs[-1]},
    )


@main_process_only
def export_distilled(path: str, cfg: Any, data: Any, state: Any, images: Any) -> str:
    """``distilled.npz``: images (network space and [0,1] pixels), labels, step size, config."""
    labels = np.asarray(state.labels)
    np.savez_compressed(
        path + ".tmp.npz",
        images=np.asarray(images, np.float32),
        pixels=data.preprocessor.inverse(np.asarray(images)).astype(np.float32),
        labels=labels,
        soft_labels=np.asarray(bool(cfg.distill.soft_labels)),
        syn_lr=np.asarray(float(state.syn_lr), np.float32),
        iteration=np.asarray(int(state.iteration)),
        num_classes=np.asarray(int(data.num_classes)),
        class_names=np.asarray(list(data.dataset.class_names)),
        config=np.asarray(json.dumps(cfg.to_dict(), default=_default)),
    )
    os.replace(path + ".tmp.npz", path)
    return path


def load_distilled(path: str) -> dict[str, Any]:
    """Reads a ``distilled.npz``: ``images``, ``pixels``, ``labels``, ``syn_lr``, ``config``...

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a distilled-set export.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no distilled set at {path}")
    try:
        # Our own handle: np.load leaves the one it opens unclosed on a file that is no zip.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path} is not a readable distilled-set export: {e}") from e
    missing = [k for k in ("images", "labels", "syn_lr", "config") if k not in out]
    if missing:
        raise ValueError(f"{path} lacks {missing}; not a satm-jax distilled-set export")
    out["config"] = json.loads(str(out["config"]))
    out["syn_lr"] = float(out["syn_lr"])
    out["soft_labels"] = bool(out.get("soft_labels", False))
    if "class_names" in out:
        out["class_names"] = [str(c) for c in out["class_names"]]
    if "num_classes" in out:
        out["num_classes"] = int(out["num_classes"])
    return out


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

_ORDER = {"random": 0, "mtt": 1, "satm": 2, "full": 3}


class ResultsTable(NamedTuple):
    """The results as a table: ``header`` and ``rows`` are lists of cell strings."""

    title: str
    header: list[str]
    rows: list[list[str]]
    footer: list[str]


def results_table(results: dict[str, Any]) -> ResultsTable:
    """One row per method (or ablation variant), one column per IPC (and evaluation model)."""
    rows = results["results"]
    cfg = results.get("config", {})
    cols = sorted({(r["ipc"], r.get("model", "convnet")) for r in rows if r["method"] != "full"})
    key = lambda r: r.get("variant") or r["method"]  # noqa: E731
    methods = sorted({key(r) for r in rows}, key=lambda m: (_ORDER.get(m, 9), m))
    header = ["method"] + [f"IPC {i}" + ("" if m == "convnet" else f" ({m})") for i, m in cols]
    lines = []
    for m in methods:
        if m == "full":
            continue
        cells = [m]
        for i, mod in cols:
            match = [
                r
                for r in rows
                if key(r) == m and r["ipc"] == i and r.get("model", "convnet") == mod
            ]
            cells.append(
                f"{match[0]['acc_mean']:.2f} +- {match[0]['acc_std']:.2f}" if match else "-"
            )
        lines.append(cells)
    title = f"test accuracy (%) on {cfg.get('dataset', '?')}, preset {cfg.get('preset', '?')}"
    if cfg.get("reduced"):
        title += " (REDUCED protocol, not the published one)"
    footer = [
        f"full training set ({r.get('n_train', '?')} images, {r.get('epochs', '?')} epochs): "
        f"{r['acc_mean']:.2f} +- {r['acc_std']:.2f}"
        for r in rows
        if r["method"] == "full"
    ]
    n_eval = sorted({r["n_eval"] for r in rows})
    footer.append(
        f"mean +- std over {','.join(map(str, n_eval))} evaluation networks; "
        f"wall {results.get('wall_s', 0):.0f}s"
    )
    return ResultsTable(title, header, lines, footer)


def format_table(results: dict[str, Any]) -> str:
    """``results_table`` as aligned plain text."""
    t = results_table(results)
    widths = [max(len(x[j]) for x in [t.header] + t.rows) for j in range(len(t.header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([t.title, fmt(t.header)] + [fmt(c) for c in t.rows] + t.footer)


def format_markdown(results: dict[str, Any]) -> str:
    """``results_table`` as a Markdown table (for notebooks and docs)."""
    t = results_table(results)
    out = [f"**{t.title}**", "", "| " + " | ".join(t.header) + " |"]
    out.append("|" + "---|" * len(t.header))
    out += ["| " + " | ".join(r) + " |" for r in t.rows]
    out += [""] + [f"{f}  " for f in t.footer]
    return "\n".join(out)


@main_process_only
def write_results_table(path: str, results: dict[str, Any]) -> str:
    """``results.md``: the Markdown table of ``format_markdown``."""
    with open(path + ".tmp", "w") as f:
        f.write(format_markdown(results) + "\n")
    os.replace(path + ".tmp", path)
    return path
