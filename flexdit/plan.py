"""FlexDiT's layer plan (arXiv 2412.06028): P Poolingformers, K Sparse-Dense Token Modules of (g, s, r, d) layers and
T dense top layers, with the sparse grid. One `Plan` is held by every model config and every patch; `parse_grid` is
the one grid parser."""
import dataclasses
from dataclasses import dataclass
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from flexdit_kernels._validate import pair

GridLike = Union[int, str, Sequence[int]]

DEFAULT_GRID = 8

# Decided layer plans by depth (P, K, (g, s, r, d), T): DiT-XL (28), DiT-L (24), DiT-S and DiT-B (12); the MMDiT
# hosts FLUX.1 (19 double- + 38 single-stream blocks: 57), SD3.5-large (38) and SD3 / SD3.5-medium (24, as DiT-L).
DECIDED_PLANS = {
    28: dict(num_pool=2, num_modules=4, group=(1, 3, 1, 1), num_top=2),
    24: dict(num_pool=2, num_modules=4, group=(1, 2, 1, 1), num_top=2),
    12: dict(num_pool=1, num_modules=2, group=(1, 2, 1, 1), num_top=1),
    57: dict(num_pool=2, num_modules=4, group=(1, 8, 1, 3), num_top=3),
    38: dict(num_pool=2, num_modules=4, group=(1, 4, 1, 2), num_top=4),
}


def parse_grid(value: GridLike, token_grid: Optional[Tuple[int, int]] = None, name: str = "grid") -> Tuple[int, int]:
    """A sparse grid (G_h, G_w) from an int G, a pair, or a string "G" / "GhxGw"; with `token_grid` (h, w), also
    checks that it fits (1 <= G_h <= h, 1 <= G_w <= w). Raises ValueError naming `name`."""
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        try:
            if len(parts) > 2:
                raise ValueError
            value = tuple(int(p) for p in parts) if len(parts) == 2 else int(parts[0])
        except ValueError:
            raise ValueError(f"{name} must look like 8 or 8x6, got {value!r}") from None
    gh, gw = pair(name, value)
    if token_grid is not None:
        h, w = token_grid
        if gh > h or gw > w:
            raise ValueError(f"{name} {gh}x{gw} is larger than the token grid {h}x{w}")
    return gh, gw


def format_grid(grid: Optional[GridLike]) -> str:
    """A grid as printed, "GhxGw" ("8x8", "8x6"); None (no sparse grid: a dense model, or the model's own) as "-"."""
    return "-" if grid is None else "x".join(map(str, parse_grid(grid)))


def default_grid(token_grid: Tuple[int, int]) -> Tuple[int, int]:
    """The 8x8 sparse grid, clamped to the token grid."""
    return min(DEFAULT_GRID, token_grid[0]), min(DEFAULT_GRID, token_grid[1])


class Slot(NamedTuple):
    """Where a layer stands in the plan: its kind, its module (None outside the middle segment), whether it is the
    module's first layer (it pools the dense tokens) and whether it is the module's first recovery layer."""
    kind: str
    module: Optional[int] = None
    starts_module: bool = False
    first_recover: bool = False


