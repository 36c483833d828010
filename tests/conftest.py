"""Test-wide JAX settings and fixtures: strict dtype and rank promotion, 8 simulated CPU
devices, quiet logs, one persistent compilation cache per test run. Helpers that tests import
live in ``tests/helpers.py``.

Float64 checks use ``helpers.x64()`` (a context manager) so the rest runs in float32 as users do.
"""

import logging
import os
import shutil
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")

# XLA compilation is most of the suite's time, and its tests compile the same tiny programs
# again and again (every end-to-end subprocess starts cold). One persistent cache per test run,
# made fresh by the process that loads this file first: xdist's workers and every subprocess
# (``helpers.module_env`` copies ``os.environ``) inherit it, so a run never reads a cache an
# earlier run or another checkout wrote; the process that made it removes it at the end.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="satm_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# Compilation, not execution, is most of the suite's time on its tiny programs: XLA compiles
# them with most optimisations off (measured on the 2-core development CPU, 2026-12-02: the
# full suite 24 min 19 s -> 14 min 00 s, 473 tests). The variable reaches xdist's workers and
# every subprocess; ``test_run.py``'s end-to-end smoke test runs with them on, as users compile.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")

import pytest  # noqa: E402

logging.getLogger("absl").setLevel(logging.WARNING)


def pytest_configure(config):
    # With -n, xdist's default scheduling ("load") becomes "worksteal": a worker that runs out
    # of tests takes half of the other's queue. Set here, not in addopts, so that pytest
    # without xdist still runs.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(config, items):
    """The slow tests first (a stable sort: otherwise in file order), so that the two workers
    start on the long end-to-end runs and the short tests fill the end, instead of one worker
    idling behind a long test scheduled last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def digits():
    from satm_jax import datasets

    return datasets.load_dataset("digits")
