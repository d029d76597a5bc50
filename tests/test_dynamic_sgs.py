"""DynamicSGS: the schedule, G applied in place, state across a resume, the clipping order."""
import pytest
import torch
from torch import nn

import reparam.sgs.streaming as streaming
from reparam import ConfigError, DynamicSGS, attach_sgs
from reparam.sgs import PUBLISHED_SCHEDULES


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).double()


GEN = torch.Generator().manual_seed(1)
DATA = [(torch.randn(6, 3, 8, 8, generator=GEN, dtype=torch.float64), torch.randint(3, (6,), generator=GEN)) for _ in range(3)]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def train(model, opt, dyn, epochs, clip=None):
    for epoch in epochs:
        if dyn is not None:
            dyn.epoch_start(epoch)
        for x, y in DATA:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if clip is not None:
                clip()
            opt.step()


def weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_schedule_follows_the_official_rule_and_refreshes_once_per_epoch(monkeypatch):
    calls = []
    real = streaming.masks_from_data
    monkeypatch.setattr(streaming, "masks_from_data", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_cnn()
    dyn = DynamicSGS(model, sgd(model), DATA, warmup=1, every=5, num_batches=2)
    assert [e for e in range(16) if dyn.is_due(e)] == [1, 5, 10, 15]
    assert not dyn.epoch_start(0) and dyn.masks == {} and dyn.handle is None
    assert dyn.epoch_start(1) and not dyn.epoch_start(1) and len(calls) == 1
    assert set(dyn.masks) == {"0.weight", "2.weight"}  # the 1x1 conv does not qualify
    assert [e for e in range(8) if DynamicSGS(model, sgd(model), DATA, warmup=3, every=None).is_due(e)] == [3]
    assert PUBLISHED_SCHEDULES["cifar10"]["every"] == 30 and PUBLISHED_SCHEDULES["imagenet"]["diagonal_removal"]


def test_g_is_one_before_warmup_then_the_data_driven_g_in_place():
    plain, model = tiny_cnn(), tiny_cnn()
    opt_p, opt = sgd(plain), sgd(model)
    dyn = DynamicSGS(model, opt, DATA, warmup=1, every=2, num_batches=2)
    train(plain, opt_p, None, range(1))
    train(model, opt, dyn, range(1))
    assert torch.equal(weights(plain), weights(model))  # epoch 0: G = 1, bit for bit
    train(model, opt, dyn, range(1, 2))
    handle = dyn.handle
    masks_1 = dyn.masks
    # reference: the same G attached by hand
    ref_opt = sgd(plain)
    ref_opt.load_state_dict(opt_p.state_dict())
    expected = streaming.masks_from_data(plain, [x for x, _ in DATA[:2]])
    assert all(torch.equal(expected[n], masks_1[n]) for n in expected)
    with attach_sgs(ref_opt, expected, mode="grad", model=plain):
        train(plain, ref_opt, None, range(1, 2))
    assert torch.equal(weights(plain), weights(model))
    train(model, opt, dyn, range(2, 3))  # refresh at epoch 2: new G, same handle
    assert dyn.last_refresh == 2 and dyn.handle is handle
    assert any(not torch.equal(masks_1[n], g) for n, g in dyn.masks.items())


def test_g_differs_from_one_so_the_comparison_above_can_fail():
    model = tiny_cnn()
    dyn = DynamicSGS(model, sgd(model), DATA)
    dyn.refresh()
    assert all((g - 1).abs().max() > 1e-3 for g in dyn.masks.values())


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_resumed_run_keeps_g_and_matches_the_uninterrupted_run(mode):
    make_opt = sgd if mode == "grad" else (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))

    def fresh(seed=0):
        model = tiny_cnn(seed)
        opt = make_opt(model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return model, opt, sched, DynamicSGS(model, opt, DATA, warmup=1, every=2, num_batches=2, mode=mode)

    def run(parts, epochs):
        model, opt, sched, dyn = parts
        for epoch in epochs:
            train(model, opt, dyn, [epoch])
            sched.step()

    straight = fresh()
    run(straight, range(5))
    first = fresh()
    run(first, range(3))  # refreshed at 1 and 2; epoch 3 must keep epoch 2's G
    checkpoint = {"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict(),
                  "dyn": first[3].state_dict()}
    for load_dyn, same in ((True, True), (False, False)):  # without its state: G = 1 until epoch 4 (official)
        resumed = fresh(seed=7)
        resumed[0].load_state_dict(checkpoint["model"])
        resumed[1].load_state_dict(checkpoint["opt"])
        resumed[2].load_state_dict(checkpoint["sched"])
        if load_dyn:
            resumed[3].load_state_dict(checkpoint["dyn"])
            assert resumed[3].last_refresh == 2 and resumed[3].handle.mode == mode
        run(resumed, range(3, 5))
        assert torch.equal(weights(resumed[0]), weights(straight[0])) is same


def test_clip_before_is_the_official_order_and_after_bounds_the_scaled_gradient():
    results = {}
    for order in ("before", "after"):
        model = tiny_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        dyn = DynamicSGS(model, opt, DATA, clip_order=order)
        dyn.refresh()
        before = weights(model)
        norms = []
        train(model, opt, None, range(1), clip=lambda d=dyn: norms.append(d.clip_grad_norm_(0.05)))
        results[order] = (dyn, before, weights(model), norms)
    # reference for "before": torch's clip on the raw gradient, then G (the official order)
    dyn = results["before"][0]
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with attach_sgs(opt, dyn.masks, mode="grad", model=model):
        train(model, opt, None, range(1), clip=lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
    assert torch.equal(weights(model), results["before"][2])
    # "after": with lr = 1 and no momentum the first step is -G ⊙ (c g): its norm is the bound
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dyn = DynamicSGS(model, opt, DATA, clip_order="after")
    dyn.refresh()
    start = weights(model)
    x, y = DATA[0]
    nn.functional.cross_entropy(model(x), y).backward()
    norm = dyn.clip_grad_norm_(0.05)
    opt.step()
    assert norm > 0.05  # the clip was active
    assert (weights(model) - start).norm().item() == pytest.approx(0.05, rel=1e-4)  # torch adds 1e-6 to the norm
    assert not torch.equal(results["before"][2], results["after"][2])  # the order matters


def test_wrappers_are_looked_through_for_names():
    model = tiny_cnn()
    compiled = nn.Module()  # what torch.compile returns: a module holding the original as _orig_mod
    compiled._orig_mod = model
    assert DynamicSGS(compiled, sgd(model), DATA).model is model
    dyn = DynamicSGS(nn.DataParallel(model), sgd(model), DATA, measure="autocorrelation")
    dyn.refresh()
    assert set(dyn.masks) == {"0.weight", "2.weight"}
    dyn.remove()
    dyn.remove()
    assert dyn.handle is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="auto"), "mode='auto'"),
    (dict(mode="update", clip_order="after"), "only in mode='grad'"),
    (dict(every=0), "every=0"),
    (dict(num_batches=0), "num_batches=0"),
    (dict(k=0.5), "k=0.5"),
    (dict(measure="mi"), "measure='mi'"),
    (dict(measure="autocorrelation", diagonal_removal=True), "diagonal_removal applies"),
])
def test_bad_settings_are_named(kwargs, message):
    model = tiny_cnn()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        DynamicSGS(model, sgd(model), DATA, **kwargs)


def test_empty_loader_and_non_tensor_batches_are_clear_errors():
    model = tiny_cnn()
    with pytest.raises(ConfigError, match="no batch"):
        DynamicSGS(model, sgd(model), []).refresh()
    with pytest.raises(ConfigError, match="yielded a str"):
        DynamicSGS(model, sgd(model), ["x"]).refresh()


def test_load_state_dict_checks_keys_and_reports_changed_settings():
    model = tiny_cnn()
    dyn = DynamicSGS(model, sgd(model), DATA, every=5)
    dyn.refresh(1)
    state = dyn.state_dict()
    other = DynamicSGS(model, sgd(model), DATA, every=3)
    with pytest.warns(UserWarning, match="every=5->3"):
        other.load_state_dict(state)
    assert other.last_refresh == 1 and all(torch.equal(other.masks[n], g) for n, g in state["masks"].items())
    with pytest.raises(ConfigError, match="no \\['last_refresh'\\]"):
        other.load_state_dict({"masks": {}, "settings": {}})
