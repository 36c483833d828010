"""The experiment layer: presets and run configurations (``configs``), the end-to-end
pipeline (``pipeline``: experts, distillation, baselines, evaluation, outputs) and the
class-incremental protocol (``continual``).

It sits above the library: it imports ``satm_jax``'s modules, and nothing in ``satm_jax``
outside this package imports it (``tests/test_layering.py``). The entry points in
``experiments/`` parse flags and call it.
"""
