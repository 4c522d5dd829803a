"""Latent datasets for fine-tuning: the shard format, its loader and checks, a synthetic generator, and a converter.

Shard format: a folder of `*.npz` files (read in sorted name order), each holding
  `latents`  float16 or float32, (n, 4, h, w): VAE latents already multiplied by the VAE scaling factor (0.18215);
             for video, (n, T, 4, h, w): T frames of latents per clip;
  `labels`   int64 (any integer dtype is accepted), (n,): class indices in [0, num_classes).
Every shard must have the same (4, h, w) (or (T, 4, h, w)). `python -m flexdit.data IMAGE_DIR OUT_DIR --vae VAE_DIR`
writes shards from an ImageFolder tree (one sub-folder per class, classes sorted by name); it needs diffusers.
"""
from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["LatentShards", "write_shard", "make_synthetic_shards", "synthetic_latents", "encode_image_folder",
           "VAE_SCALE"]

VAE_SCALE = 0.18215


def write_shard(path, latents, labels) -> None:
    """Write one shard atomically (temp file + os.replace)."""
    latents = np.asarray(latents)
    labels = np.asarray(labels, dtype=np.int64)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, latents=latents, labels=labels)
    os.replace(tmp, path)


class LatentShards:
    """All shards of a folder, checked and held in memory as one float16 tensor (N, C, h, w) and labels (N,);
    with `frames` (video), clips (N, frames, C, h, w).

    Raises ValueError, before any training, for: a missing or empty folder, a shard that cannot be read or lacks
    `latents`/`labels`, latents not (n, channels, input_size, input_size) (or (n, frames, channels, ...)), non-finite
    latents, labels that are not integers, a labels/latents length mismatch, or labels outside [0, num_classes).
    """

    def __init__(self, root, channels: int = 4, input_size: int | tuple[int, int] | None = None,
                 num_classes: int | None = None, frames: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data: {root} is not a folder")
        files = sorted(root.glob("*.npz"))
        if not files:
            raise ValueError(f"data: no .npz shards in {root}")
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        latents, labels = [], []
        for f in files:
            lat, lab = self._read(f)
            if frames is None and (lat.ndim != 4 or lat.shape[1] != channels):
                raise ValueError(f"data: {f.name}: latents must be (n, {channels}, h, w), got {lat.shape}")
            if frames is not None and (lat.ndim != 5 or lat.shape[1:3] != (frames, channels)):
                raise ValueError(f"data: {f.name}: video latents must be (n, {frames}, {channels}, h, w) "
                                 f"(clips of {frames} frames), got {lat.shape}")
            if input_size is not None and tuple(lat.shape[-2:]) != tuple(input_size):
                raise ValueError(f"data: {f.name}: latents are {lat.shape[-2]}x{lat.shape[-1]}, "
                                 f"the model takes {input_size[0]}x{input_size[1]}")
            if latents and lat.shape[1:] != latents[0].shape[1:]:
                raise ValueError(f"data: {f.name}: latent shape {lat.shape[1:]} differs from "
                                 f"{files[0].name}'s {latents[0].shape[1:]}")
            if lat.dtype not in (np.float16, np.float32):
                raise ValueError(f"data: {f.name}: latents must be float16 or float32, got {lat.dtype}")
            if not np.all(np.isfinite(lat)):
                raise ValueError(f"data: {f.name}: latents contain NaN or inf")
            if lab.ndim != 1 or lab.shape[0] != lat.shape[0]:
                raise ValueError(f"data: {f.name}: labels must be ({lat.shape[0]},), got {lab.shape}")
            if not np.issubdtype(lab.dtype, np.integer):
                raise ValueError(f"data: {f.name}: labels must be integers, got {lab.dtype}")
            if lab.size and (lab.min() < 0 or (num_classes is not None and lab.max() >= num_classes)):
                raise ValueError(f"data: {f.name}: labels must lie in [0, {num_classes}), "
                                 f"got values in [{lab.min()}, {lab.max()}]")
            latents.append(lat.astype(np.float16))
            labels.append(lab.astype(np.int64))
        self.latents = torch.from_numpy(np.concatenate(latents))
        self.labels = torch.from_numpy(np.concatenate(labels))
        if len(self.labels) == 0:
            raise ValueError(f"data: the shards in {root} hold no samples")
        self.files = files
        self.frames = frames

    @staticmethod
    def _read(f: Path):
        try:
            with np.load(f, allow_pickle=False) as z:
                missing = {"latents", "labels"} - set(z.files)
                if missing:
                    raise ValueError(f"data: {f.name}: missing arrays {sorted(missing)} (has {z.files})")
                return z["latents"], z["labels"]
        except ValueError:
            raise
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"data: {f.name}: cannot read the shard ({type(e).__name__}: {e})") from e

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor, device=None, dtype=torch.float32):
        """(latents (B, C, h, w), or clips (B, C, T, h, w), as dtype, labels (B,)) for sample indices."""
        x = self.latents[indices].to(device=device, dtype=dtype)
        if self.frames is not None:
            x = x.permute(0, 2, 1, 3, 4)                                 # (B, T, C, h, w) -> (B, C, T, h, w)
        return x, self.labels[indices].to(device)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data (tests and the CPU end-to-end proof)
