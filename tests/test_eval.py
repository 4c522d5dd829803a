"""flexdit-eval: the Frechet distance against a hand computation, ADM's .npz layout, the sample-set readers, PSNR and
SSIM on images of known error, one-line errors (exit 2) for bad input, and the feature extractors (Inception, LPIPS,
FVD) built from random weights saved to a temporary file. The extractor tests need the `eval` extra and skip
without it; the Inception runs at 299 x 299, so they use two or three tiny images."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from flexdit import eval as fe


def _importable(module: str) -> bool:
    try:            # a torchvision built for another torch raises RuntimeError, not ImportError
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001
        return False


needs_fidelity = pytest.mark.skipif(not _importable("torch_fidelity"), reason="torch-fidelity (flexdit[eval]) "
                                    "is not importable")
needs_torchmetrics = pytest.mark.skipif(not _importable("torchmetrics"), reason="torchmetrics (flexdit[eval]) is "
                                        "not importable")


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of flexdit-eval."""
    try:
        rc = fe.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_usage_error(argv, capsys, *words):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flexdit-eval: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------------

def _hand_frechet(mu1, s1, mu2, s2):
    """tr((s1 s2)^(1/2)) as tr((s1^(1/2) s2 s1^(1/2))^(1/2)) with symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_frechet_distance_matches_hand_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(200, 6)) @ rng.normal(size=(6, 6))
    mu1, s1 = fe.gaussian_stats(a)
    mu2, s2 = fe.gaussian_stats(b)
    np.testing.assert_allclose(mu1, a.mean(0))
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False))
    d = fe.frechet_distance(mu1, s1, mu2, s2)
    assert d == pytest.approx(_hand_frechet(mu1, s1, mu2, s2), rel=1e-9)
    try:
        from scipy import linalg
    except ImportError:
        return
    covmean = linalg.sqrtm(s1 @ s2).real     # what ADM's evaluator and pytorch-fid compute
    assert d == pytest.approx(float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)), rel=1e-7)


def test_frechet_distance_known_values():
    # Diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    assert fe.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(5 + 1 + 0 + 4)
    s = np.cov(np.random.default_rng(1).normal(size=(50, 4)), rowvar=False)
    assert abs(fe.frechet_distance(np.ones(4), s, np.ones(4), s)) < 1e-9
    # Fewer samples than dimensions: a singular covariance still gives a finite, non-negative distance.
    f = np.random.default_rng(2).normal(size=(3, 10))
    assert np.isfinite(fe.frechet_distance(*fe.gaussian_stats(f), *fe.gaussian_stats(f + 1)))
    with pytest.raises(ValueError, match="mu and sigma"):
        fe.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="features"):
        fe.gaussian_stats(np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------------------------
# ADM .npz and the sample-set readers
# ---------------------------------------------------------------------------------------------------------------

def test_adm_npz_round_trip(tmp_path):
    x = images(7)
    path = fe.write_adm_npz(torch.from_numpy(x), tmp_path / "s.npz", labels=[3, 1, 4, 1, 5, 9, 2])
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (7, 16, 16, 3)
        np.testing.assert_array_equal(z["arr_1"], [3, 1, 4, 1, 5, 9, 2])
    np.testing.assert_array_equal(fe.read_adm_npz(path), x)
    src = fe.ImageSource(path)
    parts = list(src.batches(3))
    assert [len(p) for p in parts] == [3, 3, 1] and len(src) == 7 and src.item_shape == (16, 16, 3)
    np.testing.assert_array_equal(np.concatenate(parts), x)
    assert len(np.concatenate(list(src.batches(3, limit=4)))) == 4
    clips = np.zeros((2, 5, 8, 8, 3), np.uint8)
    fe.write_adm_npz(clips, tmp_path / "c.npz")
    assert fe.ImageSource(tmp_path / "c.npz", video=True).item_shape == (5, 8, 8, 3)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((2, 8, 8), np.uint8), "N, H, W, 3"),
    (np.zeros((0, 8, 8, 3), np.uint8), "N >= 1"),
])
def test_write_adm_npz_rejects(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        fe.write_adm_npz(bad, tmp_path / "x.npz")


def test_write_adm_npz_rejects_labels_and_suffix(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        fe.write_adm_npz(images(2), tmp_path / "x.npz", labels=[1, 2, 3])
    with pytest.raises(ValueError, match="npz"):
        fe.write_adm_npz(images(2), tmp_path / "x.npy")


def test_folder_reader_takes_the_numbered_samples(tmp_path):
    from PIL import Image
    x = images(3)
    for i, im in enumerate(x):
        Image.fromarray(im).save(tmp_path / f"{i:06d}.png")
    Image.fromarray(images(1, 32)[0]).save(tmp_path / "grid.png")       # flexdit-sample's grid
    np.savez(tmp_path / "latents.npz", latents=np.zeros((3, 4, 2, 2), np.float32))
    src = fe.ImageSource(tmp_path)
    assert len(src) == 3 and src.item_shape == (16, 16, 3)
    np.testing.assert_array_equal(np.concatenate(list(src.batches(2))), x)


def test_folder_reader_refuses_mixed_sizes(tmp_path):
    from PIL import Image
    Image.fromarray(images(1, 16)[0]).save(tmp_path / "a.png")
    Image.fromarray(images(1, 8)[0]).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="differ in size"):
        fe.ImageSource(tmp_path)


def test_latents_are_decoded_with_the_vae(tmp_path):
    class ToyVAE(torch.nn.Module):      # decode: (N, 4, h, w) -> (N, 3, 8h, 8w), the layout of AutoencoderKL
        dtype, device = torch.float32, torch.device("cpu")

        def decode(self, z):
            img = z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2) * 0.18215
            return type("Out", (), {"sample": img})()

    z = np.full((2, 3, 4, 2, 2), 0.5, np.float32)                    # clips: (N, T, 4, h, w)
    z[1] = 0
    np.savez(tmp_path / "latents.npz", latents=z, labels=np.zeros(2))
    src = fe.ImageSource(tmp_path / "latents.npz", vae=ToyVAE(), video=True)
    assert src.item_shape == (3, 16, 16, 3)
    out = np.concatenate(list(src.batches(1)))
    assert out.shape == (2, 3, 16, 16, 3)
    assert (out[0] == 191).all() and (out[1] == 128).all()             # (0.5 + 1) * 127.5, (0 + 1) * 127.5


# ---------------------------------------------------------------------------------------------------------------
# One-line errors, exit 2
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def two_sets(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    fe.write_adm_npz(images(3, seed=0), a)
    fe.write_adm_npz(images(3, seed=1), b)
    return a, b


def test_cli_bad_input_exit_2(tmp_path, two_sets, capsys):
    a, b = two_sets
    inc = ["--inception", tmp_path / "weights.pth"]
    assert_usage_error(["fid", tmp_path / "nope.npz", b, *inc], capsys, "nope.npz", "no such file")
    assert_usage_error(["fid", a, b, *inc], capsys, "--inception", "weights-inception-2015-12-05")
    np.savez(tmp_path / "other.npz", images=images(2))
    assert_usage_error(["fid", tmp_path / "other.npz", b, *inc], capsys, "arr_0", "images")
    np.savez(tmp_path / "float.npz", arr_0=images(2).astype(np.float32))
    assert_usage_error(["fid", tmp_path / "float.npz", b, *inc], capsys, "uint8")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert_usage_error(["compare", tmp_path / "junk.npz", b], capsys, "not a readable .npz")
    np.savez(tmp_path / "lat.npz", latents=np.zeros((3, 4, 2, 2), np.float32))
    assert_usage_error(["compare", tmp_path / "lat.npz", b], capsys, "--vae")
    assert_usage_error(["compare", a, b, "--vae", tmp_path / "novae"], capsys, "--vae", "not a folder")
    (tmp_path / "empty").mkdir()
    assert_usage_error(["compare", tmp_path / "empty", b], capsys, "no image")
    assert_usage_error(["fvd", a, b, "--detector", tmp_path / "i3d.pt"], capsys, "clips")
    fe.write_adm_npz(np.zeros((2, 4, 8, 8, 3), np.uint8), tmp_path / "clips.npz")
    (tmp_path / "i3d.pt").write_bytes(b"")
    assert_usage_error(["fvd", tmp_path / "clips.npz", tmp_path / "clips.npz", "--detector", tmp_path / "i3d.pt"],
                       capsys, "at least 9 frames")
    assert_usage_error(["pack", a, tmp_path / "out.png"], capsys, ".npz")


def test_cli_truncated_npz_exit_2(tmp_path, two_sets, capsys):
    import zipfile
    _, b = two_sets
    cut = tmp_path / "cut.npz"
    fe.write_adm_npz(images(40), cut)
    with zipfile.ZipFile(cut) as zf:
        member = zf.read("arr_0.npy")
    with zipfile.ZipFile(cut, "w") as zf:       # the array's bytes end before its header's shape does
        zf.writestr("arr_0.npy", member[:-100])
    assert_usage_error(["compare", cut, b], capsys, "truncated")


def test_cli_compare_refuses_unpaired_sets(tmp_path, two_sets, capsys):
    a, _ = two_sets
    fe.write_adm_npz(images(4), tmp_path / "four.npz")
    assert_usage_error(["compare", a, tmp_path / "four.npz"], capsys, "3 samples", "4", "same seeds")
    fe.write_adm_npz(images(3, size=8), tmp_path / "small.npz")
    assert_usage_error(["compare", a, tmp_path / "small.npz"], capsys, "sizes must match")
    assert_usage_error(["compare", a, a, "--lpips", tmp_path / "alex.pth"], capsys, "--lpips",
                       "alexnet-owt-7be5be79.pth")


def test_cli_pack_writes_the_adm_layout(tmp_path, capsys):
    from PIL import Image
    x = images(3)
    (tmp_path / "s").mkdir()
    for i, im in enumerate(x):
        Image.fromarray(im).save(tmp_path / "s" / f"{i:06d}.png")
    rc, out, err = run_cli(["pack", tmp_path / "s", tmp_path / "s.npz"], capsys)
    assert rc == 0, err
    np.testing.assert_array_equal(fe.read_adm_npz(tmp_path / "s.npz"), x)
    fe.pack_adm_npz(tmp_path / "s", tmp_path / "two.npz", labels=[7, 8], batch_size=1, limit=2)
    with np.load(tmp_path / "two.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], x[:2])
        np.testing.assert_array_equal(z["arr_1"], [7, 8])


# ---------------------------------------------------------------------------------------------------------------
# compare: PSNR and SSIM of known value
# ---------------------------------------------------------------------------------------------------------------

@needs_torchmetrics
def test_compare_known_psnr(tmp_path, capsys):
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 5                                   # MSE 25 -> PSNR 10 log10(255^2 / 25)
    b[1, ::2] += 10                             # MSE 50 on half the rows -> 100 / 2 = 50
    m = fe.compare_metrics(a, b)
    np.testing.assert_allclose(m["psnr"], 10 * np.log10(255.0 ** 2 / np.array([25.0, 50.0])), rtol=1e-6)
    assert m["ssim"].shape == (2,) and (m["ssim"] <= 1).all()
    assert fe.compare_metrics(a, a)["ssim"] == pytest.approx([1.0, 1.0])
    fe.write_adm_npz(a, tmp_path / "a.npz")
    fe.write_adm_npz(b, tmp_path / "b.npz")
    rc, out, err = run_cli(["compare", tmp_path / "a.npz", tmp_path / "b.npz", "--json", tmp_path / "m.json"],
                           capsys)
    assert rc == 0, err
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["num_pairs"] == 2
    assert got["psnr"] == pytest.approx(np.mean(10 * np.log10(255.0 ** 2 / np.array([25.0, 50.0]))))
    assert "PSNR" in out and "LPIPS  left out" in out
    rc, out, _ = run_cli(["compare", tmp_path / "a.npz", tmp_path / "a.npz"], capsys)
    assert rc == 0 and "inf (identical images)" in out


# ---------------------------------------------------------------------------------------------------------------
# Feature extractors from random weights in a temporary file
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights (He-normal convs so that the features do not vanish)."""
    from unittest import mock
    tf_inc = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    cls = tf_inc.FeatureExtractorInceptionV3
    with mock.patch.object(cls, "load_state_dict", lambda self, sd: None), \
            mock.patch.object(tf_inc, "load_state_dict_from_url", lambda *a, **k: None):
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


