"""`flexdit-eval`: sample quality, the paper's way and the quick way.

    flexdit-eval fid SAMPLES REF --inception FILE     FID, sFID, Inception Score, precision and recall (the metrics
                                                      of ADM's evaluator) between samples and a reference set
    flexdit-eval compare A B [--lpips FILE]           PSNR, SSIM and LPIPS between two sample sets of the same seeds
                                                      (FlexDiT against its dense model after fine-tuning)
    flexdit-eval fvd SAMPLES REF --detector FILE      Frechet Video Distance between clips (I3D or VideoMAE-v2)
    flexdit-eval pack SRC OUT.npz                     images (folder, or latents + VAE) -> ADM's `arr_0` .npz layout

A sample set is a folder of images (a `flexdit-sample` output folder: its numbered PNGs, or its `latents.npz` decoded
with `--vae`), an ADM-style `.npz` (`arr_0`: uint8 (N, H, W, 3), clips (N, T, H, W, 3)) or a `latents.npz`.
Weights are read from local files only; nothing is downloaded. Exit status: 0 on success, 2 with one line
`flexdit-eval: error: ...` for a bad argument, file, layout or a missing optional library (`pip install
'flexdit[eval]'`).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from ._cli import fail, resolve_device, usage_errors

__all__ = ["main", "write_adm_npz", "pack_adm_npz", "read_adm_npz", "ImageSource", "load_vae", "decode_latents",
           "frechet_distance", "gaussian_stats", "InceptionFeatures", "fid_metrics", "compare_metrics", "lpips_model",
           "fvd"]

PROG = "flexdit-eval"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ADM_SPATIAL_CHANNELS = 7        # ADM's sFID: the first 7 channels of mixed_6/conv (17 x 17) -> 2023 features
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" \
                "weights-inception-2015-12-05-6726825d.pth"
LPIPS_URLS = {"alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
              "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth"}
FVD_URLS = {"i3d": "https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt",
            "videomae": "https://pjlab-gvm-data.oss-cn-shanghai.aliyuncs.com/internvideo/videomaev2/"
                        "vit_g_hybrid_pt_1200e_ssv2_ft.pth"}


def _need(module: str, what: str):
    """Import an optional library, or ValueError saying which extra brings it (also when it is installed but broken,
    e.g. a torchvision built for another torch)."""
    import importlib
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken install raises RuntimeError/OSError, not ImportError
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ValueError(f"{what} needs the Python package {module.split('.')[0]!r} ({reason}); "
                         f"pip install 'flexdit[eval]' (with a torchvision built for this torch)") from None


# ---------------------------------------------------------------------------------------------------------------
# ADM's .npz layout
# ---------------------------------------------------------------------------------------------------------------

def write_adm_npz(images, path, labels=None) -> Path:
    """Write images in the layout of ADM's evaluator (guided-diffusion `evaluations/`): `arr_0` uint8 (N, H, W, 3)
    (clips: (N, T, H, W, 3)), and `arr_1` int64 (N,) class labels when given. Returns the path written."""
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    _check_adm_images(arr.shape, arr.dtype)
    return _write_npz_stream(path, arr.shape, [arr], labels)


def pack_adm_npz(src, path, vae=None, labels=None, batch_size: int = 64, limit: int | None = None) -> Path:
    """Write the images of `src` (a folder, an ADM .npz, or latents decoded with `vae`; see ImageSource) to `path`
    in ADM's layout, streaming: memory holds one batch, not the set. Returns the path written."""
    source = src if isinstance(src, ImageSource) else ImageSource(src, vae=vae, video=None, name="src")
    n = len(source) if limit is None else min(limit, len(source))
    return _write_npz_stream(path, (n, *source.item_shape), source.batches(batch_size, n), labels)


def _check_adm_images(shape, dtype) -> None:
    if dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {dtype}")
    if len(shape) not in (4, 5) or shape[-1] != 3 or shape[0] == 0:
        raise ValueError(f"images must be (N, H, W, 3) or (N, T, H, W, 3) with N >= 1, got {tuple(shape)}")


