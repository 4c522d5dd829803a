"""Latent datasets for fine-tuning: the shard formats, their loaders and checks, a synthetic generator, and encoders.

Class-conditional shard format: a folder of `*.npz` files (read in sorted name order), each holding
  `latents`  float16 or float32, (n, 4, h, w): VAE latents already multiplied by the VAE scaling factor (0.18215);
             for video, (n, T, 4, h, w): T frames of latents per clip;
  `labels`   int64 (any integer dtype is accepted), (n,): class indices in [0, num_classes).
Every shard must have the same (4, h, w) (or (T, 4, h, w)). `python -m flexdit.data IMAGE_DIR OUT_DIR --vae VAE_DIR`
writes shards from an ImageFolder tree (one sub-folder per class, classes sorted by name); it needs diffusers.

Text-conditioned shard format (PixArt-α, SD3 / SD3.5, FLUX.1): a folder with `meta.json`
  {"host": "pixart" | "sd3" | "flux", "image_size": int, "latent_channels": int, "max_sequence_length": int,
   "count": int, "encoders": [names]}
and `*.npz` shards whose arrays are named after the transformer's forward arguments:
  `latents`                 float16, (n, C, h, w), scaled as the host's pipeline scales them (PixArt-α:
                            × scaling_factor; SD3 / FLUX: (x − shift_factor) × scaling_factor); FLUX latents are
                            not packed into 2×2 tokens;
  `encoder_hidden_states`   float16, (n, L, D): the pipeline's `encode_prompt` output;
  `encoder_attention_mask`  uint8, (n, L), 1 for caption tokens (PixArt-α only);
  `pooled_projections`      float16, (n, P): CLIP's pooled embedding (SD3 / FLUX only).
meta.json's optional `"null_text": "null_text.npz"` names the pipeline's encoding of the empty caption "" (the same
text arrays with n = 1, no latents), stored once per folder for caption dropout; it is not a shard.
`python -m flexdit.data text IMAGE_DIR OUT_DIR --pipeline PIPELINE_DIR` writes them from images with captions.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["LatentShards", "write_shard", "make_synthetic_shards", "synthetic_latents", "encode_image_folder",
           "TextShards", "write_text_shards", "encode_caption_folder", "TEXT_KEYS", "VAE_SCALE"]

VAE_SCALE = 0.18215
NULL_TEXT = "null_text.npz"     # a text shard folder's encoding of the empty caption (caption dropout)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _save_npz(path, **arrays) -> None:
    """np.savez (uncompressed: TextShards memory-maps the members) atomically: temp file + os.replace."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def write_shard(path, latents, labels) -> None:
    """Write one class-conditional shard atomically (temp file + os.replace)."""
    _save_npz(path, latents=np.asarray(latents), labels=np.asarray(labels, dtype=np.int64))


class _ShardWriter:
    """Collects dicts of equally long arrays and writes `shard_00000.npz`, ... of exactly `shard_size` rows (the
    last one may hold fewer) through `save(path, **arrays)`."""

    def __init__(self, out_dir, shard_size: int, save=_save_npz):
        self.out_dir, self.shard_size, self.save = Path(out_dir), int(shard_size), save
        self.pending: dict[str, list] = {}
        self.rows = self.total = 0
        self.paths: list[Path] = []

    def add(self, arrays: dict, where: str = "") -> None:
        """Append samples (`where` names them in the errors of a subclass's checks)."""
        for k, v in arrays.items():
            self.pending.setdefault(k, []).append(np.asarray(v))
        n = len(next(iter(arrays.values())))
        self.rows += n
        self.total += n
        while self.rows >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> list[Path]:
        if self.rows:
            self._write(self.rows)
        return self.paths

    def _write(self, n: int) -> None:
        joined = {k: np.concatenate(v) for k, v in self.pending.items()}
        path = self.out_dir / f"shard_{len(self.paths):05d}.npz"
        self.save(path, **{k: v[:n] for k, v in joined.items()})
        self.paths.append(path)
        self.pending = {k: [v[n:]] for k, v in joined.items()}
        self.rows -= n


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
# Text-conditioned shards (PixArt-α, SD3 / SD3.5, FLUX.1)
# ---------------------------------------------------------------------------------------------------------------

