"""One benchmark row, typed: what it measures (model, input, variant, settings) and what was
measured. The same object is planned by :mod:`benchmarks.run`, filled by
:mod:`benchmarks.execute` (in this process or in a worker, as JSON), given ratios and
written by :mod:`benchmarks.report`; its fields are the columns of ``results.csv``, in order.
No torch import here: the runner and the CLI stay light until a row runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

STATUSES = ("pending", "ok", "OOM", "timeout", "error", "skipped")


@dataclass
class Row:
    """A row of ``results.csv``. Ratios are over ``plain`` of the same model and input size in
    the same run; ``None`` where a value was not measured (see docs/bench.md, Columns)."""

    model: str
    image_size: int
    batch_size: int
    variant: str
    status: str = "pending"
    median_ms: float | None = None
    iqr_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    min_ms: float | None = None
    images_per_s: float | None = None
    time_ratio: float | None = None
    cpu_median_ms: float | None = None
    cpu_time_ratio: float | None = None
    peak_mem_mb: float | None = None
    mem_ratio: float | None = None
    mem_kind: str | None = None
    params: int | None = None
    params_ratio: float | None = None
    trainable_params: int | None = None
    blocks: int | None = None
    masked_params: int | None = None
    sgs_state_mb: float | None = None
    steps: int = 30
    skipped_steps: int | None = None
    warmup: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    amp: str = "none"  # none, bf16 or fp16 (autocast)
    channels_last: bool = False
    cudnn_benchmark: bool = False
    tf32: str = "default"
    compile: bool = False
    compiled_graphs: int | None = None
    threads: int | None = None
    load_avg_1m: float | None = None  # 1-minute load average when the row finished
    isolated: bool = False
    warning: str | None = None  # why this row's timing may not be trusted (see report.row_warnings)
    error: str | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        """The group a ratio compares within: model, image size, batch size."""
        return self.model, self.image_size, self.batch_size

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, status: str, error: str) -> Row:
        """Mark the row failed (``OOM``, ``timeout``, ``error``, ``skipped``) with a message."""
        self.status, self.error = status, error[:500]
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Row:
        """The row a worker wrote (JSON); unknown keys are an error, not silently dropped."""
        unknown = set(data) - set(COLUMNS)
        if unknown:
            raise ValueError(f"row has unknown fields {sorted(unknown)}")
        return cls(**data)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Row))
