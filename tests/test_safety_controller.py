"""bem.safety.SafetyController in a real training loop: a small transformer with LoRA adapters
trained by Adam, with the controller projecting after every optimizer step — orthogonality to
the safety basis stays <= 1e-5 (and is large without the controller), the spectral budget holds,
training still reduces the loss — plus snapshot/restore and configuration errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bem.attach import BemConfig, attach
from bem.model import BemForCausalLM, TransformerConfig
from bem.modules import LoRA
from bem.safety import (SafetyBasis, SafetyController, SpectralMonitor, adapted_layers,
                        lora_spectral_norm)

CFG = TransformerConfig(vocab_size=41, d_model=24, n_layers=2, n_heads=4, d_ff=40)


def _model(seed=0, experts=1):
    torch.manual_seed(seed)
    model = BemForCausalLM(CFG)
    attach(model, BemConfig.preset("lora", rank=4, alpha=8.0, num_experts=experts))
    return model


def _basis(model, side, s=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    layers = adapted_layers(model)
    width = lambda m: m.lora_A.shape[-1] if side == "input" else m.lora_B.shape[-2]  # noqa: E731
    return SafetyBasis({n: torch.linalg.qr(torch.randn(width(m), s, generator=gen))[0]
                        for n, m in layers.items()}, side)


def _train(model, steps, controller=None, lr=3e-2):
    """Adam on next-token prediction of a fixed random batch; returns the first and last loss."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, CFG.vocab_size, (4, 16), generator=gen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    if controller is not None:
        controller.attach_to(opt)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1]


@pytest.mark.parametrize("side", ["input", "output"])
def test_orthogonality_holds_while_adam_trains(side):
    model = _model()
    ctl = SafetyController(model, basis=_basis(model, side))
    first, last = _train(model, 25, ctl)
    report = ctl.report()
    assert ctl.steps == 25 and set(report["orthogonality"]) == set(adapted_layers(model))
    assert report["max_orthogonality"] <= 1e-5
    assert last < first - 0.1                       # the adapters still learn (3.69 → 3.51)
    assert all(float(m.lora_B.detach().abs().max()) > 0 for m in ctl.layers.values())

    free = _model()                                 # the same training without the controller
    probe = SafetyController(free, basis=_basis(free, side))
    for m in probe.layers.values():                 # undo the projection at construction
        torch.nn.init.kaiming_uniform_(m.lora_A.data[0], a=5 ** 0.5)
    _train(free, 25)
    assert min(probe.orthogonality().values()) > 0.05


def test_spectral_budget_and_routed_experts():
    model = _model(experts=3)
    basis = _basis(model, "input")
    monitor = SpectralMonitor(spectral_budget=0.05)
    ctl = SafetyController(model, basis=basis, monitor=monitor)
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(6):
        opt.zero_grad()
        for m in ctl.layers.values():               # gradients on every expert of every layer
            (m.lora_B * torch.randn(m.lora_B.shape, generator=gen)).sum().backward()
            (m.lora_A * torch.randn(m.lora_A.shape, generator=gen)).sum().backward()
        opt.step()
        ctl.step()
    for name, m in ctl.layers.items():
        norms = lora_spectral_norm(m.lora_A.detach(), m.lora_B.detach(), m.scale)
        assert norms.shape == (3,) and float(norms.max()) <= 0.05 * (1 + 1e-5)
    report = ctl.report()
    assert report["max_orthogonality"] <= 1e-5
    stats = report["spectral"]
    assert stats["calls"] == 6 * len(ctl.layers) and stats["total_projections"] > 0
    assert sorted(stats["layers_affected"]) == sorted(ctl.layers)


def test_snapshot_restore_and_configuration_errors():
    model = _model()
    ctl = SafetyController(model, monitor=SpectralMonitor(1.0))
    saved = ctl.snapshot()
    _train(model, 2)
    name = next(iter(ctl.layers))
    assert not torch.equal(ctl.layers[name].lora_B, saved[name][1])
    ctl.restore(saved)
    assert all(torch.equal(m.lora_A, saved[n][0]) and torch.equal(m.lora_B, saved[n][1])
               for n, m in ctl.layers.items())
    with pytest.raises(ValueError, match="^snapshot:"):
        ctl.restore({})
    with pytest.raises(ValueError, match="^basis, monitor, detector:"):
        SafetyController(model)
    with pytest.raises(TypeError, match="^basis:"):
        SafetyController(model, basis=torch.eye(3))
    with pytest.raises(ValueError, match="^model: no LoRA"):
        SafetyController(torch.nn.Linear(3, 3), monitor=SpectralMonitor())
    with pytest.raises(ValueError, match=r"^basis: layers \['other'\]"):
        SafetyController(model, basis=SafetyBasis({"other": torch.eye(24, 2)}))
    with pytest.raises(ValueError, match="^basis: layer .* expected \\(24, s\\)"):
        SafetyController(model, basis=SafetyBasis({name: torch.eye(10, 2)}))
    with pytest.raises(TypeError, match="^optimizer:"):
        ctl.attach_to(object())
    with pytest.raises(ValueError, match="^detector:"):
        ctl.check([])


def test_an_input_and_an_output_basis_hold_together():
    torch.manual_seed(3)
    net = nn.Sequential(LoRA(nn.Linear(12, 10), rank=3))
    U_in = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))[0]
    U_out = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))[0]
    ctl = SafetyController(net, basis=[SafetyBasis({"0": U_in}, "input"),
                                       SafetyBasis({"0": U_out}, "output")])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ctl.attach_to(opt)
    for _ in range(10):
        opt.zero_grad()
        net(torch.randn(16, 12)).square().mean().backward()
        opt.step()
    ortho = ctl.report()["orthogonality"]
    assert set(ortho) == {"input:0", "output:0"} and max(ortho.values()) <= 1e-5
    m = net[0]
    dW = (m.scale * (m.lora_B[0].double() @ m.lora_A[0].double())).detach()
    assert float((dW @ U_in).norm()) <= 1e-5 * float(dW.norm())
    assert float((U_out.T @ dW).norm()) <= 1e-5 * float(dW.norm())
    assert float(dW.norm()) > 0
    with pytest.raises(ValueError, match="one basis per side"):
        SafetyController(net, basis=[SafetyBasis({"0": U_in}), SafetyBasis({"0": U_in})])
    with pytest.raises(TypeError, match=r"basis\[1\]"):
        SafetyController(net, basis=[SafetyBasis({"0": U_in}), U_out])
    with pytest.raises(TypeError, match="basis"):
        SafetyController(net, basis=U_in)
