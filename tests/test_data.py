"""python -m flexdit.data: ImageFolder → latent shards (exact --shard-size across batches, progress), CLI errors."""
import numpy as np
import pytest

from flexdit.data import LatentShards, main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image
    root = tmp_path_factory.mktemp("enc")
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for c, n in (("cat", 4), ("dog", 3)):
        (root / "images" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    return root


def test_shard_size_holds_across_batches(folders, tmp_path, capsys):
    assert main([str(folders / "images"), str(tmp_path), "--vae", str(folders / "vae"), "--image-size", "8",
                 "--shard-size", "3", "--batch-size", "2", "--device", "cpu"]) == 0
    sizes = []
    for f in sorted(tmp_path.glob("*.npz")):
        with np.load(f) as z:
            sizes.append(len(z["labels"]))
    assert sizes == [3, 3, 1]
    data = LatentShards(tmp_path, channels=4, num_classes=2)
    assert data.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert "wrote 7 latents" in capsys.readouterr().out


def test_cli_errors(folders, tmp_path, capsys):
    cases = [(["--vae", str(tmp_path / "none")], "is not a folder"),
             (["--vae", str(folders / "vae"), "--shard-size", "0"], "shard_size must be >= 1"),
             (["--vae", str(folders / "vae"), "--image-size", "12"], "multiple of 8")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main([str(folders / "images"), str(tmp_path / "out")] + extra)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith("python -m flexdit.data: error:") and message in err, err