def _write_npz_stream(path, shape, batches, labels) -> Path:
    """An uncompressed .npz (as np.savez writes) with arr_0 of `shape` from uint8 `batches`, and arr_1 = labels."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path {path}: an ADM batch is a .npz file")
    if not path.parent.is_dir():
        raise ValueError(f"path {path}: folder {path.parent} does not exist")
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
        if labels.shape != (shape[0],):
            raise ValueError(f"labels must be ({shape[0]},), got {tuple(labels.shape)}")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(int(d) for d in shape)}
    written = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for batch in batches:
                if batch.dtype != np.uint8 or batch.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"a batch of {batch.dtype} {batch.shape} does not fit arr_0 {shape}")
                f.write(np.ascontiguousarray(batch).tobytes())
                written += len(batch)
        if written != shape[0]:
            raise ValueError(f"wrote {written} images, expected {shape[0]}")
        if labels is not None:
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, labels)
    return path


def read_adm_npz(path, key: str = "arr_0") -> np.ndarray:
    """The whole `key` array of an ADM-style .npz (uint8 (N, H, W, 3) or (N, T, H, W, 3)), checked."""
    source = ImageSource(path, key=key, video=None)
    return np.concatenate(list(source.batches(max(1, len(source)))))


def _npz_arrays(path: Path) -> list[str]:
    """Names of the arrays in a .npz, or ValueError for a file that is not one."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path}: not a readable .npz ({' '.join(str(err).split())})") from None


