"""DensitySchedule: the paper's operating points, stage boundaries, validation, and training draws."""
import math

import pytest
import torch

from flexdit.schedule import DensitySchedule


# Every operating point of the paper comes out exactly (the "approximately" for 512², [0.61, 0.86] is not needed:
# √(1024·(1 − r_k)) = 19.98, 17.72, 15.12, 11.97 round to 20, 18, 15, 12).
@pytest.mark.parametrize("token_side, r_min, r_max, expected", [
    (16, 0.61, 0.86, (10, 9, 8, 6)),     # 256², N = 256
    (32, 0.90, 0.96, (10, 9, 8, 6)),     # 512², N = 1024
    (32, 0.61, 0.86, (20, 18, 15, 12)),  # 512², N = 1024
])
def test_reference_table(token_side, r_min, r_max, expected):
    s = DensitySchedule.from_rates(r_min, r_max, token_side)
    assert s.grids == tuple((g, g) for g in expected)
    assert [s.grid(t) for t in (0, 249, 250, 499, 500, 749, 750, 999)] == \
        [(g, g) for g in expected for _ in range(2)]
    n = token_side ** 2
    for k, g in enumerate(expected):
        r_k = r_min + k / 3 * (r_max - r_min)
        assert g == round(math.sqrt(n * (1 - r_k)))


def test_fixed_and_explicit():
    s = DensitySchedule.fixed(8, token_grid=16)
    assert s.grids == ((8, 8),) and s.grid(0) == (8, 8) and s.grid(999) == (8, 8) and s.num_stages == 1
    assert DensitySchedule.from_rates(0.75, 0.75, 16).grids == ((8, 8),) * 4
    e = DensitySchedule([6, 5, 4], num_timesteps=10)
    assert [e.stage(t) for t in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [e.stage_interval(k) for k in e.stages] == [(0, 4), (4, 7), (7, 10)]
    for k in e.stages:
        lo, hi = e.stage_interval(k)
        assert all(e.stage(t) == k for t in range(lo, hi))
    assert DensitySchedule.from_dict(e.to_dict()).grids == e.grids


def test_pair_grids():
    """Any grid per stage (a side, a pair, "GhxGw"); checkpoints keep a square grid as its side."""
    s = DensitySchedule(["8x6", (4, 4), 3], num_timesteps=9, token_grid=(16, 10))
    assert s.grids == ((8, 6), (4, 4), (3, 3)) and s.grid(0) == (8, 6) and s.grid(torch.tensor([3, 4])) == (4, 4)
    assert s.to_dict()["grids"] == [[8, 6], 4, 3] and DensitySchedule.from_dict(s.to_dict()).grids == s.grids
    assert DensitySchedule.fixed("2x3").grids == ((2, 3),) and "grids=(8x6, 4x4, 3x3)" in repr(s)
    with pytest.raises(ValueError, match="grids 8x12 is larger than the token grid 16x10"):
        DensitySchedule([(8, 12)], token_grid=(16, 10))
    with pytest.raises(ValueError, match=r"different grids \['4x4', '8x6'\]"):
        s.grid(torch.tensor([0, 4]))


def test_tensor_queries():
    s = DensitySchedule.from_rates(0.61, 0.86, 16)
    assert s.grid(torch.tensor([300, 301, 499])) == (9, 9)
    assert s.stage(torch.tensor([0, 250, 999])).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="stages"):
        s.grid(torch.tensor([10, 900]))
    with pytest.raises(ValueError, match="t must lie"):
        s.grid(1000)
    with pytest.raises(ValueError, match="t must lie"):
        s.stage(torch.tensor([-1]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(r_min=-0.1, r_max=0.5), "r_min"),
    (dict(r_min=0.1, r_max=1.0), "r_max"),
    (dict(r_min=0.8, r_max=0.5), "r_min"),
    (dict(r_min=0.0, r_max=0.5), None),  # r = 0 at N = 256 is G = 16: fits exactly
])
def test_rate_validation(kwargs, name):
    if name is None:
        assert DensitySchedule.from_rates(token_grid=16, **kwargs).grids[0] == (16, 16)
        return
    with pytest.raises(ValueError, match=name):
        DensitySchedule.from_rates(token_grid=16, **kwargs)


def test_grid_validation():
    with pytest.raises(ValueError, match="grids"):
        DensitySchedule.fixed(17, token_grid=16)
    with pytest.raises(ValueError, match="grids"):
        DensitySchedule([8, 12], token_grid=(16, 10))  # non-square token grid: G <= min(h, w)
    with pytest.raises(ValueError, match="grids"):
        DensitySchedule([0])
    with pytest.raises(ValueError, match="r_min"):
        DensitySchedule.from_rates(0.0, 0.5, (16, 10))   # G = 13 > 10
    with pytest.raises(ValueError, match="stage"):
        DensitySchedule.fixed(4).stage_interval(1)


def test_sample_timesteps_uniform_and_seeded():
    s = DensitySchedule.from_rates(0.61, 0.86, 16)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    all_t = []
    for _ in range(2000):
        k, t = s.sample_timesteps(8, generator=g)
        lo, hi = s.stage_interval(k)
        assert ((t >= lo) & (t < hi)).all()
        assert s.grid(t) == s.grids[k]
        counts[k] += 1
        all_t.append(t)
    assert (counts / counts.sum() - 0.25).abs().max() < 0.04
    all_t = torch.cat(all_t)
    assert abs(all_t.float().mean().item() - 499.5) < 10
    a = DensitySchedule.fixed(4).sample_timesteps(4, torch.Generator().manual_seed(3))
    b = DensitySchedule.fixed(4).sample_timesteps(4, torch.Generator().manual_seed(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
