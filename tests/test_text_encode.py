"""python -m flexdit.data --pipeline: images with captions -> text shards with a tiny PixArt-α, SD3 and FLUX pipeline
saved to disk (random weights); latents scaled and captions encoded as the pipeline does; one-line errors."""
import json

import numpy as np
import pytest
import torch

from flexdit.data import TEXT_KEYS, TextShards, _image_batch, encode_prompts, load_text_pipeline, main, scale_latents

from .text_hosts import save_tiny_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
CAPTIONS = ["a red cat", "the mat", "a cat on the mat", "red", "the red mat"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("t2i")
    rng = np.random.default_rng(0)
    for kind in ("pixart", "sd3", "flux"):
        save_tiny_pipeline(kind, root / kind)
    (root / "jsonl" / "img").mkdir(parents=True)
    (root / "txt").mkdir()
    lines = []
    for i, caption in enumerate(CAPTIONS):
        img = Image.fromarray(rng.integers(0, 255, (20 + 2 * i, 24, 3), dtype=np.uint8))
        img.save(root / "jsonl" / "img" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"img/{i}.png", "text": caption}))
        img.save(root / "txt" / f"{i}.png")
        (root / "txt" / f"{i}.txt").write_text(caption + "\n")
    (root / "jsonl" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def encode(root, kind, out, images="jsonl", *extra):
    return main([str(root / images), str(out), "--pipeline", str(root / kind), "--image-size", "16",
                 "--max-sequence-length", "8", "--shard-size", "3", "--batch-size", "2", "--device", "cpu",
                 "--no-progress", *extra])


@pytest.mark.parametrize("kind", ["pixart", "sd3", "flux"])
def test_encoding_matches_the_pipeline(root, kind, tmp_path, capsys):
    assert encode(root, kind, tmp_path / "s") == 0
    assert "wrote 5 samples" in capsys.readouterr().out
    ds = TextShards(tmp_path / "s")
    assert len(ds) == 5 and len(ds.files) == 2
    assert ds.meta["host"] == kind and ds.meta["image_size"] == 16 and ds.meta["max_sequence_length"] == 8
    pipe, host = load_text_pipeline(root / kind, "cpu")
    # the samples' text inputs and, stored once, the empty caption's (caption dropout): the pipeline's encodings
    got = ds.batch([2, 3])
    for want, read in ((encode_prompts(pipe, host, CAPTIONS[2:4], 8, "cpu"), got),
                       (encode_prompts(pipe, host, [""], 8, "cpu"), ds.null_text)):
        assert set(read) - set(want) <= {"latents"}
        for k, v in want.items():
            if k == "encoder_attention_mask":
                assert read[k].tolist() == v.tolist()
            else:
                torch.testing.assert_close(read[k], v.half().float())
    assert ds.meta["null_text"] == "null_text.npz" and sorted(ds.null_text) == sorted(TEXT_KEYS[kind][1:])
    # the first batch's latents: a seeded posterior sample, then the pipeline's scaling
    x = _image_batch([root / "jsonl" / "img" / f"{i}.png" for i in (0, 1)], 16)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    shift = 0.1 if kind != "pixart" else 0.0
    latents = ds.batch([0, 1])["latents"]
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(latents, ((z - shift) * pipe.vae.config.scaling_factor).half().float())
    if kind == "pixart":
        assert got["encoder_hidden_states"].shape == (2, 8, 24)
    else:
        assert got["pooled_projections"].shape == (2, 12)
        assert got["encoder_hidden_states"].shape == (2, 16 if kind == "sd3" else 8, 24)   # SD3: CLIP + T5 tokens


def test_txt_captions_and_flip(root, tmp_path):
    assert encode(root, "flux", tmp_path / "a", "txt", "--flip") == 0
    assert encode(root, "flux", tmp_path / "b", "jsonl") == 0
    a, b = TextShards(tmp_path / "a"), TextShards(tmp_path / "b")
    assert len(a) == 10
    # a batch of 2 holds images 0, 1, then their mirrors with the same captions
    torch.testing.assert_close(a[2]["encoder_hidden_states"], b[0]["encoder_hidden_states"])
    torch.testing.assert_close(a[3]["pooled_projections"], b[1]["pooled_projections"])


def test_bad_input_gets_one_line(root, tmp_path, capsys):
    (tmp_path / "nocap").mkdir()
    (tmp_path / "nocap" / "0.png").write_bytes((root / "txt" / "0.png").read_bytes())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.png").write_bytes(b"not an image")
    (tmp_path / "broken" / "0.txt").write_text("a cat")
    (tmp_path / "badline").mkdir()
    (tmp_path / "badline" / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "a"}\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "meta.json").write_text("{}")
    img = str(root / "txt")
    cases = [([str(tmp_path / "nocap"), "o1", "--pipeline", str(root / "flux")], "0.png: no caption (0.txt"),
             ([str(tmp_path / "broken"), "o2", "--pipeline", str(root / "flux")], "0.png: cannot read it"),
             ([str(tmp_path / "badline"), "o3", "--pipeline", str(root / "flux")], "metadata.jsonl line 1:"),
             ([img, "o4", "--pipeline", str(root / "txt")], "no model_index.json"),
             ([img, "o5", "--pipeline", str(tmp_path / "other")], "a StableDiffusionXLPipeline; supported"),
             ([img, str(tmp_path / "used"), "--pipeline", str(root / "flux")], "already holds shards"),
             ([img, "o6", "--pipeline", str(root / "flux"), "--image-size", "18"], "multiple of 4"),
             ([img, "o7", "--vae", str(root / "flux" / "vae"), "--max-sequence-length", "8"], "needs --pipeline")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main([*argv[:1], str(tmp_path / argv[1]), *argv[2:], "--device", "cpu", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, (message, err)
    with pytest.raises(SystemExit):       # argparse's own error: usage, then one error line
        main([img, str(tmp_path / "o8"), "--pipeline", str(root / "flux"), "--vae", str(root / "flux" / "vae")])
    assert "--vae: not allowed with argument --pipeline" in capsys.readouterr().err.splitlines()[-1]
