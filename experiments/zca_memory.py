r"""One-off measurement: peak memory and time of a ZCA fit at Tiny ImageNet size (not a test).

Fits ``satm_jax.zca.fit_zca`` on ``N`` random 64x64x3 float32 images (12,288 dimensions, as
MTT's Tiny ImageNet ZCA) and prints the peak resident set size and the wall time::

    python -m experiments.zca_memory            # N = 20000
    python -m experiments.zca_memory --n=2000 --res=32

``ru_maxrss`` is the peak of the whole process, so it includes the images themselves (printed
separately) and the Python/NumPy baseline.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from satm_jax import zca


def _rss_mib() -> float:
    """Current resident set size in MiB (Linux ``/proc``), or NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="number of images")
    parser.add_argument("--res", type=int, default=64, help="image side (pixels)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    shape = (args.n, args.res, args.res, args.channels)
    d = args.res * args.res * args.channels
    t0 = time.perf_counter()
    images = np.random.default_rng(args.seed).random(shape, dtype=np.float32)
    t_gen = time.perf_counter() - t0
    print(f"images {shape} float32 = {images.nbytes / 2**20:.0f} MiB, D = {d}", flush=True)
    print(f"after generating: rss {_rss_mib():.0f} MiB, peak {_peak_mib():.0f} MiB", flush=True)

    t0 = time.perf_counter()
    w = zca.fit_zca(images)
    t_fit = time.perf_counter() - t0
    print(f"fit_zca: {t_fit:.1f} s, peak rss {_peak_mib():.0f} MiB", flush=True)

    t0 = time.perf_counter()
    out = zca.apply_zca(w, images[:1000])
    t_apply = time.perf_counter() - t0
    assert np.all(np.isfinite(out))
    print(
        f"apply_zca(1000 images): {t_apply:.2f} s; generate {t_gen:.1f} s; "
        f"final peak rss {_peak_mib():.0f} MiB ({_peak_mib() / 1024:.2f} GiB)",
        flush=True,
    )


if __name__ == "__main__":
    main()
