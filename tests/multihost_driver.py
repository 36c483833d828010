"""One process of the multi-process test (``tests/test_multihost.py``).

Runs ``experiments.run``'s ``main`` with this command line, and additionally saves the final
synthetic images *this* process computed to ``$SATM_MULTIHOST_DUMP/process<i>_<run>.npy`` (the
library writes ``distilled.npz`` on process 0 only, so the other processes' sets are not
visible otherwise). Nothing else is changed.
"""

import os
import sys

import jax
import numpy as np
from absl import app

from experiments import run
from satm_jax import outputs


def _capturing(export):
    def capture(path, cfg, data, state, images):
        name = f"process{jax.process_index()}_{cfg.name}.npy"
        np.save(os.path.join(os.environ["SATM_MULTIHOST_DUMP"], name), np.asarray(images))
        return export(path, cfg, data, state, images)

    return capture


if __name__ == "__main__":
    outputs.export_distilled = _capturing(outputs.export_distilled)
    app.run(lambda argv: sys.exit(run.main(argv)))
