"""Reports of what :func:`convert_model` and :func:`to_sgs` did, layer by layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

BN_ORDER = ("branch", "after", "none")


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

    def placements(self) -> dict[str, str]:
        """Converted layer -> the BN placement it really got (``"none"`` where no BN was absorbed)."""
        return {row.name: row.bn for row in self.converted}

    def bn_summary(self) -> str:
        """What happened to ``bn`` in one line, e.g. ``bn='after' on 15 of 17 layers, 'none' on 2``."""
        used = list(self.placements().values())
        if not used or all(b == self.bn for b in used):
            return f"bn={self.bn!r}"
        others = ", ".join(f"{b!r} on {used.count(b)}" for b in BN_ORDER if b != self.bn and b in used)
        return f"bn={self.bn!r} on {used.count(self.bn)} of {len(used)} layers, {others} (no BatchNorm absorbed)"

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
    form: str = "mask"  # how SGS applies: "mask", "per-channel mask (...)", "preconditioner P (...)"


def _sgs_status(layer: SGSLayer) -> str:
    return "frozen" if layer.frozen else ("exact" if layer.exact else "approximate")


def _sgs_why(layer: SGSLayer) -> str:
    if layer.frozen:
        return "no mask: the weight does not train"
    return "; ".join(([] if layer.form == "mask" else [layer.form]) + layer.reasons)


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

    def rows(self) -> list[dict]:
        """One flat dict per layer, e.g. for ``pandas.DataFrame``."""
        return [{"weight": l.weight, "block": l.block, "bn": l.bn, "sgs": _sgs_status(l), "why": _sgs_why(l)}
                for l in self.layers]

    def __str__(self) -> str:
        rows = [
            [l.weight, l.block, l.bn, _sgs_status(l).upper() if _sgs_status(l) == "approximate" else _sgs_status(l),
             _sgs_why(l)] for l in self.layers
        ]
        head = f"to_sgs: {len(self.layers)} layers, {len(self.approximate)} approximate"
        return head + ("\n\n" + _table(["weight", "block", "bn", "sgs", "why"], rows) if rows else "")


@dataclass
class MaskGroup:
    """Layers that share one mask and one SGS status (and reason)."""

    mask: list[list[float]]
    status: str  # "exact" | "approximate" | "frozen" | "" (unknown)
    why: str
    weights: list[str] = field(default_factory=list)


def group_masks(items: list[tuple[str, list[list[float]], str, str]]) -> list[MaskGroup]:
    """Group ``(weight, mask, status, why)`` rows with equal mask, status and reason, in first-seen order."""
    groups: dict[tuple, MaskGroup] = {}
    for weight, mask, status, why in items:
        key = (tuple(tuple(round(v, 9) for v in row) for row in mask), status, why)
        groups.setdefault(key, MaskGroup(mask, status, why)).weights.append(weight)
    return list(groups.values())


def sgs_mask_groups(report: SGSReport) -> list[MaskGroup]:
    return group_masks([(l.weight, l.mask, _sgs_status(l), _sgs_why(l)) for l in report.layers])


def names_line(names: list[str], width: int) -> str:
    """``a, b, c, … +N more`` within ``width`` characters."""
    shown: list[str] = []
    for i, name in enumerate(names):
        rest = len(names) - i - 1
        tail = f", … +{rest} more" if rest else ""
        if len(", ".join([*shown, name]) + tail) > width and shown:
            return ", ".join(shown) + f", … +{len(names) - len(shown)} more"
        shown.append(name)
    return ", ".join(shown)


def _mask_rows(mask: list[list[float]], indent: str) -> list[str]:
    cells = [[f"{v:g}" for v in row] for row in mask]
    width = max((len(c) for row in cells for c in row), default=1)
    return [indent + " ".join(c.rjust(width) for c in row) for row in cells]


def mask_groups_text(report: SGSReport, width: int = 100) -> str:
    """The masks of ``report`` grouped (identical mask, status and reason printed once), each
    line at most ``width`` characters."""
    import textwrap

    groups = sgs_mask_groups(report)
    lines = [f"{len(report.layers)} layers, {len(groups)} distinct mask(s) "
             "(G = sum of the branch masks; exact: SGS with G trains like the block)"]
    for index, group in enumerate(groups, 1):
        head = f"[{index}] {group.status}, {len(group.weights)} layer(s): "
        lines.append(head + names_line(group.weights, width - len(head)))
        if group.status != "frozen":
            lines += _mask_rows(group.mask, "      ")
        if group.why:
            lines += textwrap.wrap(group.why, width, initial_indent="    why: ", subsequent_indent="         ")
    return "\n".join(lines)