@needs_fidelity
def test_fid_metrics_on_known_features():
    rng = np.random.default_rng(0)

    def feats(n, shift):
        return {"pool": torch.from_numpy(rng.normal(shift, 1, (n, 8))), "spatial": torch.from_numpy(rng.normal(
            -shift, 1, (n, 5))), "logits": torch.from_numpy(rng.normal(size=(n, 10)))}

    s, r = feats(40, 0.0), feats(30, 1.0)
    m = fe.fid_metrics(s, r, is_splits=2)
    assert m["fid"] == pytest.approx(fe.frechet_distance(*fe.gaussian_stats(s["pool"]), *fe.gaussian_stats(r["pool"])))
    assert m["sfid"] == pytest.approx(fe.frechet_distance(*fe.gaussian_stats(s["spatial"]),
                                                          *fe.gaussian_stats(r["spatial"])))
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    same = fe.fid_metrics(s, s)
    assert same["precision"] == 1 and same["recall"] == 1 and abs(same["fid"]) < 1e-9
    # IS: one confident class per sample, 10 classes equally used -> exp(log 10) = 10; identical logits -> 1.
    onehot = torch.full((20, 10), -1e4, dtype=torch.float64)
    onehot[torch.arange(20), torch.arange(20) % 10] = 0
    assert fe.fid_metrics({**s, "logits": onehot}, r, is_splits=1)["inception_score"] == pytest.approx(10)
    flat = torch.zeros(20, 10, dtype=torch.float64)
    assert fe.fid_metrics({**s, "logits": flat}, r, is_splits=1)["inception_score"] == pytest.approx(1)


