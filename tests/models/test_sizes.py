"""One size x host table: every registry is read off `ModelArgs`."""
import pytest

import flexdit
from flexdit import ModelArgs
from flexdit.sizes import SIZES, names


def test_from_name_and_the_registries_read_off_it():
    xl = ModelArgs.from_name("DiT-XL/2")
    assert ModelArgs.from_name("FlexDiT-XL/2") is xl and xl.host == "dit"
    assert flexdit.DiT_models["DiT-XL/2"] == xl.dit_kwargs() == dict(patch_size=2, depth=28, hidden_size=1152,
                                                                     num_heads=16)
    assert sorted(flexdit.DiT_models) == sorted(names("dit")) and len(flexdit.FlexDiT_models) == 12
    assert flexdit.flexdit_config("FlexDiT-S/4").hidden_size == 384
    from flexdit.mmdit import MMDIT_SIZES
    from flexdit.video import LATTE_XL
    assert LATTE_XL == ModelArgs.from_name("Latte-XL/2").diffusers_config()
    assert LATTE_XL["attention_head_dim"] == 72 and LATTE_XL["num_layers"] == 28
    assert MMDIT_SIZES["FLUX.1-dev"] == ("flux", dict(guidance_embeds=True), 512)
    assert set(MMDIT_SIZES) == {n for n, a in SIZES.items() if a.host in ("flux", "sd3")}
    pixart = ModelArgs.from_name("PixArt-XL/2").diffusers_config()
    assert pixart["num_attention_heads"] * pixart["attention_head_dim"] == 1152 and pixart["caption_channels"] == 4096


def test_unknown_names_and_hosts_are_refused():
    with pytest.raises(ValueError, match="unknown model name 'DiT-XXL/2'"):
        ModelArgs.from_name("DiT-XXL/2")
    with pytest.raises(ValueError, match="it is a latte size"):
        flexdit.create_model("Latte-XL/2")
    with pytest.raises(ValueError, match="host must be one of"):
        names("unet")
