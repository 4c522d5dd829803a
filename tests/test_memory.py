"""flexdit.memory: the per-GPU memory plan on toy modules (exact saved bytes) and tiny FLUX / PixArt-α hosts."""
import pytest
import torch
import torch.nn as nn

from flexdit import Plan, apply_patch
from flexdit.memory import format_memory_plan, memory_plan, saved_activation_bytes


class Toy(nn.Module):
    """Two MLP blocks and a head, the layout the plan walks (`blocks`)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)) for _ in range(2))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 48)])

    def forward(self, x):
        q, k, v = self.blocks[0](x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v)


def test_saved_bytes_are_exact_on_a_toy():
    x = torch.zeros(1, 8, device="meta")
    saved = saved_activation_bytes(Toy().to("meta"), {"x": x})
    # each block keeps its input (first Linear), the GELU input and the second Linear's input: 8 + 16 + 16 floats
    assert saved["blocks"] == [160, 160] and saved["outside"] == 32 and saved["total"] == 352
    assert saved["block_inputs"] == 64                       # x and block 0's output
    plan = memory_plan(Toy(), world_size=1, batch_size=3, precision="fp32", sample_inputs={"x": torch.zeros(1, 8)})
    assert plan["activations_per_sample"] == {"full": 352, "checkpointed": 32 + 64 + 160}
    assert plan["bytes"]["activations"] == 3 * 352
    n = sum(p.numel() for p in Toy().parameters())
    assert plan["parameters"] == plan["trainable_parameters"] == n
    assert plan["bytes"]["weights"] == 4 * n and plan["bytes"]["optimizer"] == 8 * n
    assert plan["bytes"]["compute_copies"] == 0                  # fp32 on one GPU: no casts, no gathers


def test_bytes_follow_the_stored_dtypes_and_the_layout():
    inputs = {"x": torch.zeros(1, 8)}
    n = sum(p.numel() for p in Toy().parameters())
    block = sum(p.numel() for p in Toy().blocks[0].parameters())
    ddp = memory_plan(Toy(), world_size=2, batch_size=1, precision="bf16", sample_inputs=inputs)
    assert ddp["bytes"]["compute_copies"] == 2 * n               # autocast's bf16 copies of the fp32 weights
    assert ddp["bytes"]["gradients"] == 2 * 4 * n                # DDP's buckets hold a second copy
    half = memory_plan(Toy().to(torch.bfloat16), world_size=2, batch_size=1, precision="bf16", sample_inputs=inputs)
    assert half["bytes"]["weights"] == 2 * n and half["bytes"]["optimizer"] == 4 * n
    assert half["bytes"]["compute_copies"] == 0
    fsdp = memory_plan(Toy(), world_size=2, batch_size=1, precision="fp32", fsdp=True, sample_inputs=inputs)
    assert fsdp["bytes"]["compute_copies"] == 2 * 4 * block      # two unsharded blocks
    assert fsdp["bytes"]["weights"] == 4 * n / 2


def test_attention_keeps_no_attention_weights():
    def per_sample(length):
        return saved_activation_bytes(Attention().to("meta"), {"x": torch.zeros(1, length, 16, device="meta")})["total"]
    assert per_sample(512) <= 2.1 * per_sample(256)         # linear in L: q, k, v, out, log-sum-exp, not L x L


@pytest.fixture(scope="module")
def flux():
    pytest.importorskip("diffusers")
    from flexdit.mmdit import TINY_CONFIGS, build_mmdit_pair
    plan = Plan(num_pool=1, num_modules=1, group=(1, 2, 1, 1), num_top=0, grid=4)     # 6 layers
    config = dict(TINY_CONFIGS["flux"], num_layers=2, num_single_layers=4)
    return build_mmdit_pair("flux", 128, "meta", plan=plan, config_overrides=config)


def test_plan_on_tiny_flux_is_consistent(flux):
    dense, patched, make_inputs = flux

    def plan(model=patched, **kw):
        return memory_plan(model, **{"world_size": 4, "batch_size": 2, "precision": "bf16",
                                     "sample_inputs": make_inputs, **kw})
    full = plan()
    assert all(v > 0 for k, v in full["bytes"].items() if k != "ema") and full["total_bytes"] > 0
    act = full["activations_per_sample"]
    assert 0 < act["checkpointed"] < act["full"]
    assert plan(checkpointing=True)["bytes"]["activations"] == 2 * act["checkpointed"]
    assert plan(batch_size=4)["bytes"]["activations"] == 2 * full["bytes"]["activations"]
    sharded = plan(fsdp=True)
    for k in ("weights", "optimizer"):
        assert sharded["bytes"][k] == pytest.approx(full["bytes"][k] / 4, abs=1)
    assert sharded["bytes"]["gradients"] == pytest.approx(full["bytes"]["gradients"] / 8, abs=1)   # no DDP buckets
    lora = plan(lora_rank=4)
    assert lora["parameters"] > full["parameters"] and lora["trainable_parameters"] < full["trainable_parameters"] / 5
    assert lora["bytes"]["optimizer"] == 8 * lora["trainable_parameters"]
    assert lora["bytes"]["gradients"] < full["bytes"]["gradients"] / 5
    # FlexDiT's sparse layers keep fewer activations than the dense host
    assert act["full"] < plan(dense)["activations_per_sample"]["full"]
    text = format_memory_plan(lora)
    assert "LoRA rank 4" in text and "total per GPU" in text and "trainable" in text
    assert not any("lora_" in n for n, _ in patched.named_parameters())    # the model is left as it was


def test_real_weights_are_left_untouched_and_bad_arguments_refused():
    pytest.importorskip("diffusers")
    from .test_patch import TOY_PLAN, caption, tiny_pixart
    host = apply_patch(tiny_pixart(), TOY_PLAN)
    before = {k: v.clone() for k, v in host.state_dict().items()}
    text, mask = caption(1)
    inputs = dict(hidden_states=torch.zeros(1, 4, 16, 16), encoder_hidden_states=text, encoder_attention_mask=mask,
                  timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    plan = memory_plan(host, world_size=1, batch_size=1, precision="fp32", sample_inputs=inputs,
                       checkpointing=True)
    assert plan["activations_per_sample"]["checkpointed"] < plan["activations_per_sample"]["full"]
    host.gradient_checkpointing = True          # the host's own switch changes nothing in the measurement
    assert memory_plan(host, world_size=1, batch_size=1, precision="fp32", sample_inputs=inputs,
                       checkpointing=True)["activations_per_sample"] == plan["activations_per_sample"]
    host.gradient_checkpointing = False
    assert all(torch.equal(v, host.state_dict()[k]) for k, v in before.items())
    assert {p.device.type for p in host.parameters()} == {"cpu"}
    for kw, message in ((dict(world_size=0), "world_size must be a positive int"),
                        (dict(batch_size=1.5), "batch_size must be a positive int"),
                        (dict(precision="fp8"), "precision must be one of"),
                        (dict(lora_rank=0), "lora_rank must be a positive int"),
                        (dict(sample_inputs=None), "sample_inputs")):
        args = {"world_size": 1, "batch_size": 1, "precision": "fp32", "sample_inputs": inputs, **kw}
        with pytest.raises(ValueError, match=message):
            memory_plan(host, **args)
