"""A real multi-process run on this machine: ``jax.distributed.initialize`` on localhost, two
processes of two CPU devices each, experts sharded over each process's devices and data
parallel inner steps. One set of outputs, identical synthetic sets on every process."""

import contextlib
import glob
import json
import os
import socket
import sys

import numpy as np

from tests.helpers import ROOT, TINY, read_json, run, slow

PROCESSES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@slow
def test_two_processes_write_one_set_of_outputs_and_agree_on_the_synthetic_sets(tmp_path):
    wd, dump = tmp_path / "wd", tmp_path / "dump"
    dump.mkdir()
    port = _free_port()
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tests", "multihost_driver.py"),
        "--dataset=digits",
        "--ipc=1",
        *TINY,
        "--expert_parallel=2",
        "--data_parallel",
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={PROCESSES}",
        f"--workdir={wd}",
    ]
    env = {"JAX_NUM_CPU_DEVICES": "2", "SATM_MULTIHOST_DUMP": str(dump)}
    logs = [tmp_path / f"p{i}.log" for i in range(PROCESSES)]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p, "w")) for p in logs]
        procs = [
            run(cmd + [f"--process_id={i}"], background=True, env=env, log=f)
            for i, f in enumerate(files)
        ]
        codes = [p.wait(timeout=900) for p in procs]
    logs = [p.read_text()[-3000:] for p in logs]
    assert codes == [0] * PROCESSES, logs

    # Every process computed the same synthetic sets, and they are the ones written.
    out = read_json(wd / "results.json")
    runs = sorted(out["config"]["runs"])
    assert runs == ["digits_ipc1_mtt", "digits_ipc1_satm"]
    for name in runs:
        sets = [np.load(dump / f"process{i}_{name}.npy") for i in range(PROCESSES)]
        for s in sets[1:]:
            np.testing.assert_array_equal(s, sets[0])
        written = np.load(wd / "runs" / name / "distilled.npz")["images"]
        np.testing.assert_array_equal(written, sets[0])

    # One set of outputs: nothing half-written, no row or metrics line twice.
    assert not glob.glob(str(wd / "**" / "*.tmp*"), recursive=True)
    methods = [(r["method"], r["ipc"]) for r in out["results"]]
    assert len(methods) == len(set(methods)) == 4, methods  # random, mtt, satm, full
    assert out["config"]["processes"] == PROCESSES
    iterations = int(next(a for a in TINY if a.startswith("--iterations=")).split("=")[1])
    every = int(next(a for a in TINY if a.startswith("--checkpoint_every=")).split("=")[1])
    for name in runs:
        rundir = wd / "runs" / name
        with open(rundir / "metrics.jsonl") as f:
            its = [json.loads(line)["iteration"] for line in f if '"loss"' in line]
        assert its == list(range(1, iterations + 1)), its  # each iteration once
        steps = sorted(int(p.name) for p in (rundir / "checkpoints").iterdir() if p.name.isdigit())
        assert steps == list(range(every, iterations + 1, every)), steps  # orbax, all processes
