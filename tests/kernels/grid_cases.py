"""The dense-grid / sparse-grid cases shared by the token_pool and upsample_add kernel tests."""
import pytest
import torch

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]

# (B, (h, w), (G_h, G_w), C): divisible, non-divisible, overlapping windows, non-square, identity (M = N), G = 1
# (M = 1), N not a power of two; C = 40 (one partial channel block), 200 (a whole block of 128 and a tail of 72),
# 1152 (nine whole blocks, no channel mask).
CASES = [
    (3, (16, 16), (6, 6), 40),
    (1, (16, 16), (8, 8), 40),
    (1, (16, 16), (10, 10), 40),
    (1, (32, 32), (8, 8), 40),
    (1, (32, 32), (10, 10), 40),
    (1, (32, 32), (20, 20), 40),
    (3, (12, 20), (5, 7), 40),
    (1, (12, 20), (12, 20), 40),
    (3, (16, 16), (1, 1), 40),
    (1, (8, 8), (3, 3), 1152),
    (2, (7, 9), (3, 4), 200),
]
# Every case in fp32; fp16 on the awkward ones only, to keep the interpreter run short.
FP16_CASES = {0, 6, 9, 10}
# ((h, w), (G_h, G_w)) at which the references meet PyTorch's own pooling and upsampling.
REF_GRIDS = [((16, 16), (6, 6)), ((16, 16), (10, 10)), ((32, 32), (10, 10)), ((32, 32), (8, 8)), ((12, 20), (5, 7)),
             ((16, 16), (16, 16)), ((16, 16), (1, 1)), ((7, 13), (4, 9))]


def kernel_params(ids):
    """pytest params (case, dtype, atol, rtol), named by `ids(case)` and the dtype."""
    return [pytest.param(case, *dt, id=f"{ids(case)}-{str(dt[0])[6:]}")
            for k, case in enumerate(CASES) for dt in DTYPES if dt[0] == torch.float32 or k in FP16_CASES]


def patch_sm_count(monkeypatch, sms: int) -> None:
    """Make the launchers size their grids for a device of `sms` SMs (0: no grid is too small, runs are longest)."""
    from flexdit_kernels import _launch
    limits = _launch.device_limits(None)._replace(sm_count=sms)
    monkeypatch.setattr(_launch, "device_limits", lambda device=None: limits)
