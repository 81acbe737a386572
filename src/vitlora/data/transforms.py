"""Preprocessing: the model's image processor, re-expressed as a few tensor ops.

Why not call the transformers image processor directly? It runs per image,
in numpy, and returns float32 at full size: fine for a demo, slow for every
step of training. Here the *geometric* part (resize / crop, done once per
image when the cache is built) is split from the *photometric* part
(rescale + normalise, one fused multiply-add on a whole uint8 batch, on the
training device). The geometry reproduces the processor's PIL backend
(``ViTImageProcessorPil``, which transformers 5 returns when torchvision is not
installed) pixel for pixel: same PIL resize call, same center-crop arithmetic.
If torchvision *is* installed, ``AutoImageProcessor`` picks the torchvision
backend, whose antialiased tensor resize differs from PIL's by a few levels
per pixel; vitlora always uses the PIL geometry.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..errors import VitloraError
from .decode import to_rgb

_WORK_RATIO = 256 / 224  # working copy is this much larger than the model input, timm/torchvision style
_INTERP_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_FALLBACK = {  # ViTImageProcessor's class defaults, used when nothing better is known
    "size": {"height": 224, "width": 224},
    "resample": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "rescale_factor": 1 / 255,
    "do_rescale": True,
    "do_normalize": True,
    "do_resize": True,
    "do_center_crop": False,
    "crop_size": None,
    "crop_pct": None,
    "default_to_square": True,
}


@dataclass
class Preprocess:
    """Everything needed to turn a decoded RGB image into the model's ``pixel_values``.

    ``height``/``width`` are the final model input size. ``resize_mode``:

    * ``"exact"``: resize to ``resize_size`` (default ``(height, width)``),
      ignoring aspect ratio as ViTImageProcessor does, then center-crop to
      ``(height, width)`` if ``resize_size`` is larger (DeiT-style 256 -> 224).
    * ``"shortest_edge"``: resize the short side to ``shortest_edge``
      (default ``min(height, width)``), keeping aspect ratio, then center-crop
      to ``(height, width)`` (CLIP/BiT/ConvNeXT-style).
    """

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    resize_mode: str = "exact"
    resize_size: tuple[int, int] | None = None  # exact mode: (h, w) before the center crop
    shortest_edge: int | None = None  # shortest_edge mode: short side before the center crop

    def __post_init__(self) -> None:
        if self.resize_mode not in ("exact", "shortest_edge"):
            raise VitloraError(f"unknown resize_mode {self.resize_mode!r}; use 'exact' or 'shortest_edge'")
        self.height, self.width = int(self.height), int(self.width)
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]
        self.resample = int(self.resample)
        if self.resize_size is not None:
            self.resize_size = (int(self.resize_size[0]), int(self.resize_size[1]))
        if self.shortest_edge is not None:
            self.shortest_edge = int(self.shortest_edge)

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_processor(cls, processor: Any) -> Preprocess:
        """From an instantiated transformers image processor (either backend)."""
        fields = {k: getattr(processor, k, None) for k in _FALLBACK}
        return _build(type(processor).__name__, fields)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """From :meth:`to_dict` output, or from a ``preprocessor_config.json`` dict."""
        if "resize_mode" in d:
            known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
            for k in ("mean", "std", "resize_size"):
                if known.get(k) is not None:
                    known[k] = tuple(known[k])
            return cls(**known)
        type_name = str(d.get("image_processor_type") or "")
        defaults = dict(_FALLBACK, **_class_defaults(type_name))
        fields = {k: d.get(k, defaults[k]) for k in _FALLBACK}
        if fields["resample"] is None:
            fields["resample"] = defaults["resample"]
        return _build(type_name, fields)

    @classmethod
    def from_pretrained(cls, path: str) -> Preprocess:
        """Read ``preprocessor_config.json`` from a model folder (or hub id) without loading a model."""
        if os.path.isdir(path):
            file = os.path.join(path, "preprocessor_config.json")
            if not os.path.isfile(file):
                raise VitloraError(f"{path} has no preprocessor_config.json")
        elif os.path.isfile(path):
            file = path
        else:
            try:
                from huggingface_hub import hf_hub_download

                file = hf_hub_download(path, "preprocessor_config.json")
            except Exception as e:
                raise VitloraError(f"cannot read the preprocessor config of {path}: {type(e).__name__}") from None
        try:
            with open(file, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise VitloraError(f"cannot read {file}: {e}") from None
        if not isinstance(d, dict):
            raise VitloraError(f"{file} is not a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; :meth:`from_dict` reads it back."""
        d = asdict(self)
        for k in ("mean", "std", "resize_size"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    # ----------------------------------------------------------------- helpers

    def eval_target(self) -> tuple[int, int]:
        """(w, h) the eval resize aims at; used to pick a JPEG draft scale."""
        if self.resize_mode == "exact":
            h, w = self.resize_size or (self.height, self.width)
            return w, h
        s = self.shortest_edge or min(self.height, self.width)
        return s, s

    def work_size(self, work_size: int | None = None) -> int:
        """Side of the square training working copy (default: 256 for a 224 model)."""
        return int(work_size) if work_size else round(max(self.height, self.width) * _WORK_RATIO)


@lru_cache(maxsize=None)
def _class_defaults(type_name: str) -> dict[str, Any]:
    """Class-level defaults of a transformers image processor, for keys a config file leaves out."""
    if not type_name:
        return {}
    try:
        import transformers
    except ImportError:
        return {}
    names = [type_name + "Pil", type_name]
    if type_name.endswith("Fast"):
        names.insert(0, type_name[:-4] + "Pil")
    for name in names:
        try:
            proc_cls = getattr(transformers, name)
        except Exception:  # lazy import may need a missing backend (torchvision)
            continue
        out = {}
        for k in _FALLBACK:
            v = getattr(proc_cls, k, None)
            if v is not None and not callable(v) and not isinstance(v, property):
                out[k] = v
        return out
    return {}


def _size_dict(x: Any) -> dict[str, int] | int | None:
    if x is None or isinstance(x, int):
        return x
    if isinstance(x, dict):
        return {k: int(v) for k, v in x.items() if v is not None}
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
    return {k: int(getattr(x, k)) for k in keys if getattr(x, k, None) is not None}  # SizeDict


def _hw(x: Any) -> tuple[int, int] | None:
    x = _size_dict(x)
    if x is None:
        return None
    if isinstance(x, int):
        return x, x
    if "height" in x and "width" in x:
        return x["height"], x["width"]
    return None


def _resample(r: Any) -> int:
    r = getattr(r, "value", r)  # PILImageResampling or torchvision InterpolationMode
    if isinstance(r, str):
        if r.lower() not in _INTERP_NAMES:
            raise VitloraError(f"unsupported resample {r!r}")
        return _INTERP_NAMES[r.lower()]
    return int(r)


def _triple(v: Any) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3  # type: ignore[return-value]
    t = tuple(float(x) for x in v)
    if len(t) != 3:
        raise VitloraError(f"expected 3 channel values for mean/std, got {len(t)}")
    return t  # type: ignore[return-value]


def _build(type_name: str, f: dict[str, Any]) -> Preprocess:
    """Map a processor's size/crop_size/crop_pct conventions onto :class:`Preprocess`."""
    g = {k: (f.get(k) if f.get(k) is not None else _FALLBACK[k]) for k in _FALLBACK}
    if not g["do_resize"]:
        who = type_name or "the image processor"
        raise VitloraError(f"{who} has do_resize=False; vitlora needs a fixed input size")
    size = _size_dict(g["size"])
    if isinstance(size, int):
        size = {"height": size, "width": size} if g["default_to_square"] else {"shortest_edge": size}
    crop = _hw(g["crop_size"]) if g["do_center_crop"] else None
    common = dict(
        mean=_triple(g["image_mean"]),
        std=_triple(g["image_std"]),
        resample=_resample(g["resample"]),
        rescale_factor=float(g["rescale_factor"]) if g["do_rescale"] else 1.0,
        do_normalize=bool(g["do_normalize"]),
    )
    if "height" in size and "width" in size:
        h, w = size["height"], size["width"]
        if crop is not None and crop != (h, w):
            return Preprocess(crop[0], crop[1], resize_mode="exact", resize_size=(h, w), **common)
        return Preprocess(h, w, resize_mode="exact", **common)
    if "shortest_edge" in size and "longest_edge" not in size:
        s = size["shortest_edge"]
        if g["crop_pct"] is not None and type_name.startswith("ConvNext"):
            if s >= 384:  # ConvNeXT warps without cropping at 384+
                return Preprocess(s, s, resize_mode="exact", **common)
            return Preprocess(s, s, resize_mode="shortest_edge", shortest_edge=int(s / g["crop_pct"]), **common)
        if crop is None:
            raise VitloraError(
                f"{type_name or 'the image processor'} resizes the shortest edge without a center crop, "
                "so images would have different sizes; vitlora needs a fixed input size"
            )
        return Preprocess(crop[0], crop[1], resize_mode="shortest_edge", shortest_edge=s, **common)
    raise VitloraError(f"unsupported image processor size {size}; expected height/width or shortest_edge")


# ----------------------------------------------------------------- geometry


def _pil_to_chw(img: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def center_crop(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' ``center_crop``: floor offsets, zero padding when the image is smaller."""
    c, h, w = t.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return t[:, top : top + height, left : left + width].contiguous()
    nh, nw = max(height, h), max(width, w)
    pad_t, pad_l = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas = t.new_zeros((c, nh, nw))
    canvas[:, pad_t : pad_t + h, pad_l : pad_l + w] = t
    top, left = top + pad_t, left + pad_l
    return canvas[:, max(0, top) : min(nh, top + height), max(0, left) : min(nw, left + width)].contiguous()


def _resize_short_side(img: PIL.Image.Image, short: int, resample: int) -> PIL.Image.Image:
    """``get_resize_output_image_size(default_to_square=False)``: long side truncated with int()."""
    w, h = img.size
    lo, hi = (w, h) if w <= h else (h, w)
    new_long = int(short * hi / lo)
    size = (short, new_long) if w <= h else (new_long, short)
    return img.resize(size, resample=resample)


def resize_for_eval(img: PIL.Image.Image, pp: Preprocess) -> torch.Tensor:
    """uint8 [3, H, W]: exactly the pixels the transformers processor has before rescale/normalise."""
    img = to_rgb(img)
    if pp.resize_mode == "exact":
        rh, rw = pp.resize_size or (pp.height, pp.width)
        img = img.resize((rw, rh), resample=pp.resample)
    else:
        img = _resize_short_side(img, pp.shortest_edge or min(pp.height, pp.width), pp.resample)
    t = _pil_to_chw(img)
    if t.shape[1:] != (pp.height, pp.width):
        t = center_crop(t, pp.height, pp.width)
    return t


def resize_for_train(img: PIL.Image.Image, pp: Preprocess, work_size: int | None = None) -> torch.Tensor:
    """uint8 [3, S, S]: the working copy kept in memory, from which random crops are taken.

    ``exact`` squashes the whole image (the eval path squashes too, so train
    and eval see the same aspect distortion); ``shortest_edge`` keeps aspect
    and center-crops the square, as its eval path does.
    """
    img = to_rgb(img)
    s = pp.work_size(work_size)
    if pp.resize_mode == "exact":
        return _pil_to_chw(img.resize((s, s), resample=pp.resample))
    return center_crop(_pil_to_chw(_resize_short_side(img, s, pp.resample)), s, s)


# --------------------------------------------------------------- photometric


def _scale_shift(pp: Preprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = np.asarray(pp.mean, dtype=np.float64) if pp.do_normalize else np.zeros(3)
    std = np.asarray(pp.std, dtype=np.float64) if pp.do_normalize else np.ones(3)
    scale = torch.tensor(pp.rescale_factor / std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    shift = torch.tensor(-mean / std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return scale, shift


def normalize(batch: torch.Tensor, pp: Preprocess, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] -> ``(x * rescale - mean) / std`` as one multiply-add per channel.

    Computed in float32 whatever ``dtype`` is (bf16 constants would cost ~1%
    accuracy on the values), then cast.
    """
    scale, shift = _scale_shift(pp, batch.device)
    x = batch.to(torch.float32, copy=True)  # never write into the caller's tensor
    return torch.addcmul(shift, x, scale, out=x).to(dtype)  # in place: no second full-size buffer


def _crop_boxes(
    b: int,
    h: int,
    w: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision ``RandomResizedCrop.get_params`` for a whole batch at once: (top, left, height, width)."""
    u = torch.rand(b, attempts, 2, generator=generator, device=device, dtype=torch.float64)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    ok = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # first valid attempt
    found = ok.any(dim=1)
    cw = cw.gather(1, first).squeeze(1)
    ch = ch.gather(1, first).squeeze(1)
    # Fallback (no attempt fit): largest center crop with the ratio clamped into range.
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(h * max(ratio)), h
    else:
        fw, fh = w, h
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    pos = torch.rand(b, 2, generator=generator, device=device, dtype=torch.float64)
    top = torch.where(found, torch.floor(pos[:, 0] * (h - ch + 1)), torch.full_like(ch, (h - fh) // 2))
    left = torch.where(found, torch.floor(pos[:, 1] * (w - cw + 1)), torch.full_like(cw, (w - fw) // 2))
    top = torch.minimum(top, h - ch)  # guard against rand() == 1 - eps rounding up
    left = torch.minimum(left, w - cw)
    return top, left, ch, cw


def random_resized_crop_flip(
    batch: torch.Tensor,
    pp: Preprocess,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    unit_range: bool = False,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Training augmentation on a uint8 [B,3,S,S] batch -> normalised float [B,3,H,W] (``size``, else the model's).

    Crop boxes follow torchvision's RandomResizedCrop (integer boxes, 10
    attempts, center-crop fallback), drawn for the whole batch at once from
    ``generator`` (so a seeded generator reproduces a run). Crop, resize and
    flip are one affine map per sample, applied by a single ``grid_sample``
    (bilinear, no antialias: the downscale from S is at most ~4x at scale 0.25).
    ``unit_range`` returns pixels in [0, 1] instead of normalised values, for
    photometric ops that expect them (``augment.Augment`` normalises after).
    """
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a [B,3,S,S] batch, got {tuple(batch.shape)}")
    b, _, h, w = batch.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    boxes = _crop_boxes(b, h, w, scale, ratio, generator, gen_device)
    flip = torch.rand(b, generator=generator, device=gen_device) < hflip
    out = crop_resize(batch, boxes, flip, size or (pp.height, pp.width))
    if unit_range:
        return out.mul_(1 / 255).to(dtype)
    scale_c, shift_c = _scale_shift(pp, batch.device)
    return torch.addcmul(shift_c, out, scale_c, out=out).to(dtype)


def crop_resize(
    batch: torch.Tensor,
    boxes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    flip: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """Crop each sample's integer box (top, left, height, width), resize it to ``size`` and flip where asked.

    One affine map per sample through a single ``grid_sample``: float32 [B,3,H,W] in the input's value range.
    The map is the half-pixel convention of ``F.interpolate(align_corners=False)`` on the crop.
    """
    top, left, ch, cw = boxes
    b, _, h, w = batch.shape
    # Map output coords in [-1, 1] onto the crop box (align_corners=False convention).
    sx = cw / w
    sy = ch / h
    tx = (2 * left + cw) / w - 1
    ty = (2 * top + ch) / h - 1
    sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=top.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    theta = theta.to(device=batch.device, dtype=torch.float32)
    grid = F.affine_grid(theta, [b, 3, size[0], size[1]], align_corners=False)
    # "border" makes edge samples clamp like F.interpolate instead of blending with zeros.
    return F.grid_sample(batch.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalize_unit(x: torch.Tensor, pp: Preprocess, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float pixels in [0, 1] -> the model's normalised values (the same map as :func:`normalize`)."""
    scale, shift = _scale_shift(pp, x.device)
    return torch.addcmul(shift, x.to(torch.float32), scale * 255).to(dtype)