class _NpyMember:
    """One array of a .npz read in row slices without loading it whole (a 50k x 512^2 batch is 39 GB)."""

    def __init__(self, path: Path, key: str):
        self.path, self.member = path, key + ".npy"
        names = _npz_arrays(path)
        if key not in names:
            raise ValueError(f"{path}: no array {key!r} (arrays: {', '.join(names) or 'none'})")
        try:
            with zipfile.ZipFile(path) as zf, zf.open(self.member) as f:
                self.shape, fortran, self.dtype = self._header(f)
                header = f.tell()
                size = zf.getinfo(self.member).file_size
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise ValueError(f"{path}: array {key!r} is not readable ({' '.join(str(err).split())})") from None
        if fortran:
            raise ValueError(f"{path}: array {key!r} is Fortran-ordered; save it with np.savez from a C-ordered array")
        if self.dtype.hasobject:
            raise ValueError(f"{path}: array {key!r} holds Python objects, not numbers")
        if size - header != int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize:
            raise ValueError(f"{path}: array {key!r} is truncated ({size - header} bytes for shape {self.shape})")

    @staticmethod
    def _header(f):
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)

    def rows(self, batch: int, limit: int):
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            self._header(f)
            for start in range(0, limit, batch):
                count = min(batch, limit - start)
                buf = f.read(count * row)
                yield np.frombuffer(bytearray(buf), dtype=self.dtype).reshape(count, *self.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# Sample sets: folders, ADM .npz, latents + VAE
# ---------------------------------------------------------------------------------------------------------------

def load_vae(path, device):
    """A diffusers AutoencoderKL from a local folder (save_pretrained layout), in eval mode on `device`."""
    if not path or not Path(path).is_dir():
        raise ValueError(f"--vae {path}: not a folder (a diffusers AutoencoderKL saved with save_pretrained)")
    models = _need("diffusers.models", "decoding latents (--vae)")
    try:
        return models.AutoencoderKL.from_pretrained(path).to(device).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"--vae {path}: not a loadable AutoencoderKL ({' '.join(str(err).split())[:200]})") from None


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """uint8 (N, H, W, 3) images from latents (N, 4, h, w) scaled by VAE_SCALE as `flexdit-sample` writes them."""
    from .data import VAE_SCALE
    z = latents.to(device=vae.device, dtype=vae.dtype)
    img = vae.decode(z / VAE_SCALE).sample
    return ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ImageSource:
    """N images (H, W, 3) or clips (T, H, W, 3), uint8, read in batches from a folder, an ADM .npz or latents.

    path: a folder of images (sorted by name; in a `flexdit-sample` folder only its numbered PNGs, or its
    `latents.npz` when it has no PNG), a .npz with `arr_0` (ADM) or `latents` (`flexdit-sample`, decoded with `vae`).
    video: True for clips, False for images, None to accept either.
    """

    def __init__(self, path, vae=None, video: bool | None = False, key: str | None = None, name: str = "input"):
        self.path, self.vae, self.name = Path(path), vae, name
        self.files = self.npy = None
        if not self.path.exists():
            raise ValueError(f"{name} {self.path}: no such file or folder")
        target = self.path
        if self.path.is_dir():
            self.files = self._image_files(self.path)
            if not self.files:
                target = self.path / "latents.npz"
                if not target.is_file():
                    raise ValueError(f"{name} {self.path}: no image ({', '.join(IMAGE_SUFFIXES)}) and no latents.npz")
        elif self.path.suffix != ".npz":
            raise ValueError(f"{name} {self.path}: expected a folder of images or a .npz file")
        if self.files is None:
            if key is None:
                names = _npz_arrays(target)
                key = "arr_0" if "arr_0" in names else "latents" if "latents" in names else None
                if key is None:
                    raise ValueError(f"{name} {target}: neither `arr_0` (ADM images) nor `latents` "
                                     f"(flexdit-sample) in it (arrays: {', '.join(sorted(names)) or 'none'})")
            self.npy = _NpyMember(target, key)
            self.latent = key == "latents"
        else:
            self.latent = False
        self.item_shape = self._item_shape()
        self.video = len(self.item_shape) == 4
        if video is not None and self.video != video:
            want = "clips (N, T, H, W, 3)" if video else "images (N, H, W, 3)"
            raise ValueError(f"{name} {self.path}: expected {want}, got items of shape {self.item_shape}")

    @staticmethod
    def _image_files(folder: Path) -> list[Path]:
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if (folder / "latents.npz").is_file():      # a flexdit-sample folder: 000000.png ..., not grid.png
            files = [f for f in files if re.fullmatch(r"\d+", f.stem)]
        return files

    def _item_shape(self) -> tuple:
        if self.files is not None:      # every header up front, so that a stray size fails before any work
            from PIL import Image, UnidentifiedImageError
            sizes = {}
            for f in self.files:
                try:
                    with Image.open(f) as im:
                        sizes.setdefault(im.size, f)
                except (UnidentifiedImageError, OSError) as err:
                    raise ValueError(f"{self.name} {f}: not a readable image ({err})") from None
            if len(sizes) > 1:
                (s0, f0), (s1, f1) = list(sizes.items())[:2]
                raise ValueError(f"{self.name} {self.path}: images differ in size ({f0.name} is {s0[0]}x{s0[1]}, "
                                 f"{f1.name} {s1[0]}x{s1[1]})")
            (w, h), = sizes
            return (h, w, 3)
        shape, dtype = tuple(self.npy.shape), self.npy.dtype
        where = f"{self.name} {self.npy.path}"
        if len(shape) == 0 or shape[0] == 0:
            raise ValueError(f"{where}: no sample in it (shape {shape})")
        if self.latent:
            if len(shape) not in (4, 5) or shape[-3] != 4 or not np.issubdtype(dtype, np.floating):
                raise ValueError(f"{where}: `latents` must be float (N, 4, h, w) or (N, T, 4, h, w), got {dtype} "
                                 f"{shape}")
            if self.vae is None:
                raise ValueError(f"{where} holds latents: pass --vae DIR (a local diffusers AutoencoderKL) to decode "
                                 f"them")
            config = getattr(self.vae, "config", None)     # AutoencoderKL: one 2x downsampling per block but one
            f = 2 ** (len(config.block_out_channels) - 1) if config is not None else 8
            return (*shape[1:-3], shape[-2] * f, shape[-1] * f, 3)
        if dtype != np.uint8 or len(shape) not in (4, 5) or shape[-1] != 3:
            raise ValueError(f"{where}: `arr_0` must be uint8 (N, H, W, 3) or (N, T, H, W, 3) as ADM's evaluator "
                             f"reads it, got {dtype} {shape}")
        return shape[1:]

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else int(self.npy.shape[0])

    def batches(self, batch_size: int, limit: int | None = None):
        """Yield uint8 arrays (b, *item_shape), b <= batch_size, for the first `limit` items (default all)."""
        limit = len(self) if limit is None else min(limit, len(self))
        if self.files is not None:
            from PIL import Image
            for start in range(0, limit, batch_size):
                out = []
                for f in self.files[start:start + batch_size]:
                    with Image.open(f) as im:
                        out.append(np.asarray(im.convert("RGB")))
                yield np.stack(out)
            return
        for rows in self.npy.rows(batch_size, limit):
            if not self.latent:
                yield rows
                continue
            z = torch.from_numpy(rows.astype(np.float32))
            frames = decode_latents(self.vae, z.reshape(-1, *z.shape[-3:]))
            yield frames.reshape(len(rows), *self.item_shape)


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance (FID, sFID, FVD)
# ---------------------------------------------------------------------------------------------------------------

