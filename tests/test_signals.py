"""Signals: the gradient spectrum against a direct SVD, the unbiased spectrum on a known low-rank mean,
and a signal added from outside in one class."""

import pytest
import torch
from torch import nn

from sadra.probe import estimate_sensitivity
from sadra.signals import SIGNALS, Signal, register_signal, signal_spectrum

from test_probe import TARGETS, TinyNet, ce_loss, logits_of


@pytest.fixture(scope="module")
def four_batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(4)]


def direct_mean_gradients(net, batches, keep=None):
    weights = [getattr(net, t).weight for t in TARGETS]
    total = [torch.zeros_like(w) for w in weights]
    chosen = [b for i, b in enumerate(batches) if keep is None or keep(i)]
    for batch in chosen:
        for acc, g in zip(total, torch.autograd.grad(ce_loss(net, batch), weights)):
            acc += g
    return [t / len(chosen) for t in total]


def test_gradient_spectrum_equals_the_svd_of_the_mean_gradient(four_batches):
    net = TinyNet().double()
    report = estimate_sensitivity(net, four_batches, targets=TARGETS, loss_fn=ce_loss, logits_fn=logits_of,
                                  estimator="gradient", max_probes=6, rtol=0, seed=5, spectrum_rank=3)
    fisher = estimate_sensitivity(net, four_batches, targets=TARGETS, loss_fn=ce_loss, logits_fn=logits_of,
                                  estimator="fisher", max_probes=6, rtol=0, seed=5)
    means = direct_mean_gradients(net, four_batches)
    halves = [direct_mean_gradients(net, four_batches, keep=lambda i, h=h: i % 2 == h) for h in (0, 1)]
    for t, g, g_a, g_b in zip(TARGETS, means, *halves):
        expected = (torch.linalg.svdvals(g) ** 2)[:3].tolist()
        assert report.spectra_raw[t] == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert report.spectra[t] == pytest.approx(signal_spectrum(g_a, g_b, 3), rel=1e-9, abs=1e-15)
        # The per-round samples are the Fisher trace, the same draws as the fisher signal's.
        # One pass: a round per batch (4 of the 6 allowed), the fisher signal's first 4 draws.
        assert report.samples[t] == pytest.approx(fisher.samples[t][:4], rel=1e-12)
    assert set(report.spectrum_stability) == set(TARGETS)
    assert report.sample_batches == [0, 1, 2, 3] and report.probes == 4


def test_gradient_signal_needs_two_batches(four_batches):
    from sadra.errors import DataError

    with pytest.raises(DataError, match="at least 2 calibration batches"):
        estimate_sensitivity(TinyNet().double(), four_batches[:1], targets=TARGETS, loss_fn=ce_loss,
                             logits_fn=logits_of, estimator="gradient", max_probes=2, rtol=0)


@pytest.mark.parametrize("d_out, d_in, n", [(60, 40, 400), (384, 384, 64)])
def test_two_half_spectrum_recovers_a_known_low_rank_mean_without_the_noise_floor(d_out, d_in, n):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(d_out, 2, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, 2, generator=g, dtype=torch.float64))
    mean = u @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ v.T   # sigma^2 = 9, 1, then 0

    def half():  # the mean of n noisy per-example gradients (unit noise per entry)
        return mean + torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / n ** 0.5

    estimates, raws = [], []
    for _ in range(10):
        g_a, g_b = half(), half()
        estimates.append(signal_spectrum(g_a, g_b, 4))
        raws.append((torch.linalg.svdvals((g_a + g_b) / 2) ** 2)[:4].tolist())
    est, raw = torch.tensor(estimates).mean(0), torch.tensor(raws).mean(0)
    # The raw spectrum sits on a noise floor: its 3rd and 4th values come from noise alone.
    assert raw[2] > 0.15 and raw[3] > 0.15
    assert est[2] < 0.1 * raw[2] and est[3] < 0.1 * raw[3]
    if n >= 400:  # little noise: the known spectrum comes back
        assert est[0] == pytest.approx(9.0, rel=0.05) and est[1] == pytest.approx(1.0, rel=0.2)
    else:  # the top direction is barely above the floor: still first, the floor itself is worth ~0
        assert raw[2] > 10 and est[0] > 2 and est[1] < 0.5


def test_a_signal_is_one_class_and_one_registry_entry():
    @register_signal
    class SquaredGradient(Signal):
        """||dL/dW||^2 of the true-label loss per module."""

        name = "squared-gradient"

        def prepare(self, model, batch, params, calls, b_idx, first_visit):
            return calls.loss(model, batch)

        def sample(self, shared, batch, params, generator, retain):
            grads = torch.autograd.grad(shared, params, retain_graph=retain)
            return [float(g.pow(2).sum()) for g in grads]

    try:
        net = TinyNet().double()
        torch.manual_seed(0)
        batch = (torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))
        report = estimate_sensitivity(net, [batch], targets=TARGETS, loss_fn=ce_loss, estimator="squared-gradient",
                                      max_probes=1, rtol=0)
        direct = direct_mean_gradients(net, [batch])
        for t, g in zip(TARGETS, direct):
            assert report.scores[t] == pytest.approx(float(g.pow(2).sum()), rel=1e-12)
    finally:
        SIGNALS.pop("squared-gradient")