@needs_fidelity
def test_inception_features_and_fid_cli(inception_file, tmp_path, capsys, monkeypatch):
    calls = []      # what the CLI's extractor computed, and the output of Mixed_6d's 1x1 branch (mixed_6/conv)
    call = fe.InceptionFeatures.__call__

    def spy(self, batch):
        seen = []
        hook = self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
        out = call(self, batch)
        hook.remove()
        calls.append((out, seen[0]))
        return out

    monkeypatch.setattr(fe.InceptionFeatures, "__call__", spy)
    fe.write_adm_npz(images(2, seed=0), tmp_path / "s.npz")
    fe.write_adm_npz(images(2, seed=5), tmp_path / "r.npz")
    rc, out, err = run_cli(["fid", tmp_path / "s.npz", tmp_path / "r.npz", "--inception", inception_file,
                            "--json", tmp_path / "m.json", "--no-progress"], capsys)
    assert rc == 0, err
    assert len(calls) == 2
    for f, mixed6 in calls:
        assert f["pool"].shape == (2, 2048) and f["logits"].shape == (2, 1008) and f["spatial"].shape == (2, 2023)
        assert f["pool"].abs().sum() > 0 and torch.isfinite(f["spatial"]).all()
        # sFID's features: the first 7 channels of mixed_6/conv (17 x 17), flattened (h, w, c) as in ADM.
        torch.testing.assert_close(f["spatial"], mixed6[:, :7].permute(0, 2, 3, 1).reshape(2, -1).float())
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"fid", "sfid", "inception_score"} <= set(m) and m["num_samples"] == 2 and m["num_ref"] == 2
    assert np.isfinite(m["fid"]) and m["fid"] > -1e-6     # fid_metrics' test checks the value from features
    assert "FID" in out and "FID-50K" in out and "precision" not in out     # k = 3 needs more than 3 per set


