"""Reports of what :func:`convert_model` and :func:`to_sgs` did, layer by layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ConvertedLayer:
    """One ``nn.Conv2d`` replaced by a block."""

    name: str
    block: str  # class name of the block
    bn: str  # placement actually used: "branch" | "after" | "none"
    absorbed_bn: str | None  # qualified name of the BatchNorm moved into the block (now nn.Identity)
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    branches: tuple[str, ...]
    note: str = ""
    absorbed_bn_names: tuple[str, ...] = ()  # every name the absorbed BatchNorm had (aliases), absorbed_bn first


@dataclass
class SkippedLayer:
    """One ``nn.Conv2d`` left as it is, and why."""

    name: str
    reason: str


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


@dataclass
class ConversionReport:
    """Returned by ``convert_model(..., return_report=True)`` and attached to the converted
    model as ``model.reparam_report``. ``print(report)`` gives a readable summary."""

    block: str
    bn: str
    preserve: bool
    traced: bool
    trace_error: str | None = None
    converted: list[ConvertedLayer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    max_abs_diff: float | None = None  # max |converted - original| on example_input (eval mode); None without one

    def layer(self, name: str) -> ConvertedLayer | None:
        return next((row for row in self.converted if row.name == name), None)

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[dict]:
        """One flat dict per conv (converted or skipped), e.g. for ``pandas.DataFrame``."""
        out = []
        for row in self.converted:
            out.append({
                "layer": row.name, "status": "converted", "block": row.block, "bn": row.bn,
                "absorbed_bn": row.absorbed_bn or "", "kernel": "x".join(map(str, row.kernel_size)),
                "stride": "x".join(map(str, row.stride)), "groups": row.groups,
                "channels": f"{row.in_channels}->{row.out_channels}", "branches": "+".join(row.branches),
                "reason": row.note,
            })
        keys = list(out[0]) if out else ["layer", "status", "reason"]
        for row in self.skipped:
            out.append({**dict.fromkeys(keys, ""), "layer": row.name, "status": "skipped", "reason": row.reason})
        return out

    def __str__(self) -> str:
        head = (
            f"convert_model(block={self.block!r}, bn={self.bn!r}, preserve={self.preserve}): "
            f"{len(self.converted)} converted, {len(self.skipped)} skipped"
        )
        if not self.traced:
            head += f"\n  model not traceable by torch.fx ({self.trace_error}); no BatchNorm was absorbed"
        conv_rows = [
            [r.name, "x".join(map(str, r.kernel_size)), f"s{r.stride[0]}", f"g{r.groups}", r.bn, r.absorbed_bn or "-", r.note]
            for r in self.converted
        ]
        parts = [head]
        if conv_rows:
            parts.append(_table(["converted", "kernel", "stride", "groups", "bn", "absorbed BN", "note"], conv_rows))
        if self.skipped:
            parts.append(_table(["skipped", "reason"], [[r.name, r.reason] for r in self.skipped]))
        return "\n\n".join(parts)


@dataclass
class SGSLayer:
    """One block turned into its plain SGS counterpart."""

    block_name: str
    weight: str  # name of the trained conv weight in the plain model (the key of masks)
    block: str
    bn: str
    mask: list[list[float]]
    exact: bool
    reasons: list[str] = field(default_factory=list)
    has_constant: bool = False
    frozen: bool = False  # the conv weight does not train: no mask (nothing for SGS to scale)


@dataclass
class SGSReport:
    """``to_sgs(model).report``: every converted block, its mask, and whether SGS with that
    mask reproduces training the block exactly (``exact``) or only approximately (with why)."""

    layers: list[SGSLayer] = field(default_factory=list)

    @property
    def approximate(self) -> list[SGSLayer]:
        return [layer for layer in self.layers if not layer.exact and not layer.frozen]

    @property
    def frozen(self) -> list[SGSLayer]:
        return [layer for layer in self.layers if layer.frozen]

    @property
    def weights(self) -> dict[str, str]:
        """Block name in the converted model -> weight name in the plain model."""
        return {layer.block_name: layer.weight for layer in self.layers}

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            [l.weight, l.block, l.bn, "frozen" if l.frozen else ("exact" if l.exact else "APPROXIMATE"),
             "no mask: the weight does not train" if l.frozen else "; ".join(l.reasons)] for l in self.layers
        ]
        head = f"to_sgs: {len(self.layers)} layers, {len(self.approximate)} approximate"
        return head + ("\n\n" + _table(["weight", "block", "bn", "sgs", "why"], rows) if rows else "")
