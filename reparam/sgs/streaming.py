"""``masks_from_data``: the SGS paper's data-driven scaling ``G`` for every qualifying conv of a model,
streamed through forward hooks (two passes over the batches, nothing stored per batch).

Pass 1 records each layer's element-wise min / max (exact per-(channel, displacement) histogram
ranges), pass 2 integer joint-histogram counts; under torch.distributed both are all-reduced (MIN /
MAX / SUM), so every rank gets the same ``G``, bit-identical to one process that saw all batches.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam.errors import ConfigError, DependenceWarning
from reparam.sgs.dependence import (
    DEFAULT_K,
    MEASURES,
    CorrelationStatistic,
    HistogramStatistic,
    make_statistic,
    scaling_from_dependence,
)

__all__ = ["collect_statistics", "masks_from_data", "padded_input", "qualifying_convs"]

#: the range pass keeps the layer inputs of at most this many of the last batches (memory constant
#: in the number of batches), and of the earlier of them only while all kept fit in ``keep_bytes``
MAX_KEPT_BATCHES = 2
DEFAULT_KEEP_BYTES = 1 << 30

Statistic = HistogramStatistic | CorrelationStatistic


def qualifying_convs(model: nn.Module) -> dict[str, list[nn.Conv2d]]:
    """The convs the statistic applies to, keyed by their weight's parameter name: every ``nn.Conv2d``
    (subclasses included) with a kernel larger than 1 in both directions, as the official code (1x1,
    1xk and kx1 convs have no 2-D neighbourhood to measure; ``ConvTranspose2d`` is not an
    ``nn.Conv2d`` and its taps scatter rather than gather). A module called twice or two modules
    sharing one weight feed one statistic."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, list[nn.Conv2d]] = {}
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and min(module.kernel_size) > 1 and id(module.weight) in names:
            found.setdefault(names[id(module.weight)], []).append(module)
    return found


def padded_input(conv: nn.Conv2d, x: Tensor, *, exclude_padding: bool = False) -> Tensor:
    """The map the conv's taps read: ``x`` padded exactly as ``conv`` pads it (tuple, 'same' /
    'valid', asymmetric 'same' for even kernels, ``padding_mode``); unpadded with ``exclude_padding``."""
    pad = tuple(conv._reversed_padding_repeated_twice)
    if exclude_padding or not any(pad):
        return x
    if conv.padding_mode == "zeros":
        return F.pad(x, pad)
    return F.pad(x, pad, mode=conv.padding_mode)


