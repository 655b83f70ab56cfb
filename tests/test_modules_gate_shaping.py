"""V2 gate shaping: batched margin/entropy equal a per-query loop, temperatures positive and 1 at
init with gradients, the margin-alignment loss, absent passages, bad inputs."""
import pytest
import torch

from bem.modules import GateShaping
from helpers import assert_grads_match_finite_differences

D, G = 12, 4


def _inputs(gen, B=3, P=5, Lq=6, Lp=7):
    q = torch.randn(B, Lq, D, generator=gen, dtype=torch.float64)
    p = torch.randn(B, P, Lp, D, generator=gen, dtype=torch.float64)
    qm = torch.rand(B, Lq, generator=gen) > 0.2
    qm[:, 0] = True
    pm = torch.rand(B, P, Lp, generator=gen) > 0.3
    pm[:, :, 0] = True
    pm[1, 3:] = False                      # query 1 has only 3 passages
    return q, qm, p, pm


def test_features_match_loop_and_init():
    gen = torch.Generator().manual_seed(0)
    m = GateShaping(D, G).double()
    q, qm, p, pm = _inputs(gen)
    out = m(q, qm, p, pm)
    torch.testing.assert_close(out.temperature, torch.ones(3, G, dtype=torch.float64))
    for b in range(3):
        present = pm[b].any(-1)
        s = out.scores[b][present]
        assert torch.isinf(out.scores[b][~present]).all()
        torch.testing.assert_close(out.margin[b], s.max() - s.median())
        pr = s.softmax(-1)
        torch.testing.assert_close(out.entropy[b], -(pr * pr.log()).sum())
        single = m(q[b:b + 1], qm[b:b + 1], p[b:b + 1, present], pm[b:b + 1, present])
        torch.testing.assert_close(single.scores[0], s)
    torch.testing.assert_close(out.loss, ((out.expected_margin - out.margin) ** 2).mean())


def test_temperature_positive_with_gradient():
    gen = torch.Generator().manual_seed(1)
    m = GateShaping(D, G, floor=0.2).double()
    with torch.no_grad():
        m.temperature.weight.normal_(0, 50.0, generator=gen)
        m.temperature.bias.fill_(-100.0)
    q, qm, p, pm = _inputs(gen)
    out = m(q, qm, p, pm)
    assert bool((out.temperature >= 0.2).all())
    (out.temperature.sum() + out.loss).backward()
    for name, prm in m.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name

    def loss():
        o = m(q, qm, p, pm)
        return o.temperature.sum() + o.loss
    assert_grads_match_finite_differences(loss, {
        "temperature.bias": m.temperature.bias,
        "cross_encoder.mlp.0.weight": m.cross_encoder.mlp[0].weight})


def test_bad_inputs():
    gen = torch.Generator().manual_seed(2)
    m = GateShaping(D, G).double()
    q, qm, p, pm = _inputs(gen)
    with pytest.raises(ValueError, match="query"):
        m(q[..., :5], qm, p, pm)
    with pytest.raises(ValueError, match="passages"):
        m(q, qm, p[:2], pm[:2])
    with pytest.raises(ValueError, match="passage_mask"):
        m(q, qm, p, pm.float())
    with pytest.raises(ValueError, match="query_mask"):
        m(q, qm[:, :2], p, pm)
    pm2 = pm.clone()
    pm2[0] = False
    with pytest.raises(ValueError, match="at least one"):
        m(q, qm, p, pm2)
    with pytest.raises(ValueError, match="floor"):
        GateShaping(D, G, floor=1.0)


def test_evidence_inputs_from_token_ids():
    from bem.modules import evidence_inputs

    emb = torch.randn(30, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q, qm, p, pm = evidence_inputs(emb, [[1, 2, 3], [4]], [[[5, 6], [7]], [[8, 9, 10]]])
    assert q.shape == (2, 3, D) and p.shape == (2, 2, 3, D)
    assert qm.tolist() == [[True, True, True], [True, False, False]]
    assert pm[1, 1].any().item() is False
    torch.testing.assert_close(p[0, 0, 1], emb[6])
    out = GateShaping(D, G).double()(q, qm, p, pm)
    assert torch.isinf(out.scores[1, 1]) and torch.isfinite(out.scores[0]).all()
    for bad in ([[[]], [[1]]], [[[1]], []], [[[1]], [[99]]]):
        with pytest.raises(ValueError):
            evidence_inputs(emb, [[1], [2]], bad)
