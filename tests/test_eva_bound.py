"""EVA's convergence loop is bounded: a layer whose leading input direction never settles ends at the cap."""

import pytest
import torch
from torch import nn

from sadra.adapt import bounded_eva_init


class Switching(nn.Module):
    """A linear layer whose input's leading direction swaps between two axes on every call.

    Each call's rows lie along one axis, 4x larger than the call before, so the running SVD's
    top component is always the latest axis: consecutive components are orthogonal (cosine 0)
    and EVA's test ``cosine >= tau`` can never pass. PEFT alone would loop for ever.
    """

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        axis = self.calls % 2
        scale = 4.0 ** min(self.calls, 40)
        self.calls += 1
        rows = torch.zeros(8, 4)
        rows[0::2, axis] = scale
        rows[1::2, axis] = -scale
        rows[:, 2] = torch.linspace(-1e-3, 1e-3, 8)
        return self.lin(rows + 0 * x.sum())


def peft_eva(model, rho=2.0):
    from peft import EvaConfig, LoraConfig, get_peft_model

    config = LoraConfig(r=1, lora_alpha=2, target_modules=["lin"], init_lora_weights="eva",
                        eva_config=EvaConfig(rho=rho, tau=0.99))
    return get_peft_model(model, config)


def call(model, inputs):
    return model(inputs["x"])


@pytest.mark.timeout(120)
def test_non_converging_layer_ends_at_the_cap_and_keeps_its_components():
    torch.manual_seed(0)
    peft_model = peft_eva(Switching())
    batches = [{"x": torch.ones(1)}, {"x": torch.ones(1)}]
    stats = bounded_eva_init(peft_model, batches, max_passes=3, forward_fn=call,
                             prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
    assert stats["passes"] == 3.0
    assert stats["layers_capped"] == 1 and stats["capped"][0].endswith("lin")
    base = peft_model.base_model.model
    # Hash call + 3 passes x 2 batches reached the layer; nothing after the cap did.
    assert base.calls == 1 + 3 * 2
    a = base.lin.lora_A["default"].weight.detach()
    # The layer keeps the components of its last update: the axis the last call (number 6, even) used.
    assert a.shape == (1, 4)
    assert abs(a[0, 0].item()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.timeout(120)
def test_converging_layer_is_not_capped():
    class Still(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([3.0, 1.0, 0.3, 0.1])
    batches = [{"x": torch.randn(64, 4, generator=g) * scale} for _ in range(4)]
    peft_model = peft_eva(Still())
    stats = bounded_eva_init(peft_model, batches, max_passes=50, forward_fn=call,
                             prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
    assert stats["layers_capped"] == 0 and stats["passes"] < 50