@needs_fidelity
def test_inception_refuses_other_weights(tmp_path, two_sets, capsys):
    a, b = two_sets
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    assert_usage_error(["fid", a, b, "--inception", tmp_path / "other.pth"], capsys, "not torch-fidelity's")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert_usage_error(["fid", a, b, "--inception", tmp_path / "junk.pth"], capsys, "not a readable weights file")


@pytest.mark.skipif(not (_importable("torchvision") and _importable("torchmetrics")),
                    reason="torchvision and torchmetrics (flexdit[eval]) are not importable")
@pytest.mark.parametrize("whole", [False, True], ids=["torchvision-file", "lpips-state-dict"])
def test_lpips_from_local_backbone(tmp_path, capsys, whole):
    import torchvision
    torch.manual_seed(0)
    path = tmp_path / "alex.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    model = fe.lpips_model(path, "alex")
    if whole:       # a whole LPIPS state dict (backbone and linear layers) loads too
        torch.save(model.state_dict(), path)
        model = fe.lpips_model(path, "alex")
    if not whole:   # torchvision's features.3 is the first conv of LPIPS' slice2
        torch.testing.assert_close(model.state_dict()["net.slice2.3.weight"], torch.load(path)["features.3.weight"])
    a, b = images(2, 32, 0), images(2, 32, 1)
    m = fe.compare_metrics(a, b, model)
    assert m["lpips"].shape == (2,) and (m["lpips"] > 0).all()
    assert fe.compare_metrics(a, a, model)["lpips"] == pytest.approx([0, 0], abs=1e-6)
    fe.write_adm_npz(a, tmp_path / "a.npz")
    fe.write_adm_npz(b, tmp_path / "b.npz")
    rc, out, err = run_cli(["compare", tmp_path / "a.npz", tmp_path / "b.npz", "--lpips", path], capsys)
    assert rc == 0 and "LPIPS  0." in out, err
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "a2.pth")
    assert_usage_error(["compare", tmp_path / "a.npz", tmp_path / "b.npz", "--lpips", tmp_path / "a2.pth",
                        "--lpips-net", "vgg"], capsys, "not the vgg backbone")