def _inputs(batch: object, device: torch.device | None) -> Tensor:
    """The model input of one batch: the batch itself, or the first item of a (inputs, targets) pair."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(inputs, Tensor):
        raise ConfigError(f"each batch must be a Tensor or an (inputs, targets) tuple/list, got {type(batch).__name__}")
    return inputs.to(device, non_blocking=True) if device is not None else inputs


def _fingerprint(inputs: Tensor) -> tuple:
    """Shape and two sums (NaN / inf mapped to numbers so that equal batches compare equal)."""
    x = inputs.double().nan_to_num(nan=0.5, posinf=1.0, neginf=-1.0)
    return tuple(inputs.shape), float(x.sum()), float(x.abs().sum())


def _run(model: nn.Module, batches: Iterable, device: torch.device | None, desc: str, progress: bool,
         fingerprints: list[tuple] | None, before: Callable[[], None] | None = None,
         skip_last: int = 0) -> list[tuple]:
    """One pass of the model over ``batches``; checks pass 2 saw the same batches as pass 1.
    ``before()`` runs before each forward; ``skip_last``: no forward for the last ``skip_last``
    batches (pass 2 counts them from the maps kept in pass 1)."""
    seen = []
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=desc, leave=False)
    for i, batch in enumerate(iterator):
        inputs = _inputs(batch, device)
        seen.append(_fingerprint(inputs))
        if fingerprints is not None and (i >= len(fingerprints) or fingerprints[i] != seen[-1]):
            raise ConfigError(
                f"batch {i} differs between the two passes over `batches` (shuffled or augmented loader?); the "
                "statistic reads the batches twice: pass a list, e.g. list(itertools.islice(loader, n))")
        if skip_last and i >= len(fingerprints) - skip_last:
            continue
        if before is not None:
            before()
        model(inputs)
    if fingerprints is not None and len(seen) != len(fingerprints):
        raise ConfigError(f"`batches` gave {len(fingerprints)} batches, then {len(seen)}; pass a list of batches")
    return seen


def _trim(kept: list[dict[str, list[Tensor]]], keep_bytes: int, reserve: bool = False) -> None:
    """Drop the oldest kept batches until at most :data:`MAX_KEPT_BATCHES` remain and they fit in
    ``keep_bytes``: what stays is the last batches, whose forwards pass 2 then skips. Before a new
    batch (``reserve``) room is made for one more of the newest one's size (all may go); after the
    last, the newest always stays."""
    sizes = [sum(x.numel() * x.element_size() for maps in batch.values() for x in maps) for batch in kept]
    room = keep_bytes - (sizes[-1] if reserve and sizes else 0)
    most = MAX_KEPT_BATCHES - (1 if reserve else 0)
    while len(kept) > (0 if reserve else 1) and (sum(sizes) > room or len(kept) > most):
        kept.pop(0)
        sizes.pop(0)


def _agree(kept: list, group: object | None, device: torch.device | None) -> None:
    """Under torch.distributed every rank keeps as many batches as the rank that kept fewest, so that
    all run the same number of forwards in pass 2 (FSDP's forwards are collectives). The count lives
    on the model's device, as NCCL reduces only CUDA tensors."""
    import torch.distributed as dist

    count = torch.tensor([len(kept)], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=group)
    del kept[: len(kept) - int(count)]


def _distributed_group(process_group: object | None) -> tuple[bool, object | None]:
    import torch.distributed as dist

    if process_group is not None:
        return True, process_group
    return (dist.is_available() and dist.is_initialized()), None


def _sync(stats: dict[str, Statistic], group: object | None, device: torch.device | None, phase: str) -> None:
    """All-reduce every statistic's tensors in one fixed order (sorted names); layers a rank did not
    run get identity elements first, so the collectives match on every rank."""
    import torch.distributed as dist

    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    if phase == "ranges":
        layout = {n: (tuple(s.ranges.lo.shape), str(s.ranges.lo.dtype)) for n, s in stats.items() if s.seen}
        everyone: list[dict] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
        dist.all_gather_object(everyone, layout, group=group)
        for name in sorted(stats):
            shapes = {rank_layout[name] for rank_layout in everyone if name in rank_layout}
            if len(shapes) > 1:
                raise ConfigError(f"layer {name} saw different input shapes on different ranks ({sorted(shapes)}); "
                                  "use one image size on every rank")
            if shapes and not stats[name].seen:
                shape, dtype = shapes.pop()
                stats[name].allocate_like(shape, getattr(torch, dtype.split(".")[-1]), device or torch.device("cpu"))
    for name in sorted(stats):
        s = stats[name]
        if s.ranges.lo is None:
            continue  # no rank ran it
        reductions = s.range_reductions() if phase == "ranges" else s.count_reductions()
        for tensor, op in reductions:
            dist.all_reduce(tensor, op=ops[op], group=group)
        if phase == "ranges":
            s.ranges_reduced()


def _scaling(name: str, statistic: Statistic, k: float, weight: Tensor) -> Tensor:
    """G of one layer, or all ones with a :class:`DependenceWarning` saying why."""
    problems = statistic.problems()
    S = None if problems else statistic.dependence(k)
    if S is not None and not bool(torch.isfinite(S).all()):
        problems = ["every channel is constant for some displacement (dead layer): S has NaN"]
    elif S is not None and bool((S <= 0).any()):
        problems = ["some tap has zero dependence in every channel (it would stop learning)"]
    if problems:
        warnings.warn(f"{name}: {problems[0]}; its G is all ones (plain training for this layer)", DependenceWarning,
                      stacklevel=3)
        return torch.ones(statistic.geometry.kernel_size, dtype=weight.dtype, device=weight.device)
    return scaling_from_dependence(S).to(dtype=weight.dtype, device=weight.device)


def collect_statistics(model: nn.Module, batches: Iterable, *, diagonal_removal: bool = False,
                       exclude_padding: bool = False, measure: str = "nmi", process_group: object | None = None,
                       progress: bool = False, keep_last_batch: bool = True,
                       keep_bytes: int = DEFAULT_KEEP_BYTES) -> dict[str, Statistic]:
    """The streamed per-layer statistics behind :func:`masks_from_data` (same arguments), keyed by
    weight parameter name: counts (``.counts``) and ``.dependence(k)`` for inspection and plots.

    ``keep_last_batch``: keep the layer inputs of the last batches of the range pass — the last one
    always, the one before it (:data:`MAX_KEPT_BATCHES`) while both fit in ``keep_bytes`` — and count
    them without a second forward: ``2n - j`` forwards for ``j`` kept batches instead of ``2n`` (``n``
    for the common 2 batches). Memory: at most two batches of layer inputs, whatever the number of batches."""
    if measure not in MEASURES:
        raise ConfigError(f"unknown measure {measure!r}; supported: {', '.join(MEASURES)}")
    if iter(batches) is batches:
        raise ConfigError("`batches` is a one-shot iterator but is read twice (ranges, then counts): pass a list "
                          "(e.g. list(itertools.islice(loader, n))) or a re-iterable loader without shuffling")
    convs = qualifying_convs(model)
    _check_shared(convs)
    stats = {name: make_statistic(mods[0].kernel_size, dilation=mods[0].dilation, diagonal_removal=diagonal_removal,
                                  measure=measure) for name, mods in convs.items()}
    distributed, group = _distributed_group(process_group)
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    flags = {m: m.training for m in model.modules()}
    phase = {"now": "ranges"}
    kept: list[dict[str, list[Tensor]]] = []  # per kept batch (a suffix of the batches): layer inputs

    def start_batch() -> None:
        _trim(kept, keep_bytes, reserve=True)
        kept.append({})

    def hook_for(name: str, statistic: Statistic):
        def hook(module: nn.Conv2d, args: tuple) -> None:
            x = padded_input(module, args[0], exclude_padding=exclude_padding)
            if phase["now"] == "ranges":
                statistic.observe_ranges(x)
                if keep_last_batch:
                    kept[-1].setdefault(name, []).append(x)
            else:
                statistic.observe(x)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name, stats[name])) for name, mods in convs.items() for m in mods]
    try:
        model.eval()
        with torch.no_grad():
            prints = _run(model, batches, device, "MI statistics: ranges", progress, None, before=start_batch)
            _trim(kept, keep_bytes)
            if distributed:
                _sync(stats, group, device, "ranges")
                _agree(kept, group, device)
            for s in stats.values():
                if s.ranges.lo is not None:
                    s.freeze(s.ranges.lo.device)
            phase["now"] = "counts"
            skip = len(kept) if keep_last_batch else 0
            while kept:
                for name, maps in kept.pop(0).items():
                    for x in maps:
                        stats[name].observe(x)
            _run(model, batches, device, "MI statistics: counts", progress, prints, skip_last=skip)
            if distributed:
                _sync(stats, group, device, "counts")
    finally:
        kept.clear()
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        _reshard(model)
    return stats


