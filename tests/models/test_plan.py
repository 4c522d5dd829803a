"""One Plan, one grid parser, one router: every host runs the same layer-kind code."""
import importlib

import pytest
import torch

import flexdit
import flexdit_kernels as fk
from flexdit.plan import Plan, Slot, parse_grid, split_plan_fields
from flexdit.router import FlexLayer

from .helpers import TOY, toy_config


@pytest.mark.parametrize("value, expected", [(8, (8, 8)), ((3, 5), (3, 5)), ([4, 2], (4, 2)), ("6", (6, 6)),
                                             ("6x4", (6, 4)), ("6,4", (6, 4))])
def test_parse_grid_forms(value, expected):
    assert parse_grid(value) == expected


def test_parse_grid_fits_the_token_grid():
    assert parse_grid("8x6", (8, 8)) == (8, 6) and parse_grid((2, 3), (4, 4)) == (2, 3)


@pytest.mark.parametrize("value, message", [("six", "grid must look like"), (0, "grid must be positive"),
                                            ((2, 3, 4), "grid must be an int or a pair"), (True, "grid must be"),
                                            (9, "grid 9x9 is larger than the token grid 8x8"),
                                            ("4x9", "grid 4x9 is larger than the token grid 8x8"),
                                            ("ax8", "grid must look like"), ("8x6x4", "grid must look like")])
def test_parse_grid_refuses(value, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(value, (8, 8))


def test_plan_slots_and_validation():
    plan = Plan(1, 2, (1, 2, 1, 1), 1, grid=4)
    assert plan.depth == 12 and plan.grid == (4, 4) and str(plan).endswith("grid=4")
    slots = plan.slots()
    assert [s.kind for s in slots] == plan.layer_kinds() == (
        ["pool"] + ["gen", "sparse", "sparse", "recover", "dense"] * 2 + ["dense"])
    assert slots[1] == Slot("gen", 0, True, False) and slots[4] == Slot("recover", 0, False, True)
    assert slots[6] == Slot("gen", 1, True, False) and slots[11] == Slot("dense")
    for bad, message in ((dict(group=(1, 3, 0, 1)), "recovery"), (dict(group=(1, 2)), "four non-negative"),
                         (dict(num_pool=-1), "num_pool"), (dict(num_top=1.5), "num_top")):
        with pytest.raises(ValueError, match=message):
            Plan(**{**plan.to_dict(), **bad})
    with pytest.raises(ValueError, match="but depth is 6"):
        plan.check(6, (8, 8))
    with pytest.raises(ValueError, match="larger than the token grid"):
        Plan(1, 2, (1, 2, 1, 1), 1, grid=9).check(12, (8, 8))


def test_plan_coerce_and_decided_plans():
    assert Plan.coerce(None, 28, (4, 4)) == Plan(2, 4, (1, 3, 1, 1), 2, (4, 4))
    assert Plan.coerce({"grid": 6}, 12, (16, 16)) == Plan(1, 2, (1, 2, 1, 1), 1, 6)
    assert Plan.coerce(toy_config(), 6, (8, 8)) == toy_config().plan
    with pytest.raises(ValueError, match="no decided FlexDiT plan for depth 6"):
        Plan.coerce(None, 6, (8, 8))
    with pytest.raises(ValueError, match="unknown keys"):
        Plan.coerce({"pool": 1}, 28, (8, 8))
    with pytest.raises(ValueError, match="must be a Plan"):
        Plan.coerce(3, 28, (8, 8))


def test_every_config_holds_one_plan():
    cfg = toy_config()
    assert isinstance(cfg.plan, Plan) and cfg.layer_kinds() == cfg.plan.layer_kinds()
    nested, flat = cfg.to_dict(), {**TOY, **cfg.plan.to_dict()}
    assert flexdit.FlexDiTConfig.from_dict(nested) == cfg == flexdit.FlexDiTConfig.from_dict(flat)
    small = flexdit.FlexDiTConfig(depth=12, hidden_size=64, num_heads=2)
    assert small.plan == Plan.for_depth(12, small.token_grid)
    assert flexdit.flexdit_config("DiT-S/2", grid=(4, 2)).plan.grid == (4, 2)
    with pytest.raises(ValueError, match="or plan=, not both"):
        flexdit.flexdit_config("DiT-S/2", plan=Plan(1, 2, (1, 2, 1, 1), 1), grid=4)
    assert split_plan_fields({"grid": 3, "depth": 6}) == ({"grid": 3}, {"depth": 6})


def test_every_host_runs_the_one_router():
    """The layer kinds are written once, in FlexLayer; hosts only add conditioning hooks."""
    diffusers = pytest.importorskip("diffusers")
    from flexdit.patch import DiffusersFlexLayer
    from flexdit.models import DiTBlock
    for host in (DiTBlock, DiffusersFlexLayer):   # DiffusersFlexLayer serves the diffusers DiT, PixArt-α and Latte
        assert issubclass(host, FlexLayer)
        for kind in ("route", "pool", "generate", "recover", "finish", "residual"):
            assert getattr(host, kind) is getattr(FlexLayer, kind), (host.__name__, kind)
    flex = flexdit.FlexDiT(toy_config())
    assert all(isinstance(b, FlexLayer) and b._state is flex.route_state for b in flex.blocks)
    assert diffusers is not None


def test_kernel_package_exposes_ops_and_keeps_modules_importable():
    homes = {"layernorm_modulate": "adaln", "gated_residual": "adaln"}     # the adaLN ops share one kernel family
    for op in ("attention", "token_pool", "token_mean", "upsample_add", "layernorm_modulate", "gated_residual"):
        assert callable(getattr(fk, op))
        module = importlib.import_module(f"flexdit_kernels._{homes.get(op, op)}")
        assert getattr(module, op) is getattr(fk, op)
        assert callable(getattr(module, f"{op}_ref"))


def test_layer_outside_its_model_is_refused():
    flex = flexdit.FlexDiT(toy_config())
    gen = flex.blocks[1]
    with pytest.raises(ValueError, match="runs only inside its model's forward"):
        gen(torch.randn(2, 64, TOY["hidden_size"]), torch.randn(2, TOY["hidden_size"]))
