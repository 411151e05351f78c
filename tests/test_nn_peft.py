"""Same weights, same input: our LoRA, DoRA and VeRA layers give PEFT's outputs and gradients."""

import pytest
import torch
from torch import nn

from lorabench.nn.lora import DoRALinear, LoRALinear
from lorabench.nn.vera import VeRALinear, VeRAProjections

peft = pytest.importorskip("peft")

SEED = 99
RANK, ALPHA = 4, 8
RTOL, ATOL = 1e-5, 1e-6


class Net(nn.Module):
    """Two Linears of different shapes, so VeRA has to slice its shared projections."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(16, 24)
        self.lin2 = nn.Linear(24, 12)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(SEED)


def _pair():
    base = Net()
    ours = Net()
    ours.load_state_dict(base.state_dict())
    return base, ours


def _check(peft_model, ours, params):
    x = torch.randn(3, 5, 16)
    expected, got = peft_model(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    expected.square().sum().backward()
    got.square().sum().backward()
    for mine, theirs in params:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_and_dora_match_peft(use_dora):
    base, ours = _pair()
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin1", "lin2"], use_dora=use_dora)
    pm = peft.get_peft_model(base, cfg)
    params = []
    for name in ("lin1", "lin2"):
        theirs = getattr(pm.base_model.model, name)
        cls = DoRALinear if use_dora else LoRALinear
        mine = cls(getattr(ours, name), RANK, ALPHA)
        setattr(ours, name, mine)
        with torch.no_grad():
            theirs.lora_B["default"].weight.normal_(0.0, 0.3)
            mine.lora_a.copy_(theirs.lora_A["default"].weight)
            mine.lora_b.copy_(theirs.lora_B["default"].weight)
        params += [(mine.lora_a, theirs.lora_A["default"].weight), (mine.lora_b, theirs.lora_B["default"].weight)]
        if use_dora:
            magnitude = theirs.lora_magnitude_vector["default"].weight
            # Both start m at the row norms of W.
            torch.testing.assert_close(mine.magnitude, magnitude, rtol=1e-6, atol=0)
            with torch.no_grad():
                magnitude.mul_(torch.linspace(0.8, 1.2, magnitude.numel()))
                mine.magnitude.copy_(magnitude)
            params.append((mine.magnitude, magnitude))
    _check(pm, ours, params)


def test_vera_matches_peft_including_its_projections():
    base, ours = _pair()
    cfg = peft.VeraConfig(r=RANK, target_modules=["lin1", "lin2"], projection_prng_key=0)
    pm = peft.get_peft_model(base, cfg)
    # PEFT sizes the pair by the largest (out, in) over targets: here 24 x 24.
    shared = VeRAProjections(RANK, 24, 24, seed=0)
    assert torch.equal(shared.a, pm.base_model.vera_A["default"])
    assert torch.equal(shared.b, pm.base_model.vera_B["default"])
    params = []
    for name in ("lin1", "lin2"):
        theirs = getattr(pm.base_model.model, name)
        mine = VeRALinear(getattr(ours, name), shared)
        setattr(ours, name, mine)
        torch.testing.assert_close(mine.lambda_d, theirs.vera_lambda_d["default"], rtol=0, atol=0)
        with torch.no_grad():
            theirs.vera_lambda_b["default"].normal_(0.0, 0.5)
            theirs.vera_lambda_d["default"].normal_(0.0, 0.5)
            mine.lambda_b.copy_(theirs.vera_lambda_b["default"])
            mine.lambda_d.copy_(theirs.vera_lambda_d["default"])
        params += [(mine.lambda_b, theirs.vera_lambda_b["default"]),
                   (mine.lambda_d, theirs.vera_lambda_d["default"])]
    _check(pm, ours, params)


def test_counts_match_peft_report():
    base, ours = _pair()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin1", "lin2"]))
    trainable, total = pm.get_nb_trainable_parameters()
    for name in ("lin1", "lin2"):
        setattr(ours, name, LoRALinear(getattr(ours, name), RANK, ALPHA))
    mine = [p for p in ours.parameters()]
    assert (sum(p.numel() for p in mine if p.requires_grad), sum(p.numel() for p in mine)) == (trainable, total)
    # Written out: A 4x16 + B 24x4 and A 4x24 + B 12x4; the base is 16x24+24 + 24x12+12.
    assert (trainable, total) == (64 + 96 + 96 + 48, 64 + 96 + 96 + 48 + 408 + 300)