def _reshard(model: nn.Module) -> None:
    """Return FSDP2 (``fully_shard``) modules to their sharded parameters: a forward without a
    backward leaves the root's parameters gathered, registered as plain tensors that no
    optimizer holds (``model.get_parameter`` would then name the wrong tensor)."""
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # torch 2.4-2.5
        except ImportError:
            return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def masks_from_data(model: nn.Module, batches: Iterable, *, k: float = DEFAULT_K, diagonal_removal: bool = False,
                    exclude_padding: bool = False, measure: str = "nmi", process_group: object | None = None,
                    progress: bool = False, keep_last_batch: bool = True,
                    keep_bytes: int = DEFAULT_KEEP_BYTES) -> dict[str, Tensor]:
    """``G = S / mean(S)`` (kh, kw) for every qualifying conv (:func:`qualifying_convs`), keyed by
    weight parameter name, in the weight's dtype and device.

    ``batches`` (tensors or (inputs, targets) pairs) is iterated **twice** (ranges, then counts) and
    must give the same batches both times (a list; checked). The model runs in eval mode under
    ``torch.no_grad()``; every module's train/eval flag is restored. Convs that never ran are absent
    (with a :class:`DependenceWarning`); a layer whose map has NaN/inf or is dead gets all ones (with
    a warning). Under torch.distributed (or given ``process_group``) every rank must call this; all
    get the same G, equal to one process on the union of their batches. ``keep_last_batch``,
    ``keep_bytes``: see :func:`collect_statistics` (forwards saved against bounded memory)."""
    stats = collect_statistics(model, batches, diagonal_removal=diagonal_removal, exclude_padding=exclude_padding,
                               measure=measure, process_group=process_group, progress=progress,
                               keep_last_batch=keep_last_batch, keep_bytes=keep_bytes)
    return _results(stats, qualifying_convs(model), k)


def _check_shared(convs: dict[str, list[nn.Conv2d]]) -> None:
    """One geometry per weight; a warning for conv subclasses with their own ``forward`` (e.g. timm's
    ``Conv2dSame`` pads inside it, so the statistic sees the map unpadded)."""
    custom = sorted(name for name, mods in convs.items() if any(type(m).forward is not nn.Conv2d.forward for m in mods))
    if custom:
        warnings.warn(f"conv subclasses with their own forward(): {', '.join(custom)}; their maps are measured as they "
                      "enter forward() (padding done inside forward() is not seen)", DependenceWarning, stacklevel=4)
    for name, mods in convs.items():
        geometries = {(m.kernel_size, m.dilation) for m in mods}
        if len(geometries) > 1:
            raise ConfigError(f"{name} is shared by convs with different kernel/dilation {sorted(geometries)}; "
                              "one weight needs one geometry")


def _results(stats: dict[str, Statistic], convs: dict[str, Sequence[nn.Conv2d]], k: float) -> dict[str, Tensor]:
    never = [name for name, s in stats.items() if s.ranges.lo is None or s.ranges.images == 0]
    if never:
        warnings.warn(f"these convs never ran on the batches and get no G (no scaling): {', '.join(never)}",
                      DependenceWarning, stacklevel=3)
    return {name: _scaling(name, s, k, convs[name][0].weight) for name, s in stats.items() if name not in never}
