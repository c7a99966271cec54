"""Image batching helpers (lit_tasks/ops/images.py): padding to a size divisor, per-size groups, maps as if alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_tasks.ops.images import group_by_size, group_same_sizes, maps_as_if_alone, padded_size, stack_padded


def test_padded_size_rounds_each_side_up() -> None:
    assert padded_size((150, 97), 32) == (160, 128)
    assert padded_size((128, 128), 32) == (128, 128)
    assert padded_size((1, 33), 32) == (32, 64)


def whole_map_fn(calls: list[tuple[int, int, int]]):
    """Maps that depend on the whole padded input: the image minus its mean over the padded area, and a stride-2
    average pool (a coarser level); records each call's (n, H, W)."""
    def fn(x: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        calls.append((x.shape[0], x.shape[-2], x.shape[-1]))
        return [x - x.mean(dim=(2, 3), keepdim=True), F.avg_pool2d(x[:, :1], 2, ceil_mode=True)]
    return fn


@pytest.mark.parametrize("group", [True, False])
def test_each_image_gets_the_maps_it_gets_alone_and_the_fill_around_them(group: bool) -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 40), (30, 50), (60, 33), (64, 64)]  # padded to 32: (64, 64), (32, 64), (64, 64), (64, 64)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    batch, _ = stack_padded(images, size_divisor=32)
    batch = F.pad(batch, (0, 16, 0, 8), value=0.5)  # a batch padded further, with garbage
    calls: list[tuple[int, int, int]] = []
    maps = maps_as_if_alone(whole_map_fn(calls), batch, sizes, 32, fills=[-7.0, 3.0], group=group)
    # One call per padded size or per image, never at the batch's 72 x 80
    assert sorted(calls) == ([(1, 32, 64), (3, 64, 64)] if group else [(1, 32, 64)] + [(1, 64, 64)] * 3)
    assert [m.shape for m in maps] == [(4, 3, 64, 64), (4, 1, 32, 32)]
    for i, (image, size) in enumerate(zip(images, sizes)):
        h, w = padded_size(size, 32)
        alone = whole_map_fn([])(F.pad(image[None], (0, w - size[1], 0, h - size[0])), [size])
        for got, want, fill in zip(maps, alone, (-7.0, 3.0)):
            torch.testing.assert_close(got[i, :, : want.shape[-2], : want.shape[-1]], want[0], rtol=1e-6, atol=1e-6)
            around = torch.ones_like(got[i], dtype=torch.bool)
            around[:, : want.shape[-2], : want.shape[-1]] = False
            assert (got[i][around] == fill).all()


def test_one_padded_size_runs_the_batch_in_one_call_and_fills_nothing() -> None:
    batch = torch.rand(2, 3, 70, 70, generator=torch.Generator().manual_seed(1))
    calls: list[tuple[int, int, int]] = []
    maps = maps_as_if_alone(whole_map_fn(calls), batch, [(64, 60), (50, 64)], 32, fills=[0.0, 0.0])
    assert calls == [(2, 64, 64)] and maps[0].shape == (2, 3, 64, 64)
    calls.clear()
    per_image = maps_as_if_alone(whole_map_fn(calls), batch, [(64, 60), (50, 64)], 32, fills=[0.0, 0.0], group=False)
    assert calls == [(1, 64, 64)] * 2
    for got, want in zip(per_image, maps):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="2 maps but 1 fill values"):
        maps_as_if_alone(whole_map_fn([]), batch, [(64, 60), (30, 64)], 32, fills=[0.0])


def test_group_by_size_keeps_first_seen_order() -> None:
    assert group_by_size([(2, 3), (4, 5), (2, 3)]) == {(2, 3): [0, 2], (4, 5): [1]}


def test_one_call_per_image_on_a_cpu_per_padded_size_elsewhere() -> None:
    assert not group_same_sizes(torch.device("cpu")) and group_same_sizes(torch.device("cuda", 0))