@dataclass(frozen=True)
class Plan:
    """P Poolingformers, K x (g, s, r, d) modules, T top blocks, and the default sparse grid (G_h, G_w)."""

    num_pool: int = 2
    num_modules: int = 4
    group: Tuple[int, int, int, int] = (1, 3, 1, 1)
    num_top: int = 2
    grid: Tuple[int, int] = (DEFAULT_GRID, DEFAULT_GRID)

    def __post_init__(self):
        try:
            group = tuple(int(v) for v in self.group)
        except (TypeError, ValueError):
            group = ()
        if len(group) != 4 or min(group) < 0:
            raise ValueError(f"group must be four non-negative ints (g, s, r, d), got {self.group!r}")
        for name in ("num_pool", "num_modules", "num_top"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.num_modules and group[2] < 1:
            raise ValueError(f"group needs at least one recovery block (r >= 1), got {group}")
        object.__setattr__(self, "group", group)
        object.__setattr__(self, "grid", parse_grid(self.grid))

    @classmethod
    def for_depth(cls, depth: int, token_grid: Tuple[int, int] = (DEFAULT_GRID, DEFAULT_GRID), **overrides) -> "Plan":
        """The decided plan for a depth (`DECIDED_PLANS`), grid 8x8 clamped to the token grid; `overrides` replace
        fields."""
        if depth not in DECIDED_PLANS and not {"num_pool", "num_modules", "num_top"} <= set(overrides):
            raise ValueError(f"no decided FlexDiT plan for depth {depth} (known: {sorted(DECIDED_PLANS)}); "
                             f"pass plan=Plan(num_pool, num_modules, group, num_top, grid)")
        return cls(**{**DECIDED_PLANS.get(depth, {}), "grid": default_grid(token_grid), **overrides})

    @classmethod
    def dense(cls, depth: int) -> "Plan":
        """All `depth` layers dense: FlexDiT reduces to the host model."""
        return cls(num_pool=0, num_modules=0, num_top=depth)

    @classmethod
    def coerce(cls, plan: Any, depth: int, token_grid: Tuple[int, int]) -> "Plan":
        """A Plan from None (the decided plan for `depth`), a Plan, an object holding one (`.plan`, e.g. a config)
        or a dict of Plan fields (missing ones from the decided plan); checked against `depth` and `token_grid`."""
        if plan is None:
            plan = cls.for_depth(depth, token_grid)
        elif isinstance(getattr(plan, "plan", None), Plan):
            plan = plan.plan
        elif isinstance(plan, Mapping):
            unknown = set(plan) - set(PLAN_FIELDS)
            if unknown:
                raise ValueError(f"plan has unknown keys {sorted(unknown)}; expected {PLAN_FIELDS}")
            plan = cls.for_depth(depth, token_grid, **plan)
        elif not isinstance(plan, Plan):
            raise ValueError(f"plan must be a Plan, a config holding one or a dict of {PLAN_FIELDS}, "
                             f"got {type(plan).__name__}")
        plan.check(depth, token_grid)
        return plan

    @property
    def depth(self) -> int:
        return self.num_pool + self.num_modules * sum(self.group) + self.num_top

    def sparse_grid(self, grid: Optional[GridLike], token_grid: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        """The sparse grid of one forward: `grid` (None: the plan's), checked against the token grid; None when the
        plan has no Sparse-Dense Token Module (nothing is pooled)."""
        return parse_grid(self.grid if grid is None else grid, token_grid) if self.num_modules else None

    def check(self, depth: int, token_grid: Tuple[int, int]) -> None:
        """The plan has `depth` layers and its grid fits the token grid."""
        if self.depth != depth:
            raise ValueError(f"layer plan P={self.num_pool} + K={self.num_modules} x {self.group} + "
                             f"T={self.num_top} = {self.depth} layers, but depth is {depth}")
        if self.num_modules:
            parse_grid(self.grid, token_grid)

    def layer_kinds(self) -> List[str]:
        """Kind of each layer, in order: pool, then K x (gen, sparse, recover, dense), then dense (top)."""
        return [slot.kind for slot in self.slots()]

    def slots(self) -> List[Slot]:
        """The `Slot` of every layer, in order."""
        g, s, r, d = self.group
        module = ["gen"] * g + ["sparse"] * s + ["recover"] * r + ["dense"] * d
        out = [Slot("pool") for _ in range(self.num_pool)]
        for k in range(self.num_modules):
            out += [Slot(kind, k, j == 0, j == g + s) for j, kind in enumerate(module)]
        return out + [Slot("dense") for _ in range(self.num_top)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self):
        gh, gw = self.grid
        return (f"P={self.num_pool}, K={self.num_modules} x (g, s, r, d)={self.group}, T={self.num_top}, "
                f"grid={gh if gh == gw else f'{gh}x{gw}'}")


PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(Plan))


def split_plan_fields(kwargs: Mapping[str, Any]) -> Tuple[dict, dict]:
    """(Plan fields, the rest) of a flat keyword dict such as a command line's or an old checkpoint's config."""
    return ({k: v for k, v in kwargs.items() if k in PLAN_FIELDS},
            {k: v for k, v in kwargs.items() if k not in PLAN_FIELDS})
