"""Text-conditioned shards: write_text_shards -> TextShards round trip per host, memory-mapped reads, and the
one-line errors naming the file."""
import json
import pickle

import numpy as np
import pytest
import torch

from flexdit.data import TEXT_KEYS, TextShards, write_text_shards

L, D, P = 6, 8, 5


def text_items(host, n=7, channels=4, side=4, seed=0):
    """n random samples of a host's shard arrays and their meta."""
    rng = np.random.default_rng(seed)
    items = {"latents": rng.standard_normal((n, channels, side, side)),
             "encoder_hidden_states": rng.standard_normal((n, L + (3 if host == "sd3" else 0), D))}
    if host == "pixart":
        mask = np.ones((n, L), dtype=np.int64)
        mask[:, L // 2:] = rng.integers(0, 2, (n, L - L // 2))
        items["encoder_attention_mask"] = mask
    else:
        items["pooled_projections"] = rng.standard_normal((n, P))
    meta = {"host": host, "image_size": side * 8, "latent_channels": channels, "max_sequence_length": L,
            "encoders": ["t5"] if host == "pixart" else ["clip", "t5"]}
    return items, meta


@pytest.mark.parametrize("host", sorted(TEXT_KEYS))
def test_round_trip(host, tmp_path):
    items, meta = text_items(host)
    paths = write_text_shards(tmp_path / "s", items, meta, shard_size=3)
    assert [p.name for p in paths] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    ds = TextShards(tmp_path / "s")
    assert len(ds) == 7 and ds.meta == {**meta, "count": 7} and ds.latent_shape == (4, 4, 4)
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["count"] == 7
    for i in (0, 3, 6, -1):
        item = ds[i]
        assert sorted(item) == sorted(TEXT_KEYS[host])
        for k, v in item.items():
            want = items[k][i]
            if k == "encoder_attention_mask":
                assert v.dtype == torch.uint8
                assert v.tolist() == want.tolist()
            else:
                assert v.dtype == torch.float32
                torch.testing.assert_close(v, torch.from_numpy(want.astype(np.float16).astype(np.float32)))
    with np.load(paths[0]) as z:                     # stored as agreed: float16, the mask uint8
        assert {k: str(z[k].dtype) for k in z.files} == {
            k: "uint8" if k == "encoder_attention_mask" else "float16" for k in TEXT_KEYS[host]}
    batch = ds.batch(torch.tensor([1, 5]))
    assert batch["latents"].shape == (2, 4, 4, 4)
    torch.testing.assert_close(batch["encoder_hidden_states"][1], ds[5]["encoder_hidden_states"])
    again = pickle.loads(pickle.dumps(ds))          # DataLoader workers re-open the memory maps
    torch.testing.assert_close(again[4]["latents"], ds[4]["latents"])
    with pytest.raises(IndexError):
        ds[7]


def test_compressed_shard_is_read(tmp_path):
    items, meta = text_items("flux", n=3)
    write_text_shards(tmp_path, items, meta)
    shard = tmp_path / "shard_00000.npz"
    with np.load(shard) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(shard, **arrays)
    torch.testing.assert_close(TextShards(tmp_path)[2]["pooled_projections"],
                               torch.from_numpy(arrays["pooled_projections"][2].astype(np.float32)))


def _rewrite(path, **changes):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def test_bad_folders_are_refused_naming_the_file(tmp_path):
    items, meta = text_items("pixart", n=4)

    def folder(name, **changes):
        root = tmp_path / name
        write_text_shards(root, items, meta, shard_size=2)
        if changes:
            _rewrite(root / "shard_00001.npz", **changes)
        return root

    cases = [
        (lambda r: (r / "meta.json").unlink(), "meta.json: missing"),
        (lambda r: (r / "meta.json").write_text("{"), "meta.json: cannot read it"),
        (lambda r: (r / "meta.json").write_text(json.dumps({**meta, "count": 4, "host": "sdxl"})), "host must be"),
        (lambda r: (r / "meta.json").write_text(json.dumps({**meta, "count": 5})), "the shards hold 4 samples"),
        (lambda r: (r / "shard_00001.npz").write_bytes(b"not a zip"), "shard_00001.npz: cannot read the shard"),
        (lambda r: _rewrite(r / "shard_00001.npz", encoder_attention_mask=None), "missing ['encoder_attention_mask']"),
        (lambda r: _rewrite(r / "shard_00001.npz", labels=np.zeros(2)), "unexpected ['labels']"),
        (lambda r: _rewrite(r / "shard_00001.npz", latents=np.zeros((2, 3, 4, 4), np.float16)), "(n, 4, h, w)"),
        (lambda r: _rewrite(r / "shard_00001.npz", latents=np.zeros((2, 4, 2, 2), np.float16)),
         "the first shard's are (4, 4, 4)"),
        (lambda r: _rewrite(r / "shard_00001.npz", encoder_hidden_states=np.zeros((2, L + 1, D), np.float16),
                            encoder_attention_mask=np.ones((2, L + 1), np.uint8)), "max_sequence_length is 6"),
        (lambda r: _rewrite(r / "shard_00001.npz", encoder_attention_mask=np.ones((2, L), np.float32)),
         "encoder_attention_mask must be integers"),
    ]
    for k, (damage, message) in enumerate(cases):
        root = folder(f"case{k}")
        damage(root)
        with pytest.raises(ValueError) as exc:
            TextShards(root)
        text = str(exc.value)
        assert message in text and "\n" not in text and str(root) in text, (k, text)
    with pytest.raises(ValueError, match="is not a folder"):
        TextShards(tmp_path / "none")


def test_bad_values_are_refused_when_read(tmp_path):
    items, meta = text_items("pixart", n=4)
    write_text_shards(tmp_path, items, meta, shard_size=2)
    lat = items["latents"][2:].astype(np.float16)
    lat[1, 0, 0, 0] = np.nan
    mask = items["encoder_attention_mask"][2:].astype(np.uint8)
    mask[0, 0] = 2
    _rewrite(tmp_path / "shard_00001.npz", latents=lat, encoder_attention_mask=mask)
    ds = TextShards(tmp_path)
    ds[1]
    with pytest.raises(ValueError, match=r"shard_00001.npz: sample 1: latents contains NaN"):
        ds[3]
    with pytest.raises(ValueError, match=r"shard_00001.npz: sample 0: encoder_attention_mask is not 0/1"):
        ds[2]


def test_write_text_shards_refusals(tmp_path):
    items, meta = text_items("flux", n=3)
    with pytest.raises(ValueError, match="meta: host must be one of"):
        write_text_shards(tmp_path / "a", items, {**meta, "host": "pixart-sigma"})
    with pytest.raises(ValueError, match=r"items: a flux shard holds exactly .* missing \['pooled_projections'\]"):
        write_text_shards(tmp_path / "a", {k: v for k, v in items.items() if k != "pooled_projections"}, meta)
    with pytest.raises(ValueError, match=r"pooled_projections must be \(3, P\)"):
        write_text_shards(tmp_path / "a", {**items, "pooled_projections": items["pooled_projections"][:2]}, meta)
    with pytest.raises(ValueError, match="latents contains NaN or inf"):
        write_text_shards(tmp_path / "a", {**items, "latents": items["latents"] * np.inf}, meta)
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        write_text_shards(tmp_path / "a", items, meta, shard_size=0)
    write_text_shards(tmp_path / "b", items, meta)
    with pytest.raises(ValueError, match="already holds shards"):
        write_text_shards(tmp_path / "b", items, meta)


@pytest.mark.parametrize("host", sorted(TEXT_KEYS))
def test_null_text_round_trip(host, tmp_path):
    """The empty caption's encoding is stored once beside the shards (not read as a shard) and comes back as
    (1, ...) tensors; a folder written without it reads with null_text None."""
    items, meta = text_items(host, n=4)
    null = {k: v[:1] * 0.5 for k, v in text_items(host, n=1, seed=1)[0].items() if k != "latents"}
    if host == "pixart":
        null["encoder_attention_mask"] = np.eye(1, L, dtype=np.uint8)
    paths = write_text_shards(tmp_path / "s", items, meta, shard_size=3, null_text=null)
    assert [p.name for p in paths] == ["shard_00000.npz", "shard_00001.npz"]
    ds = TextShards(tmp_path / "s")
    assert len(ds) == 4 and len(ds.files) == 2 and ds.meta["null_text"] == "null_text.npz"
    assert sorted(ds.null_text) == sorted(null)
    for k, v in ds.null_text.items():
        assert v.shape == (1, *items[k].shape[1:])
        if k == "encoder_attention_mask":
            assert v.dtype == torch.uint8 and v.tolist() == null[k].tolist()
        else:
            torch.testing.assert_close(v, torch.from_numpy(null[k].astype(np.float16).astype(np.float32)))
    write_text_shards(tmp_path / "old", items, meta)
    old = TextShards(tmp_path / "old")
    assert old.null_text is None and "null_text" not in old.meta


def test_null_text_refusals(tmp_path):
    items, meta = text_items("flux", n=3)
    null = {"encoder_hidden_states": items["encoder_hidden_states"][:1],
            "pooled_projections": items["pooled_projections"][:1]}
    cases = [({"encoder_hidden_states": null["encoder_hidden_states"]}, r"holds \['encoder_hidden_states'\]"),
             ({**null, "pooled_projections": items["pooled_projections"]}, r"pooled_projections must be \(1, 5\)"),
             ({**null, "pooled_projections": null["pooled_projections"] * np.nan}, "pooled_projections contains NaN")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            write_text_shards(tmp_path / "a", items, meta, null_text=bad)
    write_text_shards(tmp_path / "b", items, meta, null_text=null)
    (tmp_path / "b" / "null_text.npz").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"null_text.npz: cannot read the empty caption's encoding"):
        TextShards(tmp_path / "b")
    meta_path = tmp_path / "b" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "null_text": "../x.npz"}))
    with pytest.raises(ValueError, match="null_text must be the name of an .npz file"):
        TextShards(tmp_path / "b")
