"""Executes ``notebooks/satm_colab.ipynb`` at a tiny size, as CI does.

The notebook runs in a fresh ``python3`` kernel (this interpreter, from a kernelspec written to a
temporary ``JUPYTER_PATH`` so that no system kernel with another Python is picked up) with the
checkout first on ``PYTHONPATH``, so its install cell finds ``satm_jax`` and installs nothing.
"""

import json
import os
import sys

import pytest

from tests.helpers import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = os.path.join(ROOT, "notebooks", "satm_colab.ipynb")


def _read():
    with open(NOTEBOOK) as f:
        return nbformat.read(f, as_version=4)


def _parameters_index(nb):
    hits = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(hits) == 1, "exactly one cell must be tagged 'parameters'"
    return hits[0]


def _python3_kernelspec(tmp_path, monkeypatch):
    """A ``python3`` kernelspec running this interpreter, first on ``JUPYTER_PATH``."""
    jupyter_dir = tmp_path / "jupyter"
    spec_dir = jupyter_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    pythonpath = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (satm-jax test)",
        "language": "python",
        "env": {"PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    from jupyter_client.kernelspec import KernelSpecManager

    found = KernelSpecManager().get_kernel_spec("python3")
    assert found.argv[0] == sys.executable, found.resource_dir


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _texts(nb):
    out = []
    for o in _outputs(nb):
        if o.output_type == "stream":
            out.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            for mime in ("text/plain", "text/markdown", "text/html"):
                if mime in o.get("data", {}):
                    out.append(o.data[mime])
    return out


def test_committed_notebook_is_clean_nbformat4():
    nb = _read()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, "clear the notebook's outputs"
    params = nb.cells[_parameters_index(nb)].source
    for name in ("DATASET", "IPCS", "METHODS", "WORKDIR", "OVERRIDES", "TINY"):
        assert f"\n{name} = " in "\n" + params, name
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'REPO_URL = "https://github.com/' in sources
    assert "jax[cuda12]" in sources and "jax[tpu]" in sources


@pytest.mark.slow
def test_notebook_runs_tiny(tmp_path, monkeypatch):
    _python3_kernelspec(tmp_path, monkeypatch)
    nb = _read()
    workdir = tmp_path / "wd"
    injected = nbformat.v4.new_code_cell(
        f"TINY = True\nWORKDIR = {str(workdir)!r}\nPROGRESS = False",
        metadata={"tags": ["injected-parameters"]},
    )
    nb.cells.insert(_parameters_index(nb) + 1, injected)
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(run_dir)}},
    )
    try:
        client.execute()
    finally:
        with open(tmp_path / "executed.ipynb", "w") as f:
            nbformat.write(nb, f)  # for debugging a failure

    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert not errors, errors
    texts = "\n".join(_texts(nb))
    assert "already importable" in texts  # the install cell installed nothing
    assert "devices:" in texts and "CpuDevice" in texts

    res = json.loads((workdir / "results.json").read_text())
    methods = sorted(r["method"] for r in res["results"])
    assert methods == ["full", "mtt", "random", "satm"], methods
    assert {r["ipc"] for r in res["results"] if r["method"] != "full"} == {1}
    for r in res["results"]:
        assert 0.0 <= r["acc_mean"] <= 100.0 and r["n_eval"] == 2
    for m in ("mtt", "satm"):
        assert (workdir / "runs" / f"digits_ipc1_{m}" / "synthetic.png").stat().st_size > 0
        assert (workdir / "runs" / f"digits_ipc1_{m}" / "curves.png").stat().st_size > 0

    pngs = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    # synthetic.png and curves.png of both runs, and the two matplotlib figures.
    assert len(pngs) >= 6, len(pngs)
    assert "test accuracy (%) on digits" in texts  # format_table
    markdown = [
        o.data["text/markdown"] for o in _outputs(nb) if "text/markdown" in o.get("data", {})
    ]
    assert markdown and "| method | IPC 1 |" in markdown[0]
    for m in ("random", "mtt", "satm"):
        assert f"| {m} |" in markdown[0] or f"| **{m}** |" in markdown[0], m
    assert "full training set" in markdown[0].lower()
    assert not list(run_dir.iterdir()), "the notebook wrote outside WORKDIR"
