"""The moving average of the weights: the update formula, the swap, and its state."""

import pytest
import torch
from torch import nn

from crosstower.train.averaging import WeightAverage


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model[2].bias.requires_grad_(False)  # a frozen parameter is not averaged
    return model


def test_the_average_follows_the_recurrence_on_random_weights():
    model, decay = small_model(), 0.9
    average = WeightAverage(model, decay)
    expected = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        average.update()
        for name, p in model.named_parameters():
            if name in expected:
                expected[name] = decay * expected[name] + (1 - decay) * p.detach()
    assert expected.keys() == average.state_dict().keys() and "2.bias" not in expected
    for name, value in average.state_dict().items():
        torch.testing.assert_close(value, expected[name])


def test_swapped_in_lends_the_average_and_restores_the_live_weights_and_buffers():
    model = small_model()
    average = WeightAverage(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].running_mean.fill_(7.0)  # a buffer stays the live one inside and after the block
    average.update()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with average.swapped_in():
        torch.testing.assert_close(model[0].weight, average.state_dict()["0.weight"])
        assert not torch.equal(model[0].weight, live["0.weight"])
        assert torch.equal(model[1].running_mean, live["1.running_mean"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key]), key


def test_the_swap_restores_the_live_weights_when_the_block_raises():
    model = small_model()
    average = WeightAverage(model, 0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    live = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError), average.swapped_in():
        raise RuntimeError("evaluation failed")
    assert torch.equal(model[0].weight, live)


def test_state_round_trip_and_a_mismatched_state():
    model = small_model()
    first = WeightAverage(model, 0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    first.update()
    second = WeightAverage(model, 0.5)
    second.load_state_dict(first.state_dict())
    for name, value in second.state_dict().items():
        assert torch.equal(value, first.state_dict()[name])
    with pytest.raises(KeyError, match="do not match the model"):
        second.load_state_dict({"0.weight": model[0].weight.detach()})


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_a_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(small_model(), decay)
