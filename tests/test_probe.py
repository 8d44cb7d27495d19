"""The curvature probe against exact Hessian and Fisher traces, and its contract with the model."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sadra.errors import ConfigError, CurvatureError, ModelError
from sadra.probe import SensitivityReport, estimate_sensitivity, make_signal, warm_up_head


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(6, 5)
        self.l2 = nn.Linear(5, 4)
        self.l3 = nn.Linear(4, 3)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


TARGETS = ["l1", "l2", "l3"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    net = TinyNet().double()
    x = torch.randn(10, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return net, (x, y)


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def logits_of(model, batch):
    return model(batch[0])


def exact_hessian_block_traces(net, batch):
    names = [f"{t}.weight" for t in TARGETS]
    params = dict(net.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def loss_of(vec):
        chunks = torch.split(vec, sizes)
        new = {n: c.reshape(params[n].shape) for n, c in zip(names, chunks)}
        return ce_loss(lambda x: functional_call(net, new, (x,)), batch)

    hess = torch.autograd.functional.hessian(loss_of, flat)
    out, start = {}, 0
    for t, s in zip(TARGETS, sizes):
        out[t] = float(torch.diagonal(hess[start:start + s, start:start + s]).sum())
        start += s
    return out


def exact_fisher_block_traces(net, batch):
    x, _ = batch
    traces = {t: 0.0 for t in TARGETS}
    weights = [getattr(net, t).weight for t in TARGETS]
    for n in range(x.shape[0]):
        logits = net(x[n:n + 1])
        probs = torch.softmax(logits, -1).detach()[0]
        for c in range(logits.shape[-1]):
            loss = nn.functional.cross_entropy(net(x[n:n + 1]), torch.tensor([c]))
            grads = torch.autograd.grad(loss, weights)
            for t, g in zip(TARGETS, grads):
                traces[t] += float(probs[c]) * float(g.pow(2).sum())
    return {t: v / x.shape[0] for t, v in traces.items()}


# Every HvP path: a fresh first-order graph per probe (1), the default (None: 1 per-module, 8 joint),
# and many probes on one graph (50), in both modes.
@pytest.mark.parametrize("probes_per_batch", [1, None, 50])
@pytest.mark.parametrize("mode", ["per_module", "joint"])
def test_hutchinson_matches_exact_hessian_block_traces(tiny, mode, probes_per_batch):
    net, batch = tiny
    exact = exact_hessian_block_traces(net, batch)
    report = estimate_sensitivity(net, [batch], targets=TARGETS, loss_fn=ce_loss, estimator="hutchinson",
                                  mode=mode, max_probes=600, rtol=0, seed=3, probes_per_batch=probes_per_batch)
    assert report.probes == 600
    assert report.meta["probes_per_batch"] == (probes_per_batch or {"per_module": 1, "joint": 8}[mode])
    assert make_signal("hutchinson", mode=mode).rounds_per_batch == {"per_module": 1, "joint": 8}[mode]
    for t in TARGETS:
        assert report.stderr[t] > 0
        assert abs(report.scores[t] - exact[t]) <= 3 * report.stderr[t], (t, report.scores[t], exact[t], report.stderr[t])
    # And the estimate is informative: its error bar is small next to the block's trace.
    assert max(report.stderr[t] / abs(exact[t]) for t in TARGETS) < 0.5


@pytest.mark.parametrize("probes_per_batch", [None, 6])  # a forward per probe, or one shared by 6
def test_fisher_matches_exact_fisher_block_traces(tiny, probes_per_batch):
    net, batch = tiny
    exact = exact_fisher_block_traces(net, batch)
    report = estimate_sensitivity(net, [batch], targets=TARGETS, logits_fn=logits_of, estimator="fisher",
                                  max_probes=600, rtol=0, seed=5, probes_per_batch=probes_per_batch)
    for t in TARGETS:
        assert exact[t] > 0
        assert abs(report.scores[t] - exact[t]) <= 3 * report.stderr[t], (t, report.scores[t], exact[t], report.stderr[t])


def test_probe_restores_model_state_and_only_targets_get_gradients(tiny):
    net, batch = tiny
    net.train()
    net.l2.eval()
    net.l1.bias.requires_grad_(False)
    seen = {}

    def spy_loss(model, b):
        seen["training"] = model.training
        seen["requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
        return ce_loss(model, b)

    estimate_sensitivity(net, [batch], targets=["l1", "l3"], loss_fn=spy_loss, estimator="hutchinson", max_probes=2, rtol=0)
    assert seen["training"] is False
    assert seen["requires_grad"] == {"l1.weight": True, "l1.bias": False, "l2.weight": False, "l2.bias": False,
                                     "l3.weight": True, "l3.bias": False}
    assert net.training and not net.l2.training and net.l1.training
    assert net.l1.bias.requires_grad is False and net.l2.weight.requires_grad is True
    assert all(p.grad is None for p in net.parameters())
    net.l1.bias.requires_grad_(True)


def test_same_seed_same_samples_other_seed_other_samples(tiny):
    net, batch = tiny
    kwargs = dict(targets=TARGETS, loss_fn=ce_loss, estimator="hutchinson", max_probes=5, rtol=0)
    a = estimate_sensitivity(net, [batch], seed=11, **kwargs)
    b = estimate_sensitivity(net, [batch], seed=11, **kwargs)
    c = estimate_sensitivity(net, [batch], seed=12, **kwargs)
    assert a.samples == b.samples and a.scores == b.scores
    assert a.samples != c.samples


def test_early_stop_when_relative_stderr_reaches_rtol(tiny):
    net, batch = tiny
    report = estimate_sensitivity(net, [batch], targets=TARGETS, logits_fn=logits_of, estimator="fisher",
                                  max_probes=500, rtol=0.2, seed=0)
    assert report.converged and report.probes < 500
    assert all(report.stderr[t] <= 0.2 * abs(report.scores[t]) for t in TARGETS)


def test_non_finite_curvature_names_the_module():
    net = TinyNet().double()
    with torch.no_grad():
        net.l2.weight.mul_(1e-6)
    batch = (torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))

    def exploding(model, b):
        # Finite loss, but a curvature of ~1e307 per weight on l2 overflows the trace.
        return ce_loss(model, b) + 1e307 * model.l2.weight.pow(2).sum()

    with pytest.raises(CurvatureError, match=r"module l2"):
        estimate_sensitivity(net, [batch], targets=TARGETS, loss_fn=exploding, estimator="hutchinson", max_probes=2, rtol=0)


def test_bad_arguments_raise_specific_errors(tiny):
    net, batch = tiny
    with pytest.raises(ConfigError, match="unknown estimator"):
        estimate_sensitivity(net, [batch], targets=TARGETS, loss_fn=ce_loss, estimator="kfac")
    with pytest.raises(ConfigError, match="unknown Hutchinson mode"):
        estimate_sensitivity(net, [batch], targets=TARGETS, loss_fn=ce_loss, estimator="hutchinson", mode="diag")
    with pytest.raises(ModelError, match="matches no linear module"):
        estimate_sensitivity(net, [batch], targets=["nope"], loss_fn=ce_loss)
    with pytest.raises(ModelError, match="max_probes"):
        estimate_sensitivity(net, [batch], targets=TARGETS, loss_fn=ce_loss, max_probes=0)


def test_report_json_round_trip(tiny):
    net, batch = tiny
    report = estimate_sensitivity(net, [batch], targets=TARGETS, loss_fn=ce_loss, estimator="hutchinson", max_probes=3, rtol=0)
    again = SensitivityReport.from_json(report.to_json())
    assert again.scores == report.scores and again.stderr == report.stderr
    assert again.shapes == {"l1": (5, 6), "l2": (4, 5), "l3": (3, 4)}
    assert again.num_params == {"l1": 30, "l2": 20, "l3": 12}
    assert again.samples == report.samples and again.probes == 3


def test_probe_on_real_minilm_with_sdpa_attention_and_head_warmup(minilm, sst2_rows):
    from sadra.data import calibration_batches

    model, tokenizer = minilm
    assert model.config._attn_implementation == "sdpa"
    head_before = model.classifier.weight.detach().clone()
    batches = calibration_batches(sst2_rows, tokenizer, num_batches=2, batch_size=8, max_length=32, seed=0)
    report = estimate_sensitivity(model, batches, estimator="fisher", max_probes=4, rtol=0, head_warmup_steps=3)
    assert len(report.scores) == 36 and report.probes == 4
    assert all(math.isfinite(v) and v >= 0 for v in report.scores.values())
    assert report.shapes["bert.encoder.layer.0.intermediate.dense"] == (1536, 384)
    assert torch.equal(model.classifier.weight, head_before)  # warm-up is undone after probing
    hutch = estimate_sensitivity(model, batches[:1], estimator="hutchinson", mode="joint", max_probes=2, rtol=0)
    assert all(math.isfinite(v) for v in hutch.scores.values())


def test_default_estimator_is_the_gradient_signal_with_one_pass(tiny):
    net, batch = tiny
    other = (batch[0].flip(0), batch[1].flip(0))
    seen = []

    def logits_spy(model, b):
        seen.append(torch.equal(b[0], other[0]))
        return logits_of(model, b)

    report = estimate_sensitivity(net, [batch, other], targets=TARGETS, loss_fn=ce_loss, logits_fn=logits_spy,
                                  max_probes=4, rtol=0)
    assert report.estimator == "gradient" and report.meta["probes_per_batch"] == 1
    assert set(report.spectra) == set(TARGETS) and report.probes == 2
    assert seen == [False, True]  # one round per batch, one pass over the batches


def _head_after_warm_up(model, batches, steps, **kwargs):
    from sadra.probe import restore_head

    encoder_runs = []
    handle = model.bert.encoder.register_forward_hook(lambda *_: encoder_runs.append(1))
    try:
        saved = warm_up_head(model, batches, steps, seed=4, **kwargs)
    finally:
        handle.remove()
    head = {k: v.detach().clone() for k, v in model.classifier.state_dict().items()}
    restore_head(model, saved)
    return head, len(encoder_runs)


def test_head_warm_up_replays_the_frozen_encoder_with_identical_results(minilm, sst2_rows):
    from sadra.data import calibration_batches
    from sadra.probe import hf_loss

    model, tokenizer = minilm
    batches = calibration_batches(sst2_rows, tokenizer, num_batches=2, batch_size=8, max_length=24, seed=1)
    plain, plain_runs = _head_after_warm_up(model, batches, 7, cache_bytes=0)
    replayed, replay_runs = _head_after_warm_up(model, batches, 7)
    assert plain_runs == 7 and replay_runs == 2  # one encoder forward per batch instead of per step
    for k in plain:
        assert torch.allclose(plain[k], replayed[k], atol=1e-6, rtol=0), k
    assert not torch.equal(plain["weight"], model.classifier.weight)  # the warm-up did move the head

    def twice(m, b):  # a loss that runs the model twice per step cannot be replayed
        return 0.5 * (hf_loss(m, b) + hf_loss(m, b))

    fallback, fallback_runs = _head_after_warm_up(model, batches, 5, loss_fn=twice)
    assert fallback_runs == 10
    reference, _ = _head_after_warm_up(model, batches, 5, loss_fn=twice, cache_bytes=0)
    for k in fallback:
        assert torch.allclose(fallback[k], reference[k], atol=1e-6, rtol=0), k


def test_head_warm_up_keeps_an_instance_level_forward_of_the_base_model(minilm, sst2_rows):
    from sadra.data import calibration_batches
    from sadra.probe import restore_head

    model, tokenizer = minilm
    batches = calibration_batches(sst2_rows, tokenizer, num_batches=1, batch_size=4, max_length=16, seed=2)
    calls = []
    class_forward = type(model.bert).forward

    def hooked(*args, **kwargs):  # what accelerate's hooks put on a module instance
        calls.append(1)
        return class_forward(model.bert, *args, **kwargs)

    model.bert.forward = hooked
    try:
        restore_head(model, warm_up_head(model, batches, 3))
        assert model.bert.__dict__.get("forward") is hooked
        assert len(calls) == 1  # run once for the batch, replayed for the two later steps
    finally:
        del model.bert.forward


def test_standard_error_treats_batches_as_the_unit():
    from sadra.probe import _batch_stderr

    # Two batches, two rounds each: the batch means 1.5 and 3.5 are the two independent samples.
    assert _batch_stderr([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1]) == pytest.approx(1.0)
    # Rounds treated as independent would claim about two thirds of that.
    assert _batch_stderr([1.0, 2.0, 3.0, 4.0], [0, 1, 2, 3]) == pytest.approx(0.6455, abs=1e-4)
    # One batch: only the rounds' own spread is there to measure.
    assert _batch_stderr([1.0, 3.0], [0, 0]) == pytest.approx(1.0)