def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features (N, D), in float64; N >= 2."""
    f = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {tuple(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) between two Gaussians.

    tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of sigma1 sigma2 (real and >= 0 for
    PSD matrices; rounding leaves tiny imaginary or negative parts, dropped), as in TF-GAN and torch-fidelity: it
    needs no matrix square root, which fails on the singular covariances of fewer samples than dimensions.
    One function serves FID, sFID and FVD, and needs no optional library.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape or sigma1.shape != (len(mu1),) * 2 or sigma2.shape != sigma1.shape:
        raise ValueError(f"mu and sigma must be (D,) and (D, D) alike, got {mu1.shape}, {sigma1.shape}, {mu2.shape}, "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    eig = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    tr_covmean = np.sqrt(eig).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------------------------
# Inception features and `fid`
# ---------------------------------------------------------------------------------------------------------------

def _check_weights(path, flag: str, what: str, url: str) -> Path:
    if path is None or not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file; {what} is read from a local file only (download it once "
                         f"from {url})")
    return Path(path)


def _load_state_dict(path: Path, flag: str) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{flag} {path}: not a readable weights file ({' '.join(str(err).split())[:200]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{flag} {path}: not a state dict (a mapping of names to tensors)")
    return sd


class InceptionFeatures:
    """The TF-2015 Inception-v3 of the FID/IS papers (torch-fidelity's port) from a local weights file.

    __call__(uint8 (B, H, W, 3)) -> {"pool": (B, 2048), "logits": (B, 1008) unbiased logits, "spatial": (B, 2023)}:
    pool_3 for FID and precision/recall, the logits without bias for IS (as ADM's evaluator), and ADM's sFID features
    (mixed_6/conv, the 1x1 branch of Mixed_6d, first 7 channels, flattened in NHWC order).
    """

    def __init__(self, weights, device="cpu"):
        path = _check_weights(weights, "--inception", "the Inception-v3 of FID", INCEPTION_URL)
        sd = _load_state_dict(path, "--inception")
        fe = _need("torch_fidelity.feature_extractor_inceptionv3", "the Inception features (fid)")
        try:
            # The constructor loads the file itself; it was checked above with weights_only=True.
            self.net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                      feature_extractor_weights_path=str(path))
        except RuntimeError as err:
            raise ValueError(f"--inception {path}: not torch-fidelity's Inception-v3 weights "
                             f"({' '.join(str(err).split())[:200]}); {len(sd)} tensors in the file") from None
        self.net = self.net.to(device)
        self.device = torch.device(device)
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :ADM_SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
        pool, logits = self.net(x)
        return {"pool": pool.float().cpu(), "logits": logits.float().cpu(), "spatial": self._spatial.float().cpu()}

    def extract(self, source: ImageSource, batch_size: int, limit: int | None = None, progress: bool = False) -> dict:
        """Features of the first `limit` items of `source`, concatenated: {"pool", "logits", "spatial"}."""
        parts: dict[str, list] = {"pool": [], "logits": [], "spatial": []}
        total = len(source) if limit is None else min(limit, len(source))
        done = 0
        for batch in source.batches(batch_size, limit):
            for k, v in self(batch).items():
                parts[k].append(v)
            done += len(batch)
            if progress:
                print(f"\r{source.name}: {done}/{total} images", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        return {k: torch.cat(v) for k, v in parts.items()}


def fid_metrics(sample_feats: dict, ref_feats: dict, is_splits: int = 10, neighborhood: int = 3) -> dict:
    """ADM's evaluator metrics from Inception features (InceptionFeatures.extract of samples and reference):
    FID (pool_3), sFID (spatial), IS (sample logits, `is_splits` splits), precision and recall (k-NN manifolds with
    k = `neighborhood` on pool_3, Kynkaanniemi et al. 2019)."""
    tf_isc = _need("torch_fidelity.metric_isc", "the Inception Score")
    tf_prc = _need("torch_fidelity.metric_prc", "precision and recall")
    n = len(sample_feats["pool"])
    out = {"fid": frechet_distance(*gaussian_stats(sample_feats["pool"]), *gaussian_stats(ref_feats["pool"])),
           "sfid": frechet_distance(*gaussian_stats(sample_feats["spatial"]), *gaussian_stats(ref_feats["spatial"]))}
    isc = tf_isc.isc_features_to_metric(sample_feats["logits"], splits=min(is_splits, n), shuffle=False)
    out["inception_score"] = isc[tf_isc.KEY_METRIC_ISC_MEAN]
    out["inception_score_std"] = isc[tf_isc.KEY_METRIC_ISC_STD]
    if min(n, len(ref_feats["pool"])) > neighborhood:
        prc = tf_prc.prc_features_to_metric(sample_feats["pool"], ref_feats["pool"], prc_neighborhood=neighborhood,
                                            prc_batch_size=10000, save_cpu_ram=True, verbose=False)
        out["precision"], out["recall"] = prc[tf_prc.KEY_METRIC_PRECISION], prc[tf_prc.KEY_METRIC_RECALL]
    return out


# ---------------------------------------------------------------------------------------------------------------
# `compare`: PSNR, SSIM, LPIPS between paired samples
# ---------------------------------------------------------------------------------------------------------------

def lpips_model(weights, net: str = "alex", device="cpu"):
    """LPIPS (Zhang et al. 2018) from local files: torchmetrics' LPIPS with its packaged linear layers and the
    backbone read from `weights` (torchvision's AlexNet/VGG16 ImageNet file, or a whole LPIPS state dict)."""
    if net not in LPIPS_URLS:
        raise ValueError(f"--lpips-net must be one of {sorted(LPIPS_URLS)}, got {net!r}")
    path = _check_weights(weights, "--lpips", f"LPIPS' {net} backbone", LPIPS_URLS[net])
    sd = _load_state_dict(path, "--lpips")
    mod = _need("torchmetrics.functional.image.lpips", "LPIPS")
    _need("torchvision", "LPIPS")
    # pnet_rand=True builds the backbone without downloading; pretrained=True loads the packaged linear layers.
    model = mod._LPIPS(pretrained=True, net=net, pnet_rand=True)
    if not any(k.startswith("net.") for k in sd):      # torchvision's file: features.{i}.* -> net.slice{k}.{i}.*
        owner = {name.split(".")[2]: name.split(".")[1] for name in model.state_dict() if name.startswith("net.")}
        mapped = {}
        for k, v in sd.items():
            parts = k.split(".")
            if parts[0] == "features" and parts[1] in owner:
                mapped[f"net.{owner[parts[1]]}.{'.'.join(parts[1:])}"] = v
        sd = mapped
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("net.")}
    missing = sorted(set(backbone) - set(sd))
    if missing:
        raise ValueError(f"--lpips {path}: not the {net} backbone ({len(missing)} of its {len(backbone)} tensors are "
                         f"missing, e.g. {missing[0]}); --lpips-net alex takes alexnet-owt-7be5be79.pth, vgg "
                         f"vgg16-397923af.pth")
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as err:
        raise ValueError(f"--lpips {path}: shapes do not fit the {net} backbone "
                         f"({' '.join(str(err).split())[:200]})") from None
    return model.to(device).eval()


@torch.no_grad()
def compare_metrics(a: np.ndarray, b: np.ndarray, lpips=None) -> dict:
    """Per-pair PSNR (dB, peak 255), SSIM (Gaussian window 11, sigma 1.5) and, with an LPIPS model, LPIPS between
    uint8 image batches (N, H, W, 3) of one shape: {"psnr": (N,), "ssim": (N,), "lpips": (N,)} as float64 arrays."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"a and b must be uint8 (N, H, W, 3) of one shape, got {a.shape} and {b.shape}")
    fim = _need("torchmetrics.functional.image", "PSNR and SSIM")
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2).double()
    out = {"psnr": fim.peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=(1, 2, 3)),
           "ssim": fim.structural_similarity_index_measure(x, y, data_range=255.0, reduction="none")}
    if lpips is not None:
        dev = next(lpips.parameters()).device
        scale = lambda t: (t.float() / 127.5 - 1).to(dev)   # noqa: E731 - LPIPS takes [-1, 1]
        out["lpips"] = lpips(scale(x), scale(y)).flatten().double().cpu()
    return {k: v.reshape(len(a)).numpy().astype(np.float64) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# `fvd`
# ---------------------------------------------------------------------------------------------------------------

def fvd(samples: ImageSource, ref: ImageSource, detector, model: str = "i3d", device="cpu", batch_size: int = 8,
        limit: int | None = None) -> dict:
    """Frechet Video Distance between clip sets with cd-fvd's detectors (Ge et al. 2024) from a local file: I3D
    (Kinetics-400 logits, the original FVD of Unterthiner et al.) or VideoMAE-v2 (content-debiased FVD)."""
    if model not in FVD_URLS:
        raise ValueError(f"--model must be one of {sorted(FVD_URLS)}, got {model!r}")
    path = _check_weights(detector, "--detector", f"FVD's {model} detector", FVD_URLS[model])
    frames = samples.item_shape[0]
    if ref.item_shape[0] != frames:
        raise ValueError(f"samples have {frames} frames per clip and ref {ref.item_shape[0]}: they must match")
    if model == "i3d" and frames < 9:     # I3D downsamples time 8x, then pools 2 steps
        raise ValueError(f"I3D needs clips of at least 9 frames (FVD is usually taken on 16), got {frames}")
    if model == "videomae" and frames != 16:
        raise ValueError(f"VideoMAE-v2 takes clips of exactly 16 frames, got {frames}")
    if model == "i3d":
        utils = _need("cdfvd.third_party.i3d.utils", "FVD")
        load, prep = utils.load_i3d_model, utils.preprocess_i3d
    else:
        utils = _need("cdfvd.third_party.VideoMAEv2.utils", "FVD")
        load, prep = utils.load_videomae_model, utils.preprocess_videomae
    try:
        net = load(torch.device(device), str(path)).eval()
    except (RuntimeError, KeyError, OSError) as err:
        raise ValueError(f"--detector {path}: not cd-fvd's {model} weights ({' '.join(str(err).split())[:200]})") \
            from None
    run = net if model == "i3d" else net.forward_features

    def features(source):
        out = []
        with torch.no_grad():
            for clips in source.batches(batch_size, limit):
                out.append(run(prep(clips).to(device)).float().cpu())
        return torch.cat(out)

    fs, fr = features(samples), features(ref)
    return {"fvd": frechet_distance(*gaussian_stats(fs), *gaussian_stats(fr)), "detector": model}


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="{fid,compare,fvd,pack}")

    def common(q, vae=True):
        if vae:
            q.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder, to decode latents.npz")
        q.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        q.add_argument("--batch-size", type=_positive, default=50)
        q.add_argument("--num-samples", type=_positive, default=None, help="use the first N of each set")
        q.add_argument("--json", default=None, help="also write the metrics to this JSON file")

    q = sub.add_parser("fid", help="FID, sFID, IS, precision, recall against a reference set")
    q.add_argument("samples", help="folder, ADM .npz (arr_0) or latents.npz")
    q.add_argument("ref", help="reference: folder or ADM reference batch .npz (arr_0)")
    q.add_argument("--inception", required=True, help=f"Inception-v3 weights file (from {INCEPTION_URL})")
    q.add_argument("--is-splits", type=_positive, default=10)
    q.add_argument("--no-progress", action="store_true")
    common(q)

    q = sub.add_parser("compare", help="PSNR, SSIM, LPIPS between two sample sets of the same seeds")
    q.add_argument("a", help="e.g. FlexDiT samples (folder, ADM .npz or latents.npz)")
    q.add_argument("b", help="e.g. dense samples of the same seeds and labels")
    q.add_argument("--lpips", default=None, help="LPIPS backbone weights (torchvision's AlexNet/VGG16 file); "
                                                 "without it LPIPS is left out")
    q.add_argument("--lpips-net", choices=sorted(LPIPS_URLS), default="alex")
    common(q)

    q = sub.add_parser("fvd", help="Frechet Video Distance between clip sets")
    q.add_argument("samples", help="ADM-style .npz of clips (arr_0 (N, T, H, W, 3)) or latents.npz (N, T, 4, h, w)")
    q.add_argument("ref", help="reference clips, same layouts")
    q.add_argument("--detector", required=True, help="I3D or VideoMAE-v2 weights file (cd-fvd's)")
    q.add_argument("--model", choices=sorted(FVD_URLS), default="i3d")
    common(q)

    q = sub.add_parser("pack", help="write images (folder or latents + VAE) as an ADM .npz (arr_0)")
    q.add_argument("src", help="folder of images, or latents.npz / a flexdit-sample folder with --vae")
    q.add_argument("out", help="output .npz")
    common(q)
    return p


def _open_sources(args, names, video):
    device = resolve_device(args.device)
    vae = load_vae(args.vae, device) if getattr(args, "vae", None) else None
    sources = [ImageSource(getattr(args, n), vae=vae, video=video, name=n) for n in names]
    return device, sources


def _paired_count(args, a: ImageSource, b: ImageSource) -> int:
    if len(a) != len(b):
        raise ValueError(f"{a.name} has {len(a)} samples and {b.name} {len(b)}: the pairs must come from the same "
                         f"seeds (use --num-samples to take the first N of each)")
    if a.item_shape != b.item_shape:
        raise ValueError(f"{a.name} items are {a.item_shape} and {b.name} items {b.item_shape}: sizes must match")
    return len(a) if args.num_samples is None else min(args.num_samples, len(a))


def _report(args, metrics: dict, lines: list[str]) -> None:
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))


def _cmd_fid(args) -> None:
    with usage_errors(PROG):
        device, (samples, ref) = _open_sources(args, ["samples", "ref"], video=False)
        net = InceptionFeatures(args.inception, device)
        _need("torch_fidelity.metric_prc", "precision and recall")
    n = len(samples) if args.num_samples is None else min(args.num_samples, len(samples))
    if n < 2 or len(ref) < 2:
        fail(PROG, f"FID needs at least 2 samples and 2 reference images, got {n} and {len(ref)}")
    fs = net.extract(samples, args.batch_size, n, progress=not args.no_progress)
    fr = net.extract(ref, args.batch_size, progress=not args.no_progress)
    m = {"num_samples": n, "num_ref": len(ref), **fid_metrics(fs, fr, args.is_splits)}
    lines = [f"samples {args.samples} ({n}), reference {args.ref} ({len(ref)})",
             f"FID        {max(m['fid'], 0.0):.4f}", f"sFID       {max(m['sfid'], 0.0):.4f}",   # >= 0 but for rounding
             f"IS         {m['inception_score']:.4f} +- {m['inception_score_std']:.4f}"]
    if "precision" in m:
        lines += [f"precision  {m['precision']:.4f}", f"recall     {m['recall']:.4f}"]
    if n < 50000:
        lines.append(f"note: FID is biased upward at {n} samples; the paper reports FID-50K")
    _report(args, m, lines)


def _cmd_compare(args) -> None:
    with usage_errors(PROG):
        device, (a, b) = _open_sources(args, ["a", "b"], video=False)
        n = _paired_count(args, a, b)
        lpips = lpips_model(args.lpips, args.lpips_net, device) if args.lpips else None
        _need("torchmetrics.functional.image", "PSNR and SSIM")
    parts: dict[str, list] = {}
    for xa, xb in zip(a.batches(args.batch_size, n), b.batches(args.batch_size, n)):
        for k, v in compare_metrics(xa, xb, lpips).items():
            parts.setdefault(k, []).append(v)
    per = {k: np.concatenate(v) for k, v in parts.items()}
    m = {"num_pairs": n}
    with np.errstate(invalid="ignore"):       # PSNR of identical pairs is inf, its spread nan
        for k, v in per.items():
            m[k], m[f"{k}_std"] = float(v.mean()), float(v.std())
    lines = [f"{args.a} vs {args.b}: {n} pairs",
             f"PSNR   {m['psnr']:.3f} dB +- {m['psnr_std']:.3f}" if np.isfinite(m["psnr"]) else
             "PSNR   inf (identical images)",
             f"SSIM   {m['ssim']:.4f} +- {m['ssim_std']:.4f}"]
    lines.append(f"LPIPS  {m['lpips']:.4f} +- {m['lpips_std']:.4f} ({args.lpips_net})" if lpips is not None else
                 "LPIPS  left out (--lpips FILE: torchvision's AlexNet or VGG16 ImageNet weights)")
    _report(args, m, lines)


def _cmd_fvd(args) -> None:
    with usage_errors(PROG):
        device, (samples, ref) = _open_sources(args, ["samples", "ref"], video=True)
        n = min(len(samples), len(ref), args.num_samples or len(samples))
        if min(len(samples), len(ref), n) < 2:
            raise ValueError(f"FVD needs at least 2 clips per set, got {len(samples)} and {len(ref)}")
        m = fvd(samples, ref, args.detector, args.model, device, args.batch_size, n)
    m["num_clips"] = n
    _report(args, m, [f"samples {args.samples}, reference {args.ref}: {n} clips each",
                      f"FVD ({args.model})  {m['fvd']:.3f}"])


def _cmd_pack(args) -> None:
    with usage_errors(PROG):
        if not str(args.out).endswith(".npz") or not Path(args.out).parent.is_dir():
            raise ValueError(f"out {args.out}: must be a .npz file in an existing folder")
        _, (src,) = _open_sources(args, ["src"], video=None)
    n = len(src) if args.num_samples is None else min(args.num_samples, len(src))
    pack_adm_npz(src, args.out, batch_size=args.batch_size, limit=n)
    print(f"wrote {args.out}: arr_0 uint8 {(n, *src.item_shape)}")


def main(argv=None) -> int:
    """Run flexdit-eval; 0 on success. Bad arguments, files or layouts end it with one line and exit 2."""
    args = build_parser().parse_args(argv)
    {"fid": _cmd_fid, "compare": _cmd_compare, "fvd": _cmd_fvd, "pack": _cmd_pack}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
