"""The UNet expert builds for any channel list: GroupNorm takes the most groups (up to 32, at least 4 channels
each) that divide each width, skip concatenations included."""
import torch

from ddmkit.nets.unet import UNet, _norm


def test_a_channel_list_whose_skip_concatenation_is_not_a_multiple_of_32_builds_and_runs():
    """channels [48, 96]: the up path normalises 96 + 48 = 144 channels, which 32 groups do not divide."""
    net = UNet([1, 16, 16], channels=[48, 96], attention_res=[])
    x = torch.randn(2, 1, 16, 16)
    assert net(x, torch.rand(2)).shape == x.shape
    assert _norm(144).num_groups == 24


def test_widths_that_32_groups_divide_keep_their_groups():
    for c, groups in [(8, 2), (32, 8), (64, 16), (96, 24), (128, 32), (256, 32), (3, 1)]:
        assert _norm(c).num_groups == groups, c