# host -> the arrays of its shards (the transformer's forward keyword names, and `latents`)
TEXT_KEYS = {"pixart": ("latents", "encoder_hidden_states", "encoder_attention_mask"),
             "sd3": ("latents", "encoder_hidden_states", "pooled_projections"),
             "flux": ("latents", "encoder_hidden_states", "pooled_projections")}
_META_INTS = ("image_size", "latent_channels", "max_sequence_length", "count")


def _check_meta(meta, where: str) -> dict:
    """The meta dict of a text shard folder, checked; ValueError starting with `where`."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("host", *_META_INTS, "encoders") if k not in meta]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if meta["host"] not in TEXT_KEYS:
        raise ValueError(f"{where}: host must be one of {sorted(TEXT_KEYS)}, got {meta['host']!r}")
    for k in _META_INTS:
        low = 0 if k == "count" else 1
        if not isinstance(meta[k], int) or isinstance(meta[k], bool) or meta[k] < low:
            raise ValueError(f"{where}: {k} must be an integer >= {low}, got {meta[k]!r}")
    if not isinstance(meta["encoders"], list) or not all(isinstance(e, str) for e in meta["encoders"]):
        raise ValueError(f"{where}: encoders must be a list of names, got {meta['encoders']!r}")
    null = meta.get("null_text")
    if null is not None and (not isinstance(null, str) or Path(null).name != null or not null.endswith(".npz")):
        raise ValueError(f"{where}: null_text must be the name of an .npz file in the folder, got {null!r}")
    return meta


def _check_null_text(arrays: dict, meta: dict, first: dict, where: str) -> None:
    """The empty caption's text arrays: TEXT_KEYS[host] without latents, one row each, shaped as a shard's rows
    (`first`); ValueError starting with `where`."""
    want = [k for k in TEXT_KEYS[meta["host"]] if k != "latents"]
    if sorted(arrays) != sorted(want):
        raise ValueError(f"{where}: holds {sorted(arrays)}, a {meta['host']} null encoding holds {sorted(want)}")
    for k, v in arrays.items():
        if v.shape != (1, *first[k]):
            raise ValueError(f"{where}: {k} must be {(1, *first[k])} (one row as the shards'), got {v.shape}")


def _check_text_arrays(arrays: dict, meta: dict, where: str, first: dict | None = None) -> int:
    """The row count of one shard's arrays (numpy arrays or memmaps), after checking keys, ranks, dtypes and sizes
    against the meta (and the first shard's per-row shapes, `first`); ValueError starting with `where`."""
    host = meta["host"]
    want = TEXT_KEYS[host]
    missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
    if missing or extra:
        raise ValueError(f"{where}: a {host} shard holds exactly {list(want)}; missing {missing}, unexpected {extra}")
    lat, text = arrays["latents"], arrays["encoder_hidden_states"]
    n = lat.shape[0] if lat.ndim else 0
    if lat.ndim != 4 or lat.shape[1] != meta["latent_channels"]:
        raise ValueError(f"{where}: latents must be (n, {meta['latent_channels']}, h, w), got {lat.shape}")
    if text.ndim != 3 or text.shape[0] != n:
        raise ValueError(f"{where}: encoder_hidden_states must be ({n}, L, D), got {text.shape}")
    if host != "sd3" and text.shape[1] != meta["max_sequence_length"]:   # SD3 prepends CLIP's 77 tokens to T5's
        raise ValueError(f"{where}: encoder_hidden_states has {text.shape[1]} tokens, meta.json's "
                         f"max_sequence_length is {meta['max_sequence_length']}")
    shapes = {"encoder_attention_mask": (n, text.shape[1]), "pooled_projections": (n, None)}
    for k, v in arrays.items():
        integer = k == "encoder_attention_mask"
        ok = (np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_) if integer else \
            v.dtype in (np.float16, np.float32)
        if not ok:
            raise ValueError(f"{where}: {k} must be {'integers' if integer else 'float16 or float32'}, got {v.dtype}")
        if k in shapes:
            want_shape = shapes[k]
            if v.ndim != len(want_shape) or any(w is not None and w != s for w, s in zip(want_shape, v.shape)):
                dims = ", ".join("P" if w is None else str(w) for w in want_shape)
                raise ValueError(f"{where}: {k} must be ({dims}), got {v.shape}")
        if first is not None and v.shape[1:] != first[k]:
            raise ValueError(f"{where}: {k} rows are {v.shape[1:]}, the first shard's are {first[k]}")
    return n


def _npz_members(path: Path) -> dict:
    """The arrays of an .npz file without reading them: a read-only memmap per stored (uncompressed) member, the
    loaded array for a compressed one. Raises OSError / zipfile.BadZipFile / ValueError for a broken file."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            fh.seek(info.header_offset)
            local = fh.read(30)                  # the local file header: name and extra-field lengths at 26 and 28
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"member {info.filename} has no local header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            if dtype.hasobject:
                raise ValueError(f"member {info.filename} holds Python objects")
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=fh.tell(),
                                      order="F" if fortran else "C")
    return out


class TextShards(torch.utils.data.Dataset):
    """The text-conditioned shards of a folder (see the module docstring), memory-mapped: a sample is read from
    disk when it is asked for, so a folder may exceed the host's memory.

    `ds[i]` is a dict with the shard's keys: float32 tensors, `encoder_attention_mask` (PixArt-α) a uint8 tensor;
    `ds.meta` is meta.json, `ds.latent_shape` the (C, h, w) of a sample's latents, `ds.null_text` the empty
    caption's text inputs (a dict of (1, ...) tensors as `ds.batch` gives them, no latents) or None for a folder
    written without it. Raises ValueError naming the
    file, before any training, for a missing folder or meta.json, a meta.json that is not valid, a shard that cannot
    be read, lacks or adds arrays, has ranks, dtypes or per-row shapes that disagree with meta.json or the first
    shard, or a sample count other than meta's `count`; when a sample is read, for NaN or inf in it or a mask that
    is not 0/1.
    """

    def __init__(self, folder):
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"data: {root} is not a folder")
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"data: {meta_path}: missing (a text shard folder written by `python -m flexdit.data "
                             f"--pipeline` or write_text_shards)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"data: {meta_path}: cannot read it ({type(e).__name__}: {e})") from None
        self.meta = _check_meta(meta, f"data: {meta_path}")
        null_name = self.meta.get("null_text")
        self.files = sorted(f for f in root.glob("*.npz") if f.name != null_name)
        if not self.files:
            raise ValueError(f"data: no .npz shards in {root}")
        self._starts, first, total = [], None, 0
        for f in self.files:
            try:
                arrays = _npz_members(f)
            except (OSError, EOFError, ValueError, zipfile.BadZipFile, struct.error) as e:
                raise ValueError(f"data: {f}: cannot read the shard ({type(e).__name__}: {e})") from None
            n = _check_text_arrays(arrays, self.meta, f"data: {f}", first)
            first = first or {k: v.shape[1:] for k, v in arrays.items()}
            self._starts.append(total)
            total += n
        if total != self.meta["count"]:
            raise ValueError(f"data: {meta_path}: count is {self.meta['count']}, the shards hold {total} samples")
        if total == 0:
            raise ValueError(f"data: the shards in {root} hold no samples")
        self._count = total
        self.latent_shape = tuple(first["latents"])   # (C, h, w): h = image_size / the VAE's factor
        self._open: dict[int, dict] = {}         # shard index -> memmaps, opened lazily in each process
        self.null_text = None
        if null_name is not None:
            path = root / null_name
            try:
                arrays = _npz_members(path)
            except (OSError, EOFError, ValueError, zipfile.BadZipFile, struct.error) as e:
                raise ValueError(f"data: {path}: cannot read the empty caption's encoding (meta.json's null_text) "
                                 f"({type(e).__name__}: {e})") from None
            _check_null_text(arrays, self.meta, first, f"data: {path}")
            self.null_text = {k: v[None] for k, v in self._tensors(arrays, 0, path).items()}

    def __getstate__(self):                      # DataLoader workers re-open the memmaps
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not -self._count <= index < self._count:
            raise IndexError(f"index {index} is out of range for {self._count} samples")
        index %= self._count
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        if k not in self._open:
            self._open[k] = _npz_members(self.files[k])
        return self._tensors(self._open[k], index - self._starts[k], self.files[k])

    @staticmethod
    def _tensors(arrays: dict, row: int, path: Path) -> dict:
        """Row `row` of a file's arrays as tensors: float32, the mask uint8; ValueError for NaN / inf or a mask
        that is not 0/1."""
        out = {}
        for name, arr in arrays.items():
            v = np.array(arr[row])
            if name == "encoder_attention_mask":
                if v.size and (v.min() < 0 or v.max() > 1):
                    raise ValueError(f"data: {path}: sample {row}: encoder_attention_mask is not 0/1")
                out[name] = torch.from_numpy(v.astype(np.uint8))
            else:
                if not np.all(np.isfinite(v)):
                    raise ValueError(f"data: {path}: sample {row}: {name} contains NaN or inf")
                out[name] = torch.from_numpy(v.astype(np.float32))
        return out

    def batch(self, indices, device=None) -> dict:
        """The samples at `indices` stacked: a dict of (B, ...) tensors on `device`."""
        items = [self[i] for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if not items:
            raise ValueError("indices: empty (a batch needs at least one sample)")
        return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def write_text_shards(folder, items: dict, meta: dict, shard_size: int = 1024,
                      null_text: dict | None = None) -> list[Path]:
    """Write `items` (a dict of equally long arrays named as TEXT_KEYS[meta["host"]]) as text shards of at most
    `shard_size` samples into `folder`, float arrays as float16 and the mask as uint8, then `meta.json` (its `count`
    set to the number of samples). `null_text`, the text arrays of the empty caption "" with one row (no latents),
    is stored as `null_text.npz` for caption dropout (`TextShards.null_text`). Returns the shard paths. ValueError
    naming the argument for bad items, meta or null_text."""
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not isinstance(items, dict):
        raise ValueError(f"items must be a dict of arrays, got {type(items).__name__}")
    items = {k: np.asarray(v) for k, v in items.items()}
    items = {k: v.astype(np.float16) if np.issubdtype(v.dtype, np.floating) and k != "encoder_attention_mask" else v
             for k, v in items.items()}
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    meta = _check_meta({**meta, "count": len(items["latents"]) if "latents" in items else 0}, "meta")
    _check_text_arrays(items, meta, "items")
    if null_text is not None:
        if not isinstance(null_text, dict):
            raise ValueError(f"null_text must be a dict of arrays, got {type(null_text).__name__}")
        null_text = {k: np.asarray(v) for k, v in null_text.items()}
        _check_null_text(null_text, meta, {k: v.shape[1:] for k, v in items.items()}, "null_text")
    writer = _TextShardWriter(folder, meta, shard_size)
    writer.null_text = null_text
    writer.add(items, "items")
    return writer.close()


class _TextShardWriter(_ShardWriter):
    """A `_ShardWriter` of text shards (float16 arrays, uint8 mask) that writes meta.json, with the count, last;
    `null_text` (the empty caption's text arrays, one row), when set, goes to `null_text.npz` before it."""

    def __init__(self, folder, meta: dict, shard_size: int):
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"folder {folder}: exists and is not a folder")
        if folder.is_dir() and (any(folder.glob("*.npz")) or (folder / "meta.json").exists()):
            raise ValueError(f"folder {folder}: already holds shards or a meta.json; write into a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder, shard_size)
        self.meta = meta
        self.null_text: dict | None = None

    def add(self, arrays: dict, where: str) -> None:
        """Append samples; ValueError starting with `where` for NaN / inf or a mask that is not 0/1."""
        super().add(self._stored(arrays, where))

    @staticmethod
    def _stored(arrays: dict, where: str) -> dict:
        """The arrays as stored: float16, the mask uint8; ValueError for NaN / inf or a mask that is not 0/1."""
        out = {}
        for k, v in arrays.items():
            v = np.asarray(v)
            if k == "encoder_attention_mask":
                if v.size and (v.min() < 0 or v.max() > 1):
                    raise ValueError(f"{where}: encoder_attention_mask must hold 0/1 values")
                out[k] = v.astype(np.uint8)
            else:
                out[k] = v.astype(np.float16)
                if not np.all(np.isfinite(out[k])):
                    raise ValueError(f"{where}: {k} contains NaN or inf (or values beyond float16's range)")
        return out

    def close(self) -> list[Path]:
        paths = super().close()
        meta = {**self.meta, "count": self.total}
        if self.null_text is not None:
            self.save(self.out_dir / NULL_TEXT, **self._stored(self.null_text, "null_text"))
            meta["null_text"] = NULL_TEXT
        tmp = self.out_dir / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.out_dir / "meta.json")
        return paths


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


def _image_batch(paths, image_size: int) -> torch.Tensor:
    """Images centre-cropped to image_size², as (B, 3, image_size, image_size) float32 in [-1, 1]; ValueError naming
    the file for one that cannot be read."""
    from PIL import Image
    imgs = []
    for path in paths:
        try:
            with Image.open(path) as img:
                imgs.append(_center_crop(img.convert("RGB"), image_size))
        except OSError as e:
            raise ValueError(f"image {path}: cannot read it ({e})") from None
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


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
    items = [(p, c) for c, name in enumerate(classes) for p in sorted((image_dir / name).rglob("*"))
             if p.suffix.lower() in IMAGE_EXTS]
    if not items:
        raise ValueError(f"image_dir: no images under {image_dir}")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise ImportError("encode_image_folder needs diffusers (pip install flexdit[diffusers])") from None

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(vae_path).to(device).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, shard_size, lambda path, latents, labels: write_shard(path, latents, labels))
    g = torch.Generator(device=device).manual_seed(0)

    def encode(x, labels):
        z = vae.encode(x.to(device=device, dtype=vae.dtype)).latent_dist.sample(generator=g) * VAE_SCALE
        return {"latents": z.float().cpu().numpy().astype(np.float16), "labels": np.array(labels, dtype=np.int64)}

    return _encode_batches(items, writer, encode, image_size, batch_size, flip, progress)