@pytest.mark.skipif(not _importable("cdfvd.third_party.i3d.utils"), reason="cd-fvd (flexdit[eval]) is not importable")
def test_fvd_cli_with_a_small_detector(tmp_path, capsys, monkeypatch):
    # cd-fvd's I3D runs at 224 x 224 x 16 (seconds per clip on a CPU): its loader is swapped for a small network
    # that takes the same preprocessed clips (B, 3, T, 224, 224) in [-1, 1], so the test covers the plumbing.
    import cdfvd.third_party.i3d.utils as i3d_utils

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 6)

        def forward(self, x):
            assert x.shape[1:] == (3, 9, 224, 224) and x.min() >= -1 and x.max() <= 1
            return self.proj(x.mean(dim=(2, 3, 4)))

    loaded = []

    def load(device, path):
        loaded.append(path)
        net = Small()
        net.load_state_dict(torch.load(path))
        return net

    torch.save(Small().state_dict(), tmp_path / "det.pt")
    monkeypatch.setattr(i3d_utils, "load_i3d_model", load)
    rng = np.random.default_rng(0)
    fe.write_adm_npz(rng.integers(0, 256, (4, 9, 8, 8, 3), dtype=np.uint8), tmp_path / "s.npz")
    fe.write_adm_npz(rng.integers(0, 128, (4, 9, 8, 8, 3), dtype=np.uint8), tmp_path / "r.npz")
    rc, out, err = run_cli(["fvd", tmp_path / "s.npz", tmp_path / "r.npz", "--detector", tmp_path / "det.pt",
                            "--json", tmp_path / "m.json"], capsys)
    assert rc == 0, err
    assert loaded == [str(tmp_path / "det.pt")] and "FVD (i3d)" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["fvd"] > 0 and m["num_clips"] == 4
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
    assert_usage_error(["fvd", tmp_path / "s.npz", tmp_path / "r.npz", "--detector", tmp_path / "bad.pt"], capsys,
                       "not cd-fvd's i3d weights")
