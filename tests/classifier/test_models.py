"""The small-map convolution: the same maths as nn.Conv2d on every map it takes, and used by every backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mvc.classifier.models import SMALL_MAP_PIXELS, SmallMapConv2d, build_model, use_small_map_convs


@pytest.mark.parametrize("hw,k,stride,pad,bias", [
    ((1, 1), 3, 1, 1, False),   # a 3x3 kernel on a 1x1 map: the centre tap
    ((2, 2), 3, 2, 1, False),   # 2x2 -> 1x1 at stride 2: the lower-right 2x2 taps
    ((2, 2), 3, 1, 1, True),    # 2x2 -> 2x2: the matrix product of the unfolded map
    ((2, 2), 1, 1, 0, True),    # 1x1 kernel
    ((1, 2), 3, 1, 1, False),   # a non-square map
    ((2, 2), 2, 1, 0, False),   # 2x2 -> 1x1 with no padding: the whole kernel
    ((1, 1), 3, 1, 0, True),    # no padding on a 1x1 map cannot fit a 3x3 kernel: refused like nn.Conv2d
    ((4, 4), 3, 1, 1, False),   # larger than SMALL_MAP_PIXELS: the plain convolution
])
def test_small_map_conv_matches_conv2d_in_outputs_and_gradients(hw, k, stride, pad, bias):
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 5, k, stride=stride, padding=pad, bias=bias).double()
    small = SmallMapConv2d(6, 5, k, stride=stride, padding=pad, bias=bias).double()
    small.load_state_dict(plain.state_dict())
    x = torch.randn(3, 6, *hw, dtype=torch.double)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        want = plain(xa)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            small(xb)
        return
    got = small(xb)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(small.weight.grad, plain.weight.grad)  # taps off the map get exactly zero
    if bias:
        torch.testing.assert_close(small.bias.grad, plain.bias.grad)


def test_backbones_use_it_and_train_like_the_plain_network():
    """resnet10t at 32 px reaches 2x2 and 1x1 maps; its outputs and gradients are those of plain convolutions."""
    torch.manual_seed(0)
    model, _ = build_model("resnet10t", 10, input_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is SmallMapConv2d for m in convs)
    plain, _ = build_model("resnet10t", 10, input_size=32)
    plain.load_state_dict(model.state_dict())
    use_small_map_convs(plain, enabled=False)
    assert not any(type(m) is SmallMapConv2d for m in plain.modules())
    model, plain = model.double().train(), plain.double().train()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.double), torch.tensor([0, 1, 2, 3])
    for net in (model, plain):
        nn.functional.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(model(x), plain(x))
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert SMALL_MAP_PIXELS >= 4  # resnet10t's last two stages (2x2, 1x1 at 32 px) take the matrix product


def test_use_small_map_convs_keeps_subclasses_and_state_dicts():
    class Custom(nn.Conv2d):
        pass
    net = nn.Sequential(nn.Conv2d(3, 4, 3), Custom(4, 4, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    use_small_map_convs(net)
    assert type(net[0]) is SmallMapConv2d and type(net[1]) is Custom
    assert net.state_dict().keys() == before.keys()


def test_channels_last_is_recorded_in_the_meta_and_rebuilt_from_it():
    from mvc.classifier.models import ModelMeta, build_from_meta

    model, meta = build_model("mvc_refcnn", 10, input_size=32, channels_last=True)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert meta.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    again = build_from_meta(ModelMeta.from_dict(meta.to_dict()))
    assert next(m for m in again.modules() if isinstance(m, nn.Conv2d)).weight.is_contiguous(
        memory_format=torch.channels_last)
    old = {k: v for k, v in meta.to_dict().items() if k != "channels_last"}  # a checkpoint from before the key
    assert ModelMeta.from_dict(old).channels_last is False
    x = torch.randn(2, 3, 32, 32)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
