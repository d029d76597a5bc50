"""Training-cost benchmarks: plain vs SGS vs multi-branch blocks (``reparam bench``).

Modules: :mod:`benchmarks.variants` builds each training variant,
:mod:`benchmarks.measure` times one full training step and its peak memory,
:mod:`benchmarks.environment` records the machine and flags,
:mod:`benchmarks.report` writes CSV / Markdown / JSON tables and the ratio chart,
:mod:`benchmarks.run` orchestrates rows (one subprocess per row on CPU).
"""
