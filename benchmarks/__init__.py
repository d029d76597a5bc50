"""Training-cost benchmarks: plain vs SGS vs multi-branch blocks (``reparam bench``).

Modules: :mod:`benchmarks.row` the typed result row, :mod:`benchmarks.run` plans and runs
rows, :mod:`benchmarks.execute` measures one row (in-process or in a worker subprocess),
:mod:`benchmarks.variants` builds each training variant, :mod:`benchmarks.measure` times one
full training step and its peak memory, :mod:`benchmarks.environment` records the machine and
flags, :mod:`benchmarks.report` writes CSV / Markdown / JSON tables, warnings and the ratio
chart, :mod:`benchmarks.hook_kernels` counts the work of optimizer-step hooks,
:mod:`benchmarks.gpu_evidence` runs the GPU evidence in one command.
"""
