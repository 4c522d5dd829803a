"""Toy-size models shared by the model tests."""
import torch

import flexdit

TOY = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, num_classes=10)


def randomize_(model, std=0.05, seed=0):
    """Random weights everywhere (DiT's adaLN-Zero init would make every block the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def toy_dit(**overrides):
    return randomize_(flexdit.DiT(**{**TOY, **overrides})).eval()


TOY_PLAN = dict(num_pool=1, num_modules=1, group=(1, 2, 1, 1), num_top=0, grid=3)


def toy_config(**overrides):
    """A toy FlexDiTConfig; plan fields in `overrides` replace those of TOY_PLAN."""
    plan, rest = flexdit.plan.split_plan_fields(overrides)
    return flexdit.FlexDiTConfig(**{**TOY, **rest}, plan=flexdit.Plan(**{**TOY_PLAN, **plan}))


def toy_inputs(batch=2, size=(16, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y
