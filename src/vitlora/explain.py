"""Where the model looked: Grad-CAM saliency for a run's top-1 class, drawn over the photo.

Method: Grad-CAM on the tokens entering the last transformer block, the recipe the
`grad-cam` package documents for ViTs (target layer = last block's input norm, CLS token
dropped, tokens reshaped to the patch grid). The package itself cannot be used here: it
imports torchvision (and OpenCV) at import time, and torchvision breaks with this torch.
The recipe needs only the model's own ``output_hidden_states``, so it works with any
attention implementation (sdpa included) and on a merged or an unmerged PEFT model.

Chosen by a faithfulness check on DeiT-tiny (kept as a slow test in tests/test_explain.py):
a raccoon photo and a tench photo pasted on one grey canvas, positions swapped. Grad-CAM put
0.98 of the heat for the raccoon-like top-1 on the raccoon and 0.99 of the tench heat on the
tench, in both layouts. Compared beside it on a raccoon pasted at four corners: attention
rollout is class-agnostic and its centre of mass sat 0.08-0.16 of the canvas nearer the middle
than the object's; gradient-weighted rollout (Chefer et al.) tracked, a little less closely.

The heat is computed on the model's input crop and mapped back through the eval geometry
(resize, then center crop) so the overlay has the photo's own size; parts of the photo the
crop cut away get no heat.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import BadImageError, VitloraError

OVERLAY_ALPHA = 0.6  # colour weight where the heat is 1; it fades with the heat so cold parts stay the photo


def explain_pixels(model: nn.Module, pixel_values: torch.Tensor, target: int | None = None) -> tuple[torch.Tensor, int]:
    """Grad-CAM of class `target` (default: the top-1) for one normalised image [1,3,H,W].

    Returns the heat on the patch grid [H/p, W/p] scaled to [0, 1] and the class index.
    Computed in float32 without autocast: the map is a gradient, bf16 would blur it.
    """
    patch = getattr(model.config, "patch_size", None)
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1 or not isinstance(patch, int):
        raise VitloraError("explanations need one image and a ViT-style model with a patch grid")
    gh, gw = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    with torch.inference_mode(False), torch.enable_grad():  # callable from a server's inference-mode thread
        x = pixel_values.detach().float().clone().requires_grad_(True)  # a graph even if no weight needs grad
        out = model(pixel_values=x, output_hidden_states=True)
        tokens = out.hidden_states[-2]  # input of the last block: its patch tokens still reach CLS
        logits = out.logits[0]
        cls = int(logits.argmax()) if target is None else int(target)
        (grads,) = torch.autograd.grad(logits[cls].float(), tokens)
    prefix = tokens.shape[1] - gh * gw  # CLS (and DeiT's distillation token)
    if prefix < 0:
        raise VitloraError("explanations need a ViT-style model whose tokens follow the patch grid")
    acts, grads = tokens[0, prefix:].detach().float(), grads[0, prefix:].float()
    weights = grads.mean(dim=0)  # Grad-CAM: channel weight = mean gradient over positions
    cam = torch.relu(acts @ weights).reshape(gh, gw)
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).cpu(), cls


def heat_to_photo(grid: torch.Tensor, size: tuple[int, int], pp: Any) -> np.ndarray:
    """Map patch-grid heat back onto a photo of `size` (w, h) through the eval geometry.

    The eval path resizes the photo to (rw, rh) and center-crops (pp.width, pp.height) at
    offset ((rw - w) // 2, (rh - h) // 2) (see `vitlora.data.transforms`). One affine
    `grid_sample` takes every photo pixel to its place in the crop; outside the crop: 0.
    """
    w0, h0 = size
    rw, rh = _resized_size(w0, h0, pp)
    cw, ch = pp.width, pp.height
    off_x, off_y = (rw - cw) // 2, (rh - ch) // 2
    theta = torch.tensor(
        [[[rw / cw, 0.0, (rw - 2 * off_x) / cw - 1.0], [0.0, rh / ch, (rh - 2 * off_y) / ch - 1.0]]],
        dtype=torch.float32,
    )
    coords = F.affine_grid(theta, [1, 1, h0, w0], align_corners=False)
    heat = F.grid_sample(grid.float()[None, None], coords, mode="bilinear", padding_mode="border", align_corners=False)
    heat = (heat[0, 0] * (coords[0].abs() <= 1.0).all(dim=-1)).clamp(min=0)
    peak = heat.max()  # bilinear sampling can miss the grid's peak: rescale so the map spans [0, 1]
    return (heat / peak if peak > 0 else heat).numpy()


def _resized_size(w: int, h: int, pp: Any) -> tuple[int, int]:
    """(w, h) after the eval resize, before the crop; the arithmetic of `resize_for_eval`."""
    if pp.resize_mode == "exact":
        rh, rw = pp.resize_size or (pp.height, pp.width)
        return rw, rh
    short = pp.shortest_edge or min(pp.height, pp.width)
    lo, hi = min(w, h), max(w, h)
    long_side = int(short * hi / lo)
    return (short, long_side) if w <= h else (long_side, short)


def explain_image(run: Any, image: Image.Image, label: str | None = None) -> tuple[np.ndarray, str]:
    """(heat [H,W] in [0,1] at the photo's size, explained label) for a decoded image.

    `run` is a `vitlora.run.Run` (anything with model, preprocess, id2label, device);
    `label` picks the class to explain, default the top-1.
    """
    from .data import normalize, resize_for_eval, to_rgb

    image = to_rgb(image)
    target = None
    if label is not None:
        by_name = {name: i for i, name in run.id2label.items()}
        if label not in by_name:
            raise VitloraError(f"unknown label {label!r}; the run knows {len(by_name)} labels")
        target = by_name[label]
    pixels = normalize(resize_for_eval(image, run.preprocess)[None], run.preprocess).to(run.device)
    grid, cls = explain_pixels(run.model, pixels, target)
    return heat_to_photo(grid, image.size, run.preprocess), run.id2label[cls]


def overlay_image(photo: Image.Image, heat: np.ndarray) -> Image.Image:
    """The photo with a jet colour map of `heat` blended over it (same size as the photo).

    Unlike grad-cam's uniform blend, the colour's weight grows with the heat: where the
    model did not look the photo shows untinted, so the overlay reads at a glance.
    """
    from matplotlib import colormaps

    photo = photo.convert("RGB")
    if heat.shape != (photo.height, photo.width):
        raise ValueError(f"heat {heat.shape} does not match the photo {photo.height}x{photo.width}")
    heat = np.clip(heat, 0, 1).astype(np.float32)
    colours = colormaps["jet"](heat)[..., :3] * 255.0
    alpha = (OVERLAY_ALPHA * heat)[..., None]
    blend = (1 - alpha) * np.asarray(photo, dtype=np.float32) + alpha * colours
    return Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8))


def overlay_png(photo: Image.Image, heat: np.ndarray) -> bytes:
    """PNG bytes of `overlay_image` (for files and for the server's JSON)."""
    buf = io.BytesIO()
    overlay_image(photo, heat).save(buf, format="PNG")
    return buf.getvalue()


def write_overlay(path: str | Path, photo: Image.Image, heat: np.ndarray) -> Path:
    """Write the overlay PNG atomically (a crash never leaves half a file)."""
    from .rundir import write_bytes_atomic

    write_bytes_atomic(path, overlay_png(photo, heat))
    return Path(path)


def overlay_names(paths: Sequence[str]) -> dict[str, str]:
    """`<stem>.png` per input, `<stem>-2.png`, `-3` ... when stems repeat (a/x.jpg, b/x.png)."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for path in paths:
        stem, n = Path(path).stem, 1
        name = f"{stem}.png"
        while name.lower() in used:  # lower(): case-insensitive file systems
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name.lower())
        names[path] = name
    return names


def explain_files(
    run: Any,
    paths: Sequence[str],
    out_dir: str | Path,
    skipped: list[tuple[str, str]] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """`vitlora predict --explain DIR`: one overlay per readable image, {input path: overlay path}.

    `labels` ({path: label}) names the class to explain per image, e.g. the top-1 that
    `predict` reported (it may have run in bf16, where a near-tie can flip); default: the
    top-1 of this fp32 pass. Unreadable images are left out and listed in `skipped`.
    """
    from .data import load_rgb

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VitloraError(f"--explain {out} exists and is not a folder")
    written: dict[str, str] = {}
    for path, name in overlay_names([str(p) for p in paths]).items():
        try:
            photo = load_rgb(path)
        except BadImageError as exc:
            if skipped is not None:
                skipped.append((path, str(exc)))
            continue
        heat, _ = explain_image(run, photo, (labels or {}).get(path))
        written[path] = str(write_overlay(out / name, photo, heat))
    return written
