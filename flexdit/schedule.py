"""Temporal token density: which sparse grid (G_h, G_w) a FlexDiT uses at diffusion timestep t (arXiv 2412.06028).

The timestep range [0, T) is cut into S equal stages (stage 0 holds the clean end t < T/S, stage S-1 the noisy
end). Stage k has a constant pruning rate r_k = r_min + k/(S-1)·(r_max − r_min) and grid side
G_k = round(√(N·(1 − r_k))), so the noisiest steps run on the fewest sparse tokens: the square grid G_k×G_k. An
explicit schedule may name any grid per stage (G or "GhxGw", as `flexdit.parse_grid` reads them).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from flexdit_kernels._validate import pair

from .plan import GridLike, format_grid, parse_grid

__all__ = ["DensitySchedule", "one_grid"]


def one_grid(grids: torch.Tensor) -> tuple[int, int]:
    """The one grid (G_h, G_w) of a batch from its per-sample grids, (B, 2), or square sides, (B,); ValueError when
    the batch selects several (one forward pass runs one grid, so a batch must stay inside one stage)."""
    values = torch.unique(grids if grids.dim() == 2 else grids.reshape(-1, 1).expand(-1, 2), dim=0)
    if values.shape[0] != 1:
        raise ValueError(f"timesteps of one batch select different grids "
                         f"{['x'.join(map(str, v)) for v in values.tolist()]} (stages of the density schedule); "
                         "FlexDiT runs one grid per forward, so a batch must stay inside one stage")
    gh, gw = values[0].tolist()
    return int(gh), int(gw)


class DensitySchedule:
    """Maps a timestep t in [0, num_timesteps) to a sparse grid (G_h, G_w), one constant grid per stage.

    Build it with `DensitySchedule.from_rates(r_min, r_max, token_grid)` (the decided 4-stage rule),
    `DensitySchedule(grids)` (explicit per-stage grids, stage 0 = least noisy) or `DensitySchedule.fixed(G)`.

    Args:
        grids: the sparse grid of each stage, stage 0 first (t < T/S): a side G (the square grid G×G), a pair
            (G_h, G_w) or a string "G" / "GhxGw" each; one int or string is a one-stage schedule.
        num_timesteps: T, the number of ORIGINAL diffusion steps (1000 for DiT); a respaced sampler must query
            with the original timestep, not its spaced index.
        token_grid: the dense token grid (h, w) or its side, used only to check that every grid fits.
    """

    def __init__(self, grids: Sequence[GridLike] | GridLike, num_timesteps: int = 1000, token_grid=None):
        if isinstance(grids, (int, str)):
            grids = [grids]
        self.token_grid = None if token_grid is None else pair("token_grid", token_grid)
        self.grids: tuple[tuple[int, int], ...] = tuple(parse_grid(g, self.token_grid, "grids") for g in grids)
        if len(self.grids) == 0:
            raise ValueError("grids must name at least one stage")
        if num_timesteps < len(self.grids):
            raise ValueError(f"num_timesteps ({num_timesteps}) must be at least the number of stages "
                             f"({len(self.grids)})")
        self.num_timesteps = int(num_timesteps)
        self.rates: tuple[float, ...] | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Constructors
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_rates(cls, r_min: float, r_max: float, token_grid, num_stages: int = 4,
                   num_timesteps: int = 1000) -> "DensitySchedule":
        """The decided rule: S equal stages, r_k = r_min + k/(S-1)·(r_max − r_min), G_k = round(√(N·(1 − r_k))).

        `token_grid` is the dense token grid (h, w) or its side; N = h·w. r is a pruning rate in [0, 1).
        """
        for name, r in (("r_min", r_min), ("r_max", r_max)):
            if not (0.0 <= float(r) < 1.0):
                raise ValueError(f"{name} must be a pruning rate in [0, 1), got {r}")
        if r_min > r_max:
            raise ValueError(f"r_min ({r_min}) must not exceed r_max ({r_max})")
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        h, w = pair("token_grid", token_grid)
        n = h * w
        if num_stages == 1:
            rates = [float(r_min)]
        else:
            rates = [r_min + (k / (num_stages - 1)) * (r_max - r_min) for k in range(num_stages)]
        # max(1, ·): a rate close to 1 on a small grid would round to 0 tokens
        grids = [max(1, round(math.sqrt(n * (1.0 - r)))) for r in rates]
        if max(grids) > min(h, w):
            raise ValueError(f"r_min ({r_min}) gives grid side {max(grids)}, larger than the token grid {h}x{w}; "
                             "square sparse grids need G <= min(h, w)")
        sched = cls(grids, num_timesteps=num_timesteps, token_grid=(h, w))
        sched.rates = tuple(float(r) for r in rates)
        return sched

    @classmethod
    def fixed(cls, grid: GridLike, num_timesteps: int = 1000, token_grid=None) -> "DensitySchedule":
        """One grid for every timestep (the r_min = r_max special case)."""
        return cls([grid], num_timesteps=num_timesteps, token_grid=token_grid)

    def to_dict(self) -> dict:
        """Plain-Python form for checkpoints (loadable with weights_only=True); a square grid is written as its side,
        another as [G_h, G_w]."""
        return {"grids": [gh if gh == gw else [gh, gw] for gh, gw in self.grids], "num_timesteps": self.num_timesteps,
                "token_grid": list(self.token_grid) if self.token_grid else None,
                "rates": list(self.rates) if self.rates else None}

    @classmethod
    def from_dict(cls, d: dict) -> "DensitySchedule":
        sched = cls(d["grids"], num_timesteps=d["num_timesteps"], token_grid=d.get("token_grid"))
        if d.get("rates"):
            sched.rates = tuple(d["rates"])
        return sched

    # ------------------------------------------------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.grids)

    @property
    def stages(self) -> range:
        return range(len(self.grids))

    def stage_interval(self, k: int) -> tuple[int, int]:
        """The timesteps of stage k as a half-open range [lo, hi): all integer t with floor(t·S/T) = k."""
        if not 0 <= k < self.num_stages:
            raise ValueError(f"stage k must be in [0, {self.num_stages}), got {k}")
        s, n_t = self.num_stages, self.num_timesteps
        return -(-k * n_t // s), -(-(k + 1) * n_t // s)

    def stage(self, t):
        """Stage index of timestep t (int, or tensor → tensor of stage indices). t must lie in [0, T)."""
        if isinstance(t, torch.Tensor):
            tl = t.long()
            if tl.numel() and (int(tl.min()) < 0 or int(tl.max()) >= self.num_timesteps):
                raise ValueError(f"t must lie in [0, {self.num_timesteps}), got values in "
                                 f"[{int(tl.min())}, {int(tl.max())}]")
            return torch.div(tl * self.num_stages, self.num_timesteps, rounding_mode="floor")
        t = int(t)
        if not 0 <= t < self.num_timesteps:
            raise ValueError(f"t must lie in [0, {self.num_timesteps}), got {t}")
        return t * self.num_stages // self.num_timesteps

    def grid(self, t) -> tuple[int, int]:
        """The sparse grid (G_h, G_w) for timestep t: an int, or a tensor whose entries all select one grid
        (`one_grid`)."""
        k = self.stage(t)
        if isinstance(k, torch.Tensor):
            return one_grid(torch.tensor(self.grids, device=k.device)[k.reshape(-1)])
        return self.grids[k]

    def sample_stage(self, generator: torch.Generator | None = None) -> int:
        """Draw a stage with probability proportional to its length, so that t stays uniform over [0, T)."""
        lengths = torch.tensor([hi - lo for lo, hi in map(self.stage_interval, self.stages)], dtype=torch.float64)
        return int(torch.multinomial(lengths, 1, generator=generator))

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         stage: int | None = None) -> tuple[int, torch.Tensor]:
        """One training step's draw: a stage (unless given), then `batch_size` t uniform inside it. → (k, t)."""
        k = self.sample_stage(generator) if stage is None else int(stage)
        lo, hi = self.stage_interval(k)
        t = torch.randint(lo, hi, (batch_size,), generator=generator)
        return k, t

    def __repr__(self) -> str:
        rates = f", rates={tuple(round(r, 4) for r in self.rates)}" if self.rates else ""
        grids = ", ".join(map(format_grid, self.grids))
        return f"DensitySchedule(grids=({grids}), num_timesteps={self.num_timesteps}{rates})"

