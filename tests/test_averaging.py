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


def test_named_buffers_are_averaged_from_their_value_after_the_first_step():
    model, decay = small_model(), 0.5
    model[1].running_mean.fill_(100.0)  # a placeholder the average must not remember
    average = WeightAverage(model, decay, buffers=["1.running_mean"])
    assert "1.running_mean" not in average.state_dict()
    with average.swapped_in():  # not started: the live buffer stays
        assert torch.equal(model[1].running_mean, torch.full((4,), 100.0))
    model[1].running_mean.fill_(2.0)
    average.update()
    model[1].running_mean.fill_(4.0)
    average.update()
    expected = torch.full((4,), decay * 2.0 + (1 - decay) * 4.0)
    torch.testing.assert_close(average.state_dict()["1.running_mean"], expected)
    with average.swapped_in():
        torch.testing.assert_close(model[1].running_mean, expected)
        torch.testing.assert_close(model[0].weight, average.state_dict()["0.weight"])
    assert torch.equal(model[1].running_mean, torch.full((4,), 4.0))
    assert torch.equal(model[1].running_var, torch.ones(4))  # an unnamed buffer is never touched


def test_buffer_averages_round_trip_and_an_older_state_without_them_starts_them_again():
    model = small_model()
    first = WeightAverage(model, 0.5, buffers=["1.running_mean"])
    model[1].running_mean.fill_(3.0)
    first.update()
    second = WeightAverage(model, 0.5, buffers=["1.running_mean"])
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(second.state_dict()["1.running_mean"], torch.full((4,), 3.0))
    older = {k: v for k, v in first.state_dict().items() if k != "1.running_mean"}
    second.load_state_dict(older)
    assert "1.running_mean" not in second.state_dict()
    model[1].running_mean.fill_(5.0)
    second.update()
    torch.testing.assert_close(second.state_dict()["1.running_mean"], torch.full((4,), 5.0))
    with pytest.raises(KeyError, match="no buffer 1.running_max"):
        WeightAverage(model, 0.5, buffers=["1.running_max"])


def test_sparcode_names_its_codebooks_only_when_asked():
    from tests.helpers import random_dataset, sparcode_model

    ds = random_dataset(num_users=20, num_items=15, rows=300)
    settings = dict(dim=8, user_tokens=2, item_tokens=2, tokenizer_hidden=[8], item_hidden=[8], interaction_hidden=[8])
    assert sparcode_model(ds, **settings).averaged_buffers() == []
    asked = sparcode_model(ds, **settings, average_codebooks=True)
    assert asked.averaged_buffers() == ["quantizer.codebooks"]
    WeightAverage(asked, 0.9, asked.averaged_buffers())  # the name is a buffer of the model
    unquantised = sparcode_model(ds, **settings, average_codebooks=True, quantize=False)
    assert unquantised.averaged_buffers() == []