def _encode_batches(items, writer, encode, image_size: int, batch_size: int, flip: bool, progress: bool) -> int:
    """Feed (image path, payload) `items` in batches to `encode(images, payloads)` -> dict of arrays and the result
    to `writer`; images (B, 3, image_size, image_size) in [-1, 1], with flip followed by their mirrors (the payloads
    repeated). Returns the number of samples written."""
    bar = _progress(len(items), progress, "encoding")
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        x = _image_batch([p for p, _ in chunk], image_size)
        payloads = [v for _, v in chunk]
        if flip:
            x, payloads = torch.cat([x, x.flip(-1)]), payloads + payloads
        with torch.no_grad():
            arrays = encode(x, payloads)
        writer.add(arrays, f"images {start}..{start + len(chunk) - 1} ({chunk[0][0]}, ...)")
        if bar is not None:
            bar.update(len(chunk))
    writer.close()
    if bar is not None:
        bar.close()
    return writer.total


# ---------------------------------------------------------------------------------------------------------------
# Captioned image folder → text shards (needs diffusers and transformers)
# ---------------------------------------------------------------------------------------------------------------

# diffusers pipeline class (model_index.json's _class_name) -> host kind of the text shard format
PIPELINE_HOSTS = {"PixArtAlphaPipeline": "pixart", "PixArtSigmaPipeline": "pixart",
                  "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# host -> the components its prompt encoding needs
_TEXT_COMPONENTS = {"pixart": ("tokenizer", "text_encoder"),
                    "sd3": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3",
                            "text_encoder_3"),
                    "flux": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pipeline_host(folder, flag: str = "--pipeline") -> tuple[str, str]:
    """(host kind, pipeline class name) of a local diffusers pipeline folder, read from its model_index.json;
    ValueError naming `flag` for a folder that is not one or holds a pipeline without text shards."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{flag} {folder}: no model_index.json (not a diffusers pipeline folder saved with "
                         "save_pretrained)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{flag} {index}: cannot read it ({type(e).__name__}: {e})") from None
    if name not in PIPELINE_HOSTS:
        raise ValueError(f"{flag} {folder}: a {name}; supported: {', '.join(PIPELINE_HOSTS)}")
    return PIPELINE_HOSTS[name], name


def read_captions(image_dir, caption_column: str = "text") -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a folder, in the convention of diffusers' training scripts: `metadata.jsonl`
    (one JSON object a line with `file_name`, relative to the folder, and `caption_column`) when the folder has one,
    in its order; else every image under the folder (sorted) with the caption in the `.txt` of the same name
    beside it. ValueError naming the file for a bad line, a missing image or a missing caption."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ValueError(f"image_dir: {image_dir} is not a folder")
    meta = image_dir / "metadata.jsonl"
    pairs = []
    if meta.is_file():
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta}: cannot read it ({type(e).__name__}: {e})") from None
        for k, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta} line {k}: not JSON ({e})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                raise ValueError(f"{meta} line {k}: needs a file_name string")
            if not isinstance(entry.get(caption_column), str):
                raise ValueError(f"{meta} line {k}: needs a {caption_column!r} string (the caption column)")
            path = image_dir / entry["file_name"]
            if not path.is_file():
                raise ValueError(f"{meta} line {k}: {path} does not exist")
            pairs.append((path, entry[caption_column]))
    else:
        for path in sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                raise ValueError(f"image {path}: no caption ({txt.name} beside it, or a metadata.jsonl in "
                                 f"{image_dir})")
            try:
                pairs.append((path, txt.read_text(encoding="utf-8").strip()))
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{txt}: cannot read it ({type(e).__name__}: {e})") from None
    if not pairs:
        raise ValueError(f"image_dir: no images under {image_dir}")
    return pairs


@contextlib.contextmanager
def _loading_bars(enabled: bool):
    """diffusers' and transformers' loading progress bars on or off inside the block, restored after it."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    for log in (dlog, tlog):
        log.enable_progress_bar() if enabled else log.disable_progress_bar()
    try:
        yield
    finally:
        for log, on in zip((dlog, tlog), was):
            log.enable_progress_bar() if on else log.disable_progress_bar()


def load_text_pipeline(folder, device=None, dtype=torch.float32, flag: str = "--pipeline", transformer=False,
                       progress: bool = False):
    """(pipeline, host kind) from a local diffusers pipeline folder, on `device` in `dtype`; without its transformer
    unless `transformer`; loading bars with `progress`. ValueError naming `flag` for a folder that is not a supported
    pipeline, cannot be loaded, or lacks the VAE or a text encoder its host needs."""
    host, name = pipeline_host(folder, flag)
    try:
        import diffusers
        import transformers  # noqa: F401  (the text encoders)
    except ImportError:
        raise ValueError(f"{flag}: loading a pipeline needs diffusers and transformers "
                         "(pip install flexdit[diffusers])") from None
    extra = {} if transformer else {"transformer": None}
    try:
        with _loading_bars(progress):
            pipe = getattr(diffusers, name).from_pretrained(folder, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{flag} {folder}: cannot load the {name} ({type(e).__name__}: {e})") from None
    missing = [c for c in ("vae", *_TEXT_COMPONENTS[host]) if getattr(pipe, c, None) is None]
    if missing:
        raise ValueError(f"{flag} {folder}: the {name} has no {', '.join(missing)} (needed to encode captions)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe, host


def encode_prompts(pipe, host: str, prompts: list[str], max_sequence_length: int, device) -> dict:
    """The transformer's text inputs for `prompts` by the pipeline's own `encode_prompt` (no guidance): PixArt-α
    {encoder_hidden_states (B, L, D), encoder_attention_mask (B, L)}; SD3 / FLUX {encoder_hidden_states,
    pooled_projections (B, P)}. PixArt-α's captions are cleaned as its pipeline cleans prompts by default: when
    beautifulsoup4 and ftfy are installed."""
    with torch.no_grad():
        if host == "pixart":
            from diffusers.utils import is_bs4_available, is_ftfy_available
            text, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                  clean_caption=is_bs4_available() and is_ftfy_available(),
                                                  max_sequence_length=max_sequence_length)
            return {"encoder_hidden_states": text, "encoder_attention_mask": mask}
        if host == "sd3":
            text, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                    do_classifier_free_guidance=False,
                                                    max_sequence_length=max_sequence_length)
        else:
            text, pooled, _ = pipe.encode_prompt(prompts, None, device=device,
                                                 max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": text, "pooled_projections": pooled}


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents as the pipelines' transformers see them: (z − shift_factor) × scaling_factor (no shift for
    PixArt-α's VAE)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def _default_max_sequence_length(pipe) -> int:
    import inspect
    return inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default


def encode_caption_folder(image_dir, out_dir, pipeline, image_size: int | None = None, shard_size: int = 1024,
                          batch_size: int = 16, max_sequence_length: int | None = None, caption_column: str = "text",
                          device: str | None = None, precision: str = "fp32", flip: bool = False,
                          progress: bool = False) -> int:
    """Encode images with captions (see `read_captions`) with a local diffusers PixArt-α, SD3 / SD3.5 or FLUX.1
    pipeline folder into text shards (`write_text_shards`' format); returns the number of samples written.

    Images are centre-cropped and resized to `image_size` (default: the pipeline's, 128 latent pixels times the VAE
    factor unless its transformer config says otherwise); latents are a sample of the VAE posterior (seeded) scaled as
    the pipeline scales them; captions go through the pipeline's `encode_prompt` with `max_sequence_length` (default:
    the pipeline's). With flip=True each image is also stored mirrored with the same caption. The empty caption's
    encoding is stored once (`TextShards.null_text`) for `flexdit-finetune --caption-dropout`.
    """
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_sequence_length is not None and max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    pipeline_host(pipeline)
    pairs = read_captions(image_dir, caption_column)
    writer = _TextShardWriter(out_dir, {}, shard_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe, host = load_text_pipeline(pipeline, device, _DTYPES[precision], progress=progress)
    factor = pipe.vae_scale_factor
    if image_size is None:
        config = Path(pipeline) / "transformer" / "config.json"
        side = json.loads(config.read_text()).get("sample_size") if config.is_file() else None
        image_size = (side or 128) * factor
    if image_size < 1 or image_size % (2 * factor):
        raise ValueError(f"image_size must be a positive multiple of {2 * factor} (the VAE's factor {factor} times "
                         f"the 2x2 patch), got {image_size}")
    max_sequence_length = max_sequence_length or _default_max_sequence_length(pipe)
    components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    writer.meta = {"host": host, "image_size": int(image_size),
                   "latent_channels": int(pipe.vae.config.latent_channels),
                   "max_sequence_length": int(max_sequence_length), "count": 0,
                   "encoders": [type(getattr(pipe, c)).__name__ for c in components
                                if getattr(pipe, c, None) is not None],
                   "pipeline": type(pipe).__name__}
    g = torch.Generator(device=device).manual_seed(0)

    def numpy(arrays):
        return {k: (v.float() if v.is_floating_point() else v).cpu().numpy() for k, v in arrays.items()}

    writer.null_text = numpy(encode_prompts(pipe, host, [""], max_sequence_length, device))   # caption dropout

    def encode(x, captions):
        z = pipe.vae.encode(x.to(device=device, dtype=pipe.vae.dtype)).latent_dist.sample(generator=g)
        return numpy({"latents": scale_latents(pipe.vae, z),
                      **encode_prompts(pipe, host, captions, max_sequence_length, device)})

    return _encode_batches(pairs, writer, encode, image_size, batch_size, flip, progress)


def main(argv=None) -> int:
    """`python -m flexdit.data IMAGE_DIR OUT_DIR --vae VAE_DIR` (class-conditional shards from an ImageFolder tree)
    or `... --pipeline PIPELINE_DIR` (text shards from images with captions); 0 on success, 2 (one line) for a bad
    argument, folder, image, caption or device, or a missing diffusers."""
    from ._cli import resolve_device, usage_errors
    prog = "python -m flexdit.data"
    p = argparse.ArgumentParser(prog=prog, description="Encode images into FlexDiT latent shards (.npz): an "
                                "ImageFolder tree with --vae, or images with captions with --pipeline.")
    p.add_argument("image_dir")
    p.add_argument("out_dir")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--vae", help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema): class-conditional "
                      "shards from class sub-folders")
    kind.add_argument("--pipeline", help="local diffusers PixArt-α, SD3 / SD3.5 or FLUX.1 pipeline folder: text "
                      "shards (latents and the pipeline's text embeddings) from images captioned by a "
                      "metadata.jsonl or a .txt beside each image")
    p.add_argument("--image-size", type=int, default=None,
                   help="square image side (default: 256 with --vae, the pipeline's own with --pipeline)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="samples per shard, the last one may hold fewer (default: 4096 with --vae, 1024 with "
                        "--pipeline)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 with --vae, 16 with --pipeline")
    p.add_argument("--flip", action="store_true", help="also store horizontally mirrored copies")
    text = p.add_argument_group("text shards (--pipeline)")
    text.add_argument("--max-sequence-length", type=int, default=None,
                      help="T5 tokens per caption (default: the pipeline's: PixArt-α 120, SD3 256, FLUX 512)")
    text.add_argument("--caption-column", default=None, help="metadata.jsonl's caption key (default: text)")
    text.add_argument("--precision", choices=sorted(_DTYPES), default=None,
                      help="weights of the VAE and text encoders (default: fp32)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    with usage_errors(prog):
        if args.vae:
            given = [f for f, v in (("--max-sequence-length", args.max_sequence_length),
                                    ("--caption-column", args.caption_column), ("--precision", args.precision))
                     if v is not None]
            if given:
                raise ValueError(f"{given[0]} is for text shards: it needs --pipeline, not --vae")
        device = str(resolve_device(args.device))

        def default(value, vae_default, text_default):
            return value if value is not None else vae_default if args.vae else text_default

        shard_size, batch_size = default(args.shard_size, 4096, 1024), default(args.batch_size, 32, 16)
        try:
            if args.vae:
                n = encode_image_folder(args.image_dir, args.out_dir, args.vae,
                                        image_size=default(args.image_size, 256, None),
                                        shard_size=shard_size, batch_size=batch_size,
                                        device=device, flip=args.flip, progress=not args.no_progress)
            else:
                n = encode_caption_folder(args.image_dir, args.out_dir, args.pipeline, image_size=args.image_size,
                                          shard_size=shard_size, batch_size=batch_size,
                                          max_sequence_length=args.max_sequence_length,
                                          caption_column=args.caption_column or "text", device=device,
                                          precision=args.precision or "fp32", flip=args.flip,
                                          progress=not args.no_progress)
        except ImportError as e:
            raise ValueError(str(e)) from None
    print(f"wrote {n} {'latents' if args.vae else 'samples'} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
