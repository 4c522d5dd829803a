"""CONTRIBUTING.md's checklists, checked: every exported op and every host has each place it must have."""
import inspect
import os
import re

import flexdit_kernels as fk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = sorted(name for name in fk.__all__ if f"{name}_ref" in fk.__all__)


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_the_ops_are_the_eight():
    assert OPS == sorted(["attention", "gated_residual", "gated_residual_layernorm_modulate", "layernorm_modulate",
                          "silu", "token_mean", "token_pool", "upsample_add"])


def test_every_op_has_a_backward_reference():
    missing = [op for op in OPS if f"{op}_backward_ref" not in fk.__all__]
    assert not missing, f"ops without an exported <op>_backward_ref: {missing}"


def test_every_op_has_a_bench_case():
    from bench import kernels
    assert sorted(kernels.OPS) == OPS
    missing = [op for op in OPS if not callable(getattr(kernels, f"torch_{op}", None))]
    assert not missing, f"ops without torch_<op> in bench/kernels.py: {missing}"


def test_every_op_has_a_guarded_test_module():
    files = os.listdir(os.path.join(ROOT, "tests", "kernels"))
    for op in OPS:
        assert f"test_{op}.py" in files, f"tests/kernels/test_{op}.py is missing"
        mine = [f for f in (f"test_{op}.py", f"test_{op}_guard.py") if f in files]
        assert any("guard" in _read("tests", "kernels", f) for f in mine), f"no guard-buffer test for {op}"


def test_every_op_is_counted_by_the_flop_counter():
    source = _read("flexdit", "flops.py")
    missing = [op for op in OPS if f'"flexdit::{op}"' not in source]
    assert not missing, f"flexdit/flops.py has no entry for {missing}"


def test_every_op_is_documented():
    doc = _read("docs", "kernels.md")
    missing = [op for op in OPS if f"`{op}" not in doc and f"{op}(" not in doc]
    assert not missing, f"docs/kernels.md does not describe {missing}"


def test_every_diffusers_host_has_a_bench_target_and_a_readme_row():
    from bench.fixtures import TARGETS
    from flexdit import patch
    hosts = sorted(t for t in patch._TARGETS if t != "dit")          # "dit": the native layout, bench's default
    assert sorted(set(hosts) - set(TARGETS)) == [], "hosts without a bench/fixtures.py target"
    readme = _read("README.md")
    names = re.findall(r"(\w+(?:Transformer2DModel|Transformer3DModel))", inspect.getsource(patch._target_of))
    missing = [n for n in names if n not in readme]
    assert not missing, f"README's supported-models table lacks {missing}"