# ---------------------------------------------------------------------------------------------------------------

def synthetic_latents(n: int, num_classes: int = 4, size: int = 16, channels: int = 4, seed: int = 0,
                      noise: float = 0.05, frames: int | None = None):
    """n structured latents (n, channels, size, size) float32 and labels (n,): class c is a 2-D grating whose
    orientation and frequency depend on c, with a per-channel amplitude pattern, random phase and a little noise.
    With `frames`, clips (n, frames, channels, size, size) of a grating drifting by a class-dependent step per frame.
    Values stay roughly in [-1, 1]. Seeded (a torch.Generator), so the same seed gives the same arrays."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = labels.float() * (torch.pi / num_classes)                           # (n,)
    freq = 1.0 + (labels % 2).float()                                            # 1 or 2 periods per image
    phase = torch.rand(n, generator=g) * 2 * torch.pi
    proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    ch = torch.arange(channels, dtype=torch.float32)
    amp = torch.cos(ch[None, :] * (1.0 + labels.float()[:, None]))              # (n, channels), class-dependent
    steps = torch.arange(frames or 1, dtype=torch.float32)                       # (T,)
    drift = phase[:, None] + steps[None] * (0.3 + 0.2 * labels.float()[:, None])   # (n, T)
    wave = torch.sin(2 * torch.pi * freq[:, None, None, None] * proj[:, None] + drift[:, :, None, None])
    x = amp[:, None, :, None, None] * wave[:, :, None] * 0.8                     # (n, T, channels, size, size)
    x = x + noise * torch.randn(x.shape, generator=g)
    x = x if frames else x[:, 0]
    return x.numpy().astype(np.float32), labels.numpy().astype(np.int64)


def make_synthetic_shards(root, n: int = 512, shard_size: int = 256, **kwargs) -> list[Path]:
    """Write `synthetic_latents(n, **kwargs)` as float16 shards of at most `shard_size` samples into `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lat, lab = synthetic_latents(n, **kwargs)
    paths = []
    for i, start in enumerate(range(0, n, shard_size)):
        p = root / f"shard_{i:05d}.npz"
        write_shard(p, lat[start:start + shard_size].astype(np.float16), lab[start:start + shard_size])
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Image folder → latent shards (needs diffusers)
# ---------------------------------------------------------------------------------------------------------------

def _center_crop(img, size: int):
    """ADM's centre crop: halve with a box filter while large, resize with bicubic, then crop the centre."""
    from PIL import Image
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def _progress(total: int, enabled: bool, desc: str):
    """A tqdm bar over `total` items, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img")


def encode_image_folder(image_dir, out_dir, vae_path, image_size: int = 256, shard_size: int = 4096,
                        batch_size: int = 32, device: str | None = None, flip: bool = False,
                        progress: bool = False) -> int:
    """Encode an ImageFolder tree (class sub-folders, sorted) with a local diffusers AutoencoderKL into shards.

    Latents are a sample of the VAE posterior times VAE_SCALE, as in DiT's feature extraction (seeded).
    With flip=True each image is also stored mirrored (a mirrored copy counts towards `shard_size`). Every shard
    but the last holds exactly `shard_size` latents. progress=True shows a tqdm bar when tqdm is installed.
    Returns the number of latents written.
    """
    for name, value in (("image_size", image_size), ("shard_size", shard_size), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (the VAE downsamples by 8), got {image_size}")
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    if not image_dir.is_dir():
        raise ValueError(f"image_dir: {image_dir} is not a folder")
    if not Path(vae_path).is_dir():
        raise ValueError(f"vae_path: {vae_path} is not a folder (a diffusers AutoencoderKL saved with "
                         "save_pretrained)")
    classes = sorted(d.name for d in image_dir.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"image_dir: {image_dir} has no class sub-folders")
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    items = [(p, c) for c, name in enumerate(classes) for p in sorted((image_dir / name).rglob("*"))
             if p.suffix.lower() in exts]
    if not items:
        raise ValueError(f"image_dir: no images under {image_dir}")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise ImportError("encode_image_folder needs diffusers (pip install flexdit[diffusers])") from None
    from PIL import Image

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(vae_path).to(device).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    pending_lat = np.zeros((0,), dtype=np.float16)
    pending_lab = np.zeros((0,), dtype=np.int64)
    shard_idx, total = 0, 0

    def write(n: int):
        nonlocal pending_lat, pending_lab, shard_idx
        write_shard(out_dir / f"shard_{shard_idx:05d}.npz", pending_lat[:n], pending_lab[:n])
        pending_lat, pending_lab = pending_lat[n:], pending_lab[n:]
        shard_idx += 1

    def load(path):
        try:
            with Image.open(path) as img:
                return _center_crop(img.convert("RGB"), image_size)
        except OSError as e:
            raise ValueError(f"image {path}: cannot read it ({e})") from None

    bar = _progress(len(items), progress, "encoding")
    g = torch.Generator(device=device).manual_seed(0)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        imgs = np.stack([load(p) for p, _ in chunk])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        labels = np.array([c for _, c in chunk], dtype=np.int64)
        if flip:
            x = torch.cat([x, x.flip(-1)])
            labels = np.concatenate([labels, labels])
        with torch.no_grad():
            z = vae.encode(x.to(device=device, dtype=vae.dtype)).latent_dist.sample(generator=g) * VAE_SCALE
        z = z.float().cpu().numpy().astype(np.float16)
        pending_lat = z if len(pending_lab) == 0 else np.concatenate([pending_lat, z])
        pending_lab = np.concatenate([pending_lab, labels])
        total += len(labels)
        while len(pending_lab) >= shard_size:
            write(shard_size)
        if bar is not None:
            bar.update(len(chunk))
    if len(pending_lab):
        write(len(pending_lab))
    if bar is not None:
        bar.close()
    return total


def main(argv=None) -> int:
    """`python -m flexdit.data IMAGE_DIR OUT_DIR --vae VAE_DIR`; 0 on success, 2 (one line) for a bad argument,
    folder, image or device, or a missing diffusers."""
    from ._cli import resolve_device, usage_errors
    prog = "python -m flexdit.data"
    p = argparse.ArgumentParser(prog=prog,
                                description="Encode an ImageFolder tree into FlexDiT latent shards (.npz).")
    p.add_argument("image_dir")
    p.add_argument("out_dir")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=4096, help="latents per shard (the last one may hold fewer)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--flip", action="store_true", help="also store horizontally mirrored copies")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    with usage_errors(prog):
        device = str(resolve_device(args.device))
        try:
            n = encode_image_folder(args.image_dir, args.out_dir, args.vae, image_size=args.image_size,
                                    shard_size=args.shard_size, batch_size=args.batch_size, device=device,
                                    flip=args.flip, progress=not args.no_progress)
        except ImportError as e:
            raise ValueError(str(e)) from None
    print(f"wrote {n} latents to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
