"""Dataset and metric helpers shared by the five scripts of this project.

Only what is the *same protocol* for every paper lives here: the datasets (PASCAL VOC 2012 + SBD, Cityscapes,
Stanford Background, PASCAL-Context, and an embedded synthetic dataset), joint image/label transforms, labeled/unlabeled splits, the
confusion-matrix mIoU, the boundary F1 score (BF), colour palettes and pictures, and the synthetic miniature's
pretrained start (`synthetic_pretrained`: a plain cross-entropy loop over a network the script passes in, the
stand-in for downloading ImageNet or COCO weights; part of no paper). Everything that is part of a method
(networks, losses, training loop) stays in its own script.

Datasets yield `(image, label, box, id)`: image a uint8 RGB tensor (3, H, W), label a uint8 tensor (H, W) with values
0..C-1 or 255 = ignore, box the image's valid (unpadded) rectangle. The loaders (`InfiniteLoader`, `EvalLoader`) move
whole batches to the device and only there normalise them the way the network's weights expect (`Normalize.batch`,
padding 0.0) and widen the labels to int64: a quarter of the bytes of float32 images cross the process and PCIe
boundaries.

Bad input raises `DataError` with a message that says what to do; the scripts print it as one line and exit 2.
"""
import functools
import json
import math
import os
import random
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageFilter

IGNORE = 255


class DataError(Exception):
    """A problem with the user's data or arguments; printed as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Normalisation (must follow the weights: hung2018 card 4.2 caveat 2, methods/README "input normalisation")
# ----------------------------------------------------------------------------------------------------------------
class Normalize:
    """uint8 RGB (H, W, 3) -> float32 (H, W, 3), in the layout a set of weights was trained on. `batch` does the same
    on a uint8 (N, 3, H, W) batch on any device (the loaders use it, on the GPU); both give the same float32 values.

    mode "imagenet": torchvision weights, RGB / 255, minus mean (0.485, 0.456, 0.406), over std (0.229, 0.224, 0.225).
    mode "caffe":    Caffe DeepLab weights, 0-255 minus the BGR mean (104.008, 116.669, 122.679) of DeepLab-v2,
                     channels in BGR order (`bgr=True`, the default) or RGB order (`bgr=False`, the released code's
                     quirk: hung2018 card 7.2 step 6).
    mode "custom":   (channels in BGR order if `bgr`) / `div` - `mean`, over `std`, both given in the output's channel
                     order: for reproducing a released loader's own scaling (s4gan_mlmt card 7.2-7.3).
    """
    CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)

    def __init__(self, mode="imagenet", bgr=True, mean=None, std=(1.0, 1.0, 1.0), div=1.0):
        if mode not in ("imagenet", "caffe", "custom") or (mode == "custom") != (mean is not None):
            raise ValueError(f"unknown normalisation {mode!r} (mean is given with mode 'custom' only)")
        self.mode, self.bgr, self._cache = mode, bgr, {}
        if mode == "custom":
            self.mean, self.std, self.div = np.float32(mean), np.float32(std), np.float32(div)

    def __call__(self, rgb):
        x = rgb.astype(np.float32)
        if self.mode == "imagenet":
            return (x / 255.0 - np.float32(self.IMAGENET_MEAN)) / np.float32(self.IMAGENET_STD)
        if self.mode == "custom":
            x = x[:, :, ::-1] if self.bgr else x
            return ((x / self.div - self.mean) / self.std).astype(np.float32)
        x = x - np.float32(self.CAFFE_MEAN_BGR[::-1])      # subtract per channel, still RGB order
        return x[:, :, ::-1].copy() if self.bgr else x      # (H, W, 3) in BGR or RGB order

    def _constants(self, device):
        """(div, mean, std) as float32 (1, 3, 1, 1) tensors on `device`, in the output's channel order; made once per
        device (no host-to-device copy per batch). Divisors are tensors, not Python numbers: CUDA turns a division by
        a scalar into a multiplication by its reciprocal, which can differ from numpy's division in the last bit."""
        key = str(device)
        if key not in self._cache:
            if self.mode == "imagenet":
                div, mean, std = np.float32(255.0), np.float32(self.IMAGENET_MEAN), np.float32(self.IMAGENET_STD)
            elif self.mode == "custom":
                div, mean, std = self.div, self.mean, self.std
            else:
                mean = np.float32(self.CAFFE_MEAN_BGR[::-1])    # RGB order: subtracted before the channel flip
                div, std = np.float32(1.0), np.float32((1.0, 1.0, 1.0))
            t = lambda a: torch.as_tensor(np.broadcast_to(np.float32(a), (3,)).copy()).view(1, 3, 1, 1).to(device)
            self._cache[key] = t(div), t(mean), t(std)
        return self._cache[key]

    def __getstate__(self):                    # loader workers get the settings, never device tensors
        return {**self.__dict__, "_cache": {}}

    def batch(self, img, box=None):
        """uint8 RGB (N, 3, H, W) -> float32 (N, 3, H, W) on img's device, the same values as `__call__` pixel by
        pixel. `box` (N, 4) int: each image's valid rectangle (top, left, bottom, right); every pixel outside it is
        0.0 *after* normalisation (the padding of the transforms: hung2018 card 7.2, 7.4). No host sync."""
        div, mean, std = self._constants(img.device)
        x = img.float()
        if self.mode == "imagenet":
            x = (x / div - mean) / std
        elif self.mode == "custom":
            x = x.flip(1) if self.bgr else x
            x = (x / div - mean) / std
        else:
            x = x - mean
            x = x.flip(1) if self.bgr else x
        if box is not None:
            h, w = x.shape[-2:]
            b = box.to(device=x.device, dtype=torch.int64)[:, :, None, None]               # (N, 4, 1, 1)
            r = torch.arange(h, device=x.device).view(1, h, 1)
            c = torch.arange(w, device=x.device).view(1, 1, w)
            inside = (r >= b[:, 0]) & (r < b[:, 2]) & (c >= b[:, 1]) & (c < b[:, 3])       # (N, H, W)
            x = torch.where(inside[:, None], x, 0.0)                                       # +0.0
        return x


# ----------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------
def read_image(path):
    """RGB uint8 (H, W, 3); an unreadable file is a DataError that names it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
        raise DataError(f"cannot read image {path}: {e.__class__.__name__}: {e}. Replace or remove the file.") from None


def read_label(path, num_classes, lut=None):
    """Index label map uint8 (H, W). Palette PNGs are read as indices, not colours (hung2018 card 7.1).

    `lut` maps raw ids to train ids (Cityscapes). Any value >= num_classes other than 255 is a DataError.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"label {path} has mode {im.mode}; expected a single-channel index PNG "
                                f"(colour-coded labels must be converted to class indices first)")
            lab = np.asarray(im)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read label {path}: {e.__class__.__name__}: {e}. Replace or remove the file.") from None
    if lut is not None:
        lab = lut[np.clip(lab, 0, len(lut) - 1)]
    lab = lab.astype(np.int64)
    bad = (lab >= num_classes) & (lab != IGNORE) | (lab < 0)
    if bad.any():
        raise DataError(f"label {path} contains value {int(lab[bad][0])}, but the dataset has {num_classes} classes "
                        f"(0..{num_classes - 1}, 255 = ignore). Check --data and the label files.")
    return lab.astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Joint image/label transforms
# ----------------------------------------------------------------------------------------------------------------
def _cv2_taps(n_src, n_dst, inv_scale):
    """One axis of OpenCV's INTER_LINEAR for uint8 (imgproc/src/resize.cpp, scalar path): destination index d reads
    the source coordinate (d + 0.5) / inv_scale - 0.5 (computed in double, stored as float32), replicated at the
    border (a coordinate below 0 reads pixel 0, one at or past the last pixel reads the last pixel), and the two
    weights 1 - t and t are rounded to integers on a 2048 scale (INTER_RESIZE_COEF_BITS = 11).
    Returns (index0, index1, weight0, weight1), int arrays of length n_dst."""
    f = ((np.arange(n_dst) + 0.5) * (1.0 / inv_scale) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    t = f - i0.astype(np.float32)
    edge = (i0 < 0) | (i0 >= n_src - 1)
    t[edge] = 0
    i0 = np.clip(i0, 0, n_src - 1)
    w1 = np.rint(t * np.float32(2048)).astype(np.int32)
    w0 = np.rint((np.float32(1) - t) * np.float32(2048)).astype(np.int32)
    return i0, np.minimum(i0 + 1, n_src - 1), w0, w1


def resize_cv2_linear(img, size_hw, factor=None):
    """cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR) for a uint8 (H, W[, 3]) image, without OpenCV.

    2x2 taps and no antialiasing (a shrink by 0.5 averages 2x2 blocks and keeps pixel noise; PIL's BILINEAR widens
    its filter and smooths it away). Fixed point as OpenCV: the horizontal pass sums the two taps times their
    2048-scale weights, the vertical pass does the same on those sums, and the result is (v + 2^21) >> 22.
    `factor` (fy, fx): the call was cv2.resize(img, None, fx=fx, fy=fy), as in the released VOC loaders
    (AdvSemiSeg's generate_scale_label): OpenCV then maps with 1/fx rather than src/dst.
    This is the formula of OpenCV's scalar code, integer for integer; its SIMD vertical pass drops low bits of the
    horizontal sums before multiplying, so OpenCV itself can differ from it by one grey level (README)."""
    h, w = size_hw
    fy, fx = factor if factor is not None else (h / img.shape[0], w / img.shape[1])
    y0, y1, b0, b1 = _cv2_taps(img.shape[0], h, fy)
    x0, x1, a0, a1 = _cv2_taps(img.shape[1], w, fx)
    src, extra = img.astype(np.int32), (1,) * (img.ndim - 2)            # weights broadcast over the channels
    rows = src[:, x0] * a0.reshape(-1, *extra) + src[:, x1] * a1.reshape(-1, *extra)   # (H, w[, 3]) <= 255 * 2048
    v = rows[y0] * b0.reshape(-1, 1, *extra) + rows[y1] * b1.reshape(-1, 1, *extra)   # (h, w[, 3]) < 2^31
    return ((v + (1 << 21)) >> 22).clip(0, 255).astype(np.uint8)


def resize_cv2_nearest(lab, size_hw, factor=None):
    """cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST) without OpenCV: destination index d reads source
    index floor(d / inv_scale), clamped to the last one (PIL's NEAREST takes the pixel under the destination pixel's
    centre instead, floor((d + 0.5) * src/dst)). `factor` as in resize_cv2_linear."""
    h, w = size_hw
    fy, fx = factor if factor is not None else (h / lab.shape[0], w / lab.shape[1])
    ys = np.minimum(np.floor(np.arange(h) * (1.0 / fy)).astype(np.int64), lab.shape[0] - 1)
    xs = np.minimum(np.floor(np.arange(w) * (1.0 / fx)).astype(np.int64), lab.shape[1] - 1)
    return lab[ys[:, None], xs[None, :]]


RESAMPLE = ("cv2", "pil")


def resize_pair(img, lab, size_hw, resample="cv2", factor=None):
    """Image bilinear, label nearest-neighbour (labels are indices: never interpolate them), (h, w) = size_hw.

    resample "cv2": OpenCV's INTER_LINEAR / INTER_NEAREST (resize_cv2_linear / resize_cv2_nearest), as the released
    loaders of Hung et al. (hfslyc/AdvSemiSeg) and s4GAN's VOC loader resize (hung2018 card 7.2, s4gan_mlmt card
    7.1); `factor` (fy, fx) when the size came from a scale factor (cv2.resize(src, None, fx, fy)).
    "pil": PIL's BILINEAR (antialiased when shrinking) / NEAREST, as PIL- and scipy-based loaders (s4GAN's
    PASCAL-Context and Cityscapes loaders, torchvision transforms)."""
    h, w = size_hw
    if resample == "cv2":
        img = resize_cv2_linear(img, size_hw, factor)
        return img, None if lab is None else resize_cv2_nearest(lab, size_hw, factor)
    if resample != "pil":
        raise DataError(f"unknown resampling {resample!r}; choose one of: {', '.join(RESAMPLE)}")
    img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    if lab is not None:
        lab = np.asarray(Image.fromarray(lab).resize((w, h), Image.NEAREST))
    return img, lab


class TrainTransform:
    """Random scale -> [rotate] -> pad (label 255) bottom/right -> random crop -> optional mirror, on uint8 pixels.

    The order and the padding follow hung2018 card 7.2: scale factor f in {0.5, 0.6, ..., 1.6} (`scales`), padding
    at the bottom and right with 0 *after* normalisation (i.e. the mean colour) and with 255 in the label. The
    normalisation (`normalize`) is not applied here but by the loader on the device (`Normalize.batch`); the image
    leaves as uint8 with its valid rectangle `box` (top, left, bottom, right), and everything outside the box becomes
    0.0 after normalisation there: the same values as normalising first and padding with 0.0.
    Returns (image uint8 (3, H, W), label uint8 (H, W), box int32 (4,)).
    `resize_to` (Cityscapes: 512x1024) resizes every image to a fixed size first, with no crop.
    `max_rotation` (degrees; Farabet et al.'s jitter, luc2016 card 6.2: 8) rotates by a uniform angle about the
    centre, image bilinear, label nearest; corners that come from outside are 255 in the label.
    `short_side` (lo, hi) instead of `scales`: resize so that the short side is a uniform integer in [lo, hi], aspect
    kept; `blur` p: Gaussian blur of radius U(0, 1) with probability p (both: the PASCAL-Context loader of s4GAN's
    released code, s4gan_mlmt card 7.2; it blurs after the crop, this before it, which differs only at the crop's
    border). `label_pad`: the label value of padded pixels (Context: 0).
    `resample` ("cv2" | "pil", see resize_pair) for every resize; with "cv2" a scale factor f gives the size
    round-half-even(h * f) and maps with 1/f, as cv2.resize(src, None, fx=f, fy=f) in the released VOC loaders.
    """

    def __init__(self, normalize, crop=None, scales=None, mirror=False, resize_to=None, max_rotation=0.0,
                 short_side=None, blur=0.0, label_pad=IGNORE, resample="cv2"):
        self.normalize, self.crop, self.scales, self.mirror, self.resize_to = normalize, crop, scales, mirror, resize_to
        self.max_rotation, self.short_side, self.blur, self.label_pad = max_rotation, short_side, blur, label_pad
        self.resample = resample

    def __call__(self, img, lab, rng):
        if self.resize_to is not None:
            img, lab = resize_pair(img, lab, self.resize_to, self.resample)
        if self.scales:
            f = self.scales[rng.randrange(len(self.scales))]
            h, w = lab.shape
            size = (round(h * f), round(w * f)) if self.resample == "cv2" else (int(h * f + 0.5), int(w * f + 0.5))
            img, lab = resize_pair(img, lab, size, self.resample, factor=(f, f))
        if self.short_side:
            s, (h, w) = rng.randint(*self.short_side), lab.shape
            img, lab = resize_pair(img, lab, (s, int(w * s / h + 0.5)) if h <= w else (int(h * s / w + 0.5), s),
                                   self.resample)
        if self.max_rotation:
            angle = rng.uniform(-self.max_rotation, self.max_rotation)
            img = np.asarray(Image.fromarray(img).rotate(angle, Image.BILINEAR))
            lab = np.asarray(Image.fromarray(lab).rotate(angle, Image.NEAREST, fillcolor=IGNORE))
        if self.blur and rng.random() < self.blur:     # on the uint8 image, before normalisation (same pixels)
            img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=rng.random())))
        box = [0, 0, *lab.shape]                        # valid rectangle: top, left, bottom, right
        if self.crop is not None:
            ch, cw = self.crop
            h0, w0 = h, w = lab.shape
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            if ph or pw:                                # pixel value irrelevant: 0.0 after normalisation (`box`)
                img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
                lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=self.label_pad)
            h, w = lab.shape
            y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
            img, lab = img[y:y + ch, x:x + cw], lab[y:y + ch, x:x + cw]
            box = [0, 0, min(h0 - y, ch), min(w0 - x, cw)]
        if self.mirror and rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
            box = [box[0], lab.shape[1] - box[3], box[2], lab.shape[1] - box[1]]
        return to_tensors(img, lab, box)


class LabelTransform:
    """Ground-truth maps for a discriminator's "real" input (hung2018 card 7.3, simplified as the card allows):
    random scale, enlarge with nearest-neighbour if smaller than the crop, never pad, random crop, optional mirror.
    `resample` as TrainTransform: "cv2" resizes as cv2.INTER_NEAREST, as the released VOCGTDataSet (a scale factor f
    gives the size round-half-even(h * f) and maps with 1/f); "pil" with PIL's NEAREST.
    Returns a uint8 (H, W) tensor (the loader widens it to int64 on the device)."""

    def __init__(self, crop=None, scales=None, mirror=False, resize_to=None, resample="cv2"):
        self.crop, self.scales, self.mirror, self.resize_to = crop, scales, mirror, resize_to
        if resample not in RESAMPLE:
            raise DataError(f"unknown resampling {resample!r}; choose one of: {', '.join(RESAMPLE)}")
        self.resample = resample

    def __call__(self, lab, rng):
        def nearest(a, h, w, f=None):
            if self.resample == "cv2":
                return resize_cv2_nearest(a, (h, w), None if f is None else (f, f))
            return np.asarray(Image.fromarray(a).resize((w, h), Image.NEAREST))
        if self.resize_to is not None:
            lab = nearest(lab, *self.resize_to)
        if self.scales:
            f = self.scales[rng.randrange(len(self.scales))]
            h, w = lab.shape
            if self.resample == "cv2":
                lab = nearest(lab, round(h * f), round(w * f), f)
            else:
                lab = nearest(lab, int(h * f + 0.5), int(w * f + 0.5))
        if self.crop is not None:
            ch, cw = self.crop
            h, w = lab.shape
            if h < ch or w < cw:
                g = max(ch / h, cw / w)
                lab = nearest(lab, max(ch, math.ceil(h * g)), max(cw, math.ceil(w * g)))
            h, w = lab.shape
            y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
            lab = lab[y:y + ch, x:x + cw]
        if self.mirror and rng.random() < 0.5:
            lab = lab[:, ::-1]
        return torch.from_numpy(np.array(lab, dtype=np.uint8))


class EvalTransform:
    """Evaluation: normalise, then either pad bottom/right to a fixed size (VOC: 505x505, image 0, label 255; hung2018
    card 7.4) or resize to a fixed size (Cityscapes 512x1024, label nearest unless `full_res_label`). Padding the label
    with 255 is the same as cropping the prediction back: padded pixels are ignored by the confusion matrix.
    `short_side` s (PASCAL-Context in s4GAN's released code, s4gan_mlmt card 7.5): resize the short
    side to s (image bilinear, label nearest), then cut the central s x s square of both. `resample`: as
    TrainTransform (the released evaluations resize as their training loaders: s4GAN's Context and Cityscapes
    loaders with PIL / scipy, card 7.5; VOC is padded, never resized).
    Like `TrainTransform`, returns uint8 (image, label) and the image's valid box; the loader normalises on the device
    and pads with exactly 0.0."""

    def __init__(self, normalize, pad_to=None, resize_to=None, full_res_label=False, short_side=None,
                 resample="cv2"):
        self.normalize, self.pad_to, self.resize_to, self.full_res_label = normalize, pad_to, resize_to, full_res_label
        self.short_side, self.resample = short_side, resample

    def __call__(self, img, lab, rng=None):
        if self.resize_to is not None:
            img, small = resize_pair(img, lab, self.resize_to, self.resample)
            lab = lab if self.full_res_label else small
        if self.short_side is not None:
            s, (h, w) = self.short_side, lab.shape
            img, lab = resize_pair(img, lab, (s, max(s, int(w * s / h + 0.5))) if h <= w
                                   else (max(s, int(h * s / w + 0.5)), s), self.resample)
            y, x = (lab.shape[0] - s) // 2, (lab.shape[1] - s) // 2
            img, lab = img[y:y + s, x:x + s], lab[y:y + s, x:x + s]
        box = [0, 0, *img.shape[:2]]
        if self.pad_to is not None:
            ph, pw = self.pad_to[0] - img.shape[0], self.pad_to[1] - img.shape[1]
            if ph < 0 or pw < 0:
                raise DataError(f"an evaluation image of size {img.shape[:2]} is larger than the padding size "
                                f"{tuple(self.pad_to)}; raise the preset's eval padding")
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)     # 0.0 after normalisation (box)
            lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=IGNORE)
        return to_tensors(img, lab, box)


def to_tensors(img, lab, box):
    """uint8 (H, W, 3) image, uint8 (H, W) label, valid box -> uint8 (3, H, W), uint8 (H, W), int32 (4,) tensors
    (writable copies; the loader normalises the image and widens the label on the device)."""
    img = torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))
    return img, torch.from_numpy(np.array(lab, dtype=np.uint8)), torch.tensor(box, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------
class SegDataset(torch.utils.data.Dataset):
    """A list of ids over a `source` (which reads an id into uint8 image and label arrays) and a transform.

    Each item draws its augmentation from its own RNG, seeded by (seed, epoch, index), so that a run is reproducible
    and resumable whatever the number of loader workers. The key is either an index (epoch `self.epoch`, the
    evaluation case) or an `(epoch, index)` pair from `EpochBatchSampler`: the epoch travels with the index, so
    persistent workers, which never see `set_epoch`, still draw new augmentations every pass.
    Items: (image uint8 (3, H, W), label uint8 (H, W), box int32 (4,), id), or the label alone with `labels_only`.
    """

    def __init__(self, source, ids, transform, seed=0, labels_only=False):
        self.source, self.ids, self.transform, self.seed, self.labels_only = source, list(ids), transform, seed, labels_only
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        rng = random.Random(hash((self.seed, epoch, i)) & 0xFFFFFFFF)
        if self.labels_only:
            return self.transform(self.source.read_label(self.ids[i]), rng)
        img, lab = self.source.read(self.ids[i])
        if img.shape[:2] != lab.shape:
            raise DataError(f"image and label of {self.ids[i]} differ in size: {img.shape[:2]} vs {lab.shape}")
        img, lab, box = self.transform(img, lab, rng)
        return img, lab, box, self.ids[i]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Endless batches of (epoch, index) pairs: pass e visits the dataset in the seeded permutation
    randperm(n, generator seeded with seed * 1000003 + e); the last partial batch of a pass is kept (hung2018 card
    5.1) unless it has fewer than `min_batch` items (then it is dropped from that pass). It starts at `state` =
    (pass, batches already taken in that pass), so a resumed run continues with exactly the next batch."""

    def __init__(self, n, batch_size, seed, min_batch=1, state=(0, 0)):
        self.n, self.batch_size, self.seed, self.min_batch, self.state = n, batch_size, seed, min_batch, tuple(state)

    def order(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        rest = len(order) % self.batch_size
        if 0 < rest < self.min_batch:           # a last batch too small for the network (BatchNorm): dropped
            order = order[:-rest]
        return order

    def batches_per_pass(self):
        return -(-len(self.order(0)) // self.batch_size)

    def __iter__(self):
        epoch, pos = self.state
        while True:
            order = self.order(epoch)
            for b in range(pos * self.batch_size, len(order), self.batch_size):
                yield [(epoch, i) for i in order[b:b + self.batch_size]]
            epoch, pos = epoch + 1, 0


class _ToDevice:
    """Moves collated uint8 batches to `device`, then normalises images (`Normalize.batch`, padding 0.0) and widens
    labels to int64 there. On CUDA `start` issues the copies (from pinned memory, non_blocking) on a side stream, so
    the copy of batch k+1 overlaps batch k's work; `finish` makes the current stream wait for them and marks the
    tensors as used by it (record_stream), so the caching allocator never hands their memory out too early."""

    def __init__(self, device, normalize):
        self.device, self.normalize = torch.device(device), normalize
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def start(self, batch):
        if self.stream is None:
            return batch if self.device.type == "cpu" else _map(lambda t: t.to(self.device), batch)
        with torch.cuda.stream(self.stream):
            return _map(lambda t: t.to(self.device, non_blocking=True), batch)

    def finish(self, batch):
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            _map(lambda t: t.record_stream(current), batch)
        if torch.is_tensor(batch):                                  # a labels-only stream
            return batch.long()
        img, lab, box, ids = batch
        return self.normalize.batch(img, box), lab.long(), ids


def _map(f, batch):
    if torch.is_tensor(batch):
        return f(batch)
    return [f(t) if torch.is_tensor(t) else t for t in batch]


def _loader_kwargs(workers, pin_memory):
    kw = dict(num_workers=workers, pin_memory=pin_memory)
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=2)
    return kw


class InfiniteLoader:
    """Endless batches over a dataset, ready on the device: images normalised float32 (N, 3, H, W), labels int64
    (N, H, W), ids; a labels-only dataset gives the int64 labels alone.

    One DataLoader, created once, over an `EpochBatchSampler` (a seeded permutation per pass, the last partial batch
    kept unless smaller than `min_batch`), with persistent workers and prefetching when `workers` > 0. Augmentations
    depend on (seed, pass, index) only, never on the worker count. The normalisation is the one of the dataset's
    transform (`dataset.transform.normalize`), applied on the device. With `ahead` (default: on CUDA) the next batch's
    copy is issued before the current one is returned (`_ToDevice`).

    Its whole state is (pass, batches *consumed* in this pass): batches that workers prepared or copies issued ahead
    do not count, so a resumed run draws exactly the batches of an uninterrupted one. After the last batch of pass e
    the state reads (e, batches per pass); (e + 1, 0) means the same."""

    def __init__(self, dataset, batch_size, seed, workers=0, pin_memory=False, state=(0, 0), min_batch=1,
                 device="cpu", ahead=None):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.workers, self.pin_memory, self.min_batch = workers, pin_memory, min_batch
        if len(dataset) < min_batch:
            raise DataError(f"a stream of {len(dataset)} image(s) cannot fill a batch of at least {min_batch}; "
                            f"choose another --labeled fraction")
        self.epoch, self.pos = (int(v) for v in state)
        self.sampler = EpochBatchSampler(len(dataset), batch_size, seed, min_batch, (self.epoch, self.pos))
        self.per_pass = self.sampler.batches_per_pass()
        normalize = None if dataset.labels_only else dataset.transform.normalize
        self._device = _ToDevice(device, normalize)
        self.ahead = self._device.stream is not None if ahead is None else ahead
        self._it = iter(torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler,
                                                    **_loader_kwargs(workers, pin_memory)))
        self._next = None

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._next if self._next is not None else self._device.start(next(self._it))
        out = self._device.finish(batch)          # the current stream waits for this batch's copy only
        self._next = self._device.start(next(self._it)) if self.ahead else None
        if self.pos >= self.per_pass:
            self.epoch, self.pos = self.epoch + 1, 0
        self.pos += 1
        return out

    def state(self):
        return [self.epoch, self.pos]


class EvalLoader:
    """One pass over an evaluation dataset per iteration, batches ready on the device like `InfiniteLoader`'s
    (normalised images with padding 0.0, int64 labels, ids), in index order, the next batch's copy issued ahead on
    CUDA. Workers are started per pass (evaluation is rare; they do not stay alive beside the training streams)."""

    def __init__(self, dataset, batch_size, workers=0, device="cpu", pin_memory=None):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory

    def __len__(self):
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        to_dev = _ToDevice(self.device, self.dataset.transform.normalize)
        it = iter(torch.utils.data.DataLoader(self.dataset, self.batch_size, num_workers=self.workers,
                                              pin_memory=self.pin_memory))
        nxt = next(it, None)
        nxt = None if nxt is None else to_dev.start(nxt)
        while nxt is not None:
            out = to_dev.finish(nxt)
            nxt = next(it, None)
            nxt = None if nxt is None else to_dev.start(nxt)
            yield out


# ----------------------------------------------------------------------------------------------------------------
# Loader processes
# ----------------------------------------------------------------------------------------------------------------
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"      # cgroup v2 CPU quota ("max 100000" or "<quota> <period>")


def available_cpus():
    """The CPUs this process may use: its affinity mask (taskset, cpusets, SLURM), not os.cpu_count(), further
    limited by a cgroup v2 CPU quota (containers) where one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open(CGROUP_CPU_MAX) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_workers(device, image_streams, label_streams=0, cpus=None, max_total=16):
    """Loader workers per image stream for `--workers`' default: 0 on the CPU (the training process itself needs the
    cores); on a GPU the available CPUs (`available_cpus`) less one for the training process, at most `max_total`,
    shared out evenly over the image streams, after one worker for each labels-only stream (a ground-truth stream
    needs about a tenth of an image stream's CPU; the scripts give it min(--workers, 1)). At least 1 per image stream.
    Total loader processes: image_streams * result + label_streams * min(result, 1)."""
    if torch.device(device).type != "cuda":
        return 0
    budget = min(max_total, (available_cpus() if cpus is None else cpus) - 1)
    return max(1, (budget - label_streams) // max(1, image_streams))


class VOCSource:
    """PASCAL VOC 2012 with the SBD augmented labels (hung2018 card 7.1).

    Layout under `root` (or `root/VOCdevkit`, where torchvision's download puts it):
        VOC2012/JPEGImages/<id>.jpg
        VOC2012/SegmentationClassAug/<id>.png        index PNGs, 255 = boundary/void (the SBD "aug" labels)
        VOC2012/ImageSets/Segmentation/val.txt       1,449 ids
        VOC2012/ImageSets/Segmentation/train_aug.txt 10,582 ids (optional: otherwise all SegmentationClassAug ids
                                                     not in val.txt; a train.txt of 10,582 ids is also accepted)
    Without SegmentationClassAug it falls back to VOC's own 1,464 train images and SegmentationClass labels.
    """
    NUM_CLASSES = 21
    CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
    EXPECTED = {"train": 10582, "val": 1449, "train_voc": 1464}

    def __init__(self, root, download=False):
        if download:
            self._download(root)
        base = next((os.path.join(root, p) for p in ("VOC2012", os.path.join("VOCdevkit", "VOC2012"))
                     if os.path.isdir(os.path.join(root, p, "JPEGImages"))), None)
        if base is None:
            raise DataError(f"no VOC2012/JPEGImages under --data-root {root!r}; expected {root}/VOC2012/JPEGImages, "
                            f".../SegmentationClassAug and .../ImageSets/Segmentation (see README, 'Datasets'), "
                            f"or pass --download")
        self.base = base
        sets = os.path.join(base, "ImageSets", "Segmentation")
        val = _read_list(os.path.join(sets, "val.txt"))
        aug = os.path.join(base, "SegmentationClassAug")
        if os.path.isdir(aug):
            self.label_dir = aug
            if os.path.isfile(os.path.join(sets, "train_aug.txt")):
                train = _read_list(os.path.join(sets, "train_aug.txt"))
            else:
                train = _read_list(os.path.join(sets, "train.txt")) if os.path.isfile(os.path.join(sets, "train.txt")) else []
                if len(train) != self.EXPECTED["train"]:   # VOC's own train.txt (1,464): derive train_aug instead
                    vs = set(val)
                    train = sorted(f[:-4] for f in os.listdir(aug) if f.endswith(".png") and f[:-4] not in vs)
            expected = self.EXPECTED["train"]
        else:
            warnings.warn(f"{aug} not found: falling back to the 1,464 VOC 2012 train images. The paper trains on "
                          f"train_aug (10,582 images): download the SBD augmented labels ('SegmentationClassAug', see "
                          f"README) and unpack them into {base}.")
            self.label_dir = os.path.join(base, "SegmentationClass")
            train = _read_list(os.path.join(sets, "train.txt"))
            expected = self.EXPECTED["train_voc"]
        if len(train) != expected:
            warnings.warn(f"VOC train list has {len(train)} ids, the standard protocol has {expected}: results will "
                          f"not be comparable with the paper (check the list files under {sets}).")
        if len(val) != self.EXPECTED["val"]:
            warnings.warn(f"VOC val.txt has {len(val)} ids, the standard protocol has {self.EXPECTED['val']}.")
        if set(train) & set(val):
            raise DataError(f"{len(set(train) & set(val))} ids are in both the train list and val.txt; "
                            f"train_aug must exclude val (see README, 'Datasets')")
        self.splits = {"train": train, "val": val}
        for split, ids in self.splits.items():                 # fail early and clearly on missing files
            for i in (ids[0], ids[-1]) if ids else ():
                for p in (self._img(i), self._lab(i)):
                    if not os.path.isfile(p):
                        raise DataError(f"{p} is missing (listed in the {split} list); check the VOC layout")

    @staticmethod
    def _download(root):
        import torchvision  # only needed for --download
        os.makedirs(root, exist_ok=True)
        print(f"downloading VOC 2012 trainval into {root}/VOCdevkit (torchvision); SBD labels must be added by hand")
        torchvision.datasets.VOCSegmentation(root, year="2012", image_set="trainval", download=True)

    def _img(self, i):
        return os.path.join(self.base, "JPEGImages", i + ".jpg")

    def _lab(self, i):
        return os.path.join(self.label_dir, i + ".png")

    def read(self, i):
        return read_image(self._img(i)), read_label(self._lab(i), self.NUM_CLASSES)

    def read_label(self, i):
        return read_label(self._lab(i), self.NUM_CLASSES)


def _read_list(path):
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; check the dataset layout (see README, 'Datasets')")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


class CityscapesSource:
    """Cityscapes fine annotations: leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png and
    gtFine/{train,val}/<city>/<id>_gtFine_labelIds.png; label ids mapped to the 19 train ids, the rest 255."""
    NUM_CLASSES = 19
    CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
               "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
    # label id -> train id, from the official cityscapesScripts label table
    ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                   27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    EXPECTED = {"train": 2975, "val": 500}

    def __init__(self, root, download=False):
        if download:
            raise DataError("Cityscapes cannot be downloaded automatically (it needs a login): get leftImg8bit_trainvaltest.zip "
                            "and gtFine_trainvaltest.zip from the Cityscapes website and unpack them into --data-root")
        img_root, lab_root = os.path.join(root, "leftImg8bit"), os.path.join(root, "gtFine")
        if not (os.path.isdir(img_root) and os.path.isdir(lab_root)):
            raise DataError(f"no leftImg8bit/ and gtFine/ under --data-root {root!r} (see README, 'Datasets')")
        self.root = root
        self.lut = np.full(256, IGNORE, np.uint8)
        for k, v in self.ID_TO_TRAIN.items():
            self.lut[k] = v
        self.splits = {}
        for split in ("train", "val"):
            d = os.path.join(img_root, split)
            ids = sorted(os.path.join(city, f[:-len("_leftImg8bit.png")]) for city in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, city))
                         for f in os.listdir(os.path.join(d, city)) if f.endswith("_leftImg8bit.png")) if os.path.isdir(d) else []
            if not ids:
                raise DataError(f"no *_leftImg8bit.png under {d}; check the Cityscapes layout")
            if len(ids) != self.EXPECTED[split]:
                warnings.warn(f"Cityscapes {split} has {len(ids)} images, the standard protocol has {self.EXPECTED[split]}")
            for i in (ids[0], ids[-1]):
                if not os.path.isfile(self._lab(split, i)):
                    raise DataError(f"{self._lab(split, i)} is missing; check the gtFine layout")
            self.splits[split] = [f"{split}/{i}" for i in ids]

    def _lab(self, split, i):
        return os.path.join(self.root, "gtFine", split, i + "_gtFine_labelIds.png")

    def read(self, i):
        split, rest = i.split("/", 1)
        img = read_image(os.path.join(self.root, "leftImg8bit", split, rest + "_leftImg8bit.png"))
        return img, read_label(self._lab(split, rest), self.NUM_CLASSES, self.lut)

    def read_label(self, i):
        split, rest = i.split("/", 1)
        return read_label(self._lab(split, rest), self.NUM_CLASSES, self.lut)


class StanfordBackgroundSource:
    """Stanford Background (Gould, Fulton, Koller, ICCV 2009; luc2016 card 9): 715 outdoor images of about 320x240.

    Layout under `root` (or `root` itself being the unpacked folder):
        iccv09Data/images/<id>.jpg
        iccv09Data/labels/<id>.regions.txt   whitespace-separated integers, one line per image row: 0-7 in the order
                                             of CLASSES, negative = unknown (mapped to 255, ignored)
    No canonical split is distributed (Gould et al. drew random ones): the sorted ids are shuffled with `split_seed`
    and the first 573 form "train", the other 142 "val" (the paper's test set; luc2016 card 13.13). The scripts write
    the val list into the run folder beside the labeled list. `--download` fetches iccv09Data.tar.gz (about 15 MB).
    """
    NUM_CLASSES = 8
    CLASSES = ("sky", "tree", "road", "grass", "water", "building", "mountain", "foreground")
    URL = "http://dags.stanford.edu/data/iccv09Data.tar.gz"
    EXPECTED, NUM_TRAIN = 715, 573

    def __init__(self, root, download=False, split_seed=0):
        if download:
            self._download(root)
        base = next((b for b in (os.path.join(root, "iccv09Data"), root) if os.path.isdir(os.path.join(b, "images"))
                     and os.path.isdir(os.path.join(b, "labels"))), None)
        if base is None:
            raise DataError(f"no iccv09Data/images and iccv09Data/labels under --data-root {root!r} "
                            f"(see README, 'Datasets'), or pass --download")
        self.base = base
        ids = sorted(f[:-4] for f in os.listdir(os.path.join(base, "images")) if f.endswith(".jpg"))
        if not ids:
            raise DataError(f"no .jpg images in {os.path.join(base, 'images')}")
        missing = [i for i in ids if not os.path.isfile(self._lab(i))]
        if missing:
            raise DataError(f"{len(missing)} images have no labels/<id>.regions.txt (first: {self._lab(missing[0])})")
        if len(ids) != self.EXPECTED:
            warnings.warn(f"Stanford Background has {len(ids)} images here, the dataset has {self.EXPECTED}: the "
                          f"573/142 split and the results will not be comparable with the paper")
        order = ids[:]
        random.Random(split_seed).shuffle(order)
        n_train = round(len(ids) * self.NUM_TRAIN / self.EXPECTED)
        self.splits = {"train": sorted(order[:n_train]), "val": sorted(order[n_train:])}

    def _download(self, root):
        import tarfile
        import urllib.request
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, "iccv09Data.tar.gz")
        if not os.path.isfile(path):
            print(f"downloading {self.URL} into {root}")
            try:
                urllib.request.urlretrieve(self.URL, path + ".part")
            except Exception as e:
                raise DataError(f"could not download {self.URL}: {e}; download it by hand and unpack it into "
                                f"--data-root") from None
            os.replace(path + ".part", path)
        with tarfile.open(path) as tar:                         # "data" filter: no links or paths outside root
            tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))

    def _lab(self, i):
        return os.path.join(self.base, "labels", i + ".regions.txt")

    def read_label(self, i):
        path = self._lab(i)
        try:
            raw = np.loadtxt(path, dtype=np.int64, ndmin=2)    # plain text: nothing is unpickled
        except Exception as e:
            raise DataError(f"cannot read label {path}: {e.__class__.__name__}: {e}") from None
        if raw.max() >= self.NUM_CLASSES:
            raise DataError(f"label {path} contains value {raw.max()}; Stanford Background has classes 0-7 "
                            f"(negative = unknown)")
        return np.where(raw < 0, IGNORE, raw).astype(np.uint8)

    def read(self, i):
        img, lab = read_image(os.path.join(self.base, "images", i + ".jpg")), self.read_label(i)
        if img.shape[:2] != lab.shape:
            raise DataError(f"{self._lab(i)} is {lab.shape[0]}x{lab.shape[1]} but its image is "
                            f"{img.shape[0]}x{img.shape[1]}")
        return img, lab


class PascalContextSource:
    """PASCAL-Context with 60 classes (Mottaghi et al. 2014; s4gan_mlmt card 7.2): 4,996 train / 5,104 val images of
    VOC 2010, every pixel labeled, no ignore value. Class 0 "background" (everything outside the 59 most frequent
    classes) is a real class, trained and evaluated.

    Layout under `root` (or `root/VOCdevkit`), the one mmsegmentation's `pascal_context.py` converter writes:
        VOC2010/JPEGImages/<id>.jpg
        VOC2010/SegmentationClassContext/<id>.png    index PNGs 0-59
        VOC2010/ImageSets/SegmentationContext/{train,val}.txt
    The PNGs hold the 60-class indices of the Detail API's `trainval_merged.json` mapped by sorting the raw ids
    below (PyTorch-Encoding's mapping, which the paper's code uses): CLASSES is in that order. Making them needs the
    `detail` package (README, 'Datasets'); it is not a dependency of this project.
    """
    NUM_CLASSES = 60
    RAW_IDS = (0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144,
               158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355,
               360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
    CLASSES = ("background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
               "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
               "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
               "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant",
               "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train",
               "tree", "truck", "tvmonitor", "wall", "water", "window", "wood")
    EXPECTED = {"train": 4996, "val": 5104}     # what the official pipeline yields (paper: 4,998 / 5,105)

    def __init__(self, root, download=False):
        if download:
            raise DataError("PASCAL-Context is not downloaded automatically: it needs VOC 2010 and the Detail API "
                            "annotations converted to index PNGs (see README, 'Datasets')")
        base = next((os.path.join(root, p) for p in ("VOC2010", os.path.join("VOCdevkit", "VOC2010"))
                     if os.path.isdir(os.path.join(root, p, "SegmentationClassContext"))), None)
        if base is None:
            raise DataError(f"no VOC2010/SegmentationClassContext under --data-root {root!r}; expected "
                            f"{root}/VOC2010/JPEGImages, .../SegmentationClassContext and "
                            f".../ImageSets/SegmentationContext (see README, 'Datasets')")
        self.base = base
        sets = os.path.join(base, "ImageSets", "SegmentationContext")
        self.splits = {split: _read_list(os.path.join(sets, split + ".txt")) for split in ("train", "val")}
        for split, ids in self.splits.items():
            if len(ids) != self.EXPECTED[split]:
                warnings.warn(f"PASCAL-Context {split} has {len(ids)} ids, the paper's pipeline has "
                              f"{self.EXPECTED[split]}")
            for i in (ids[0], ids[-1]) if ids else ():
                for p in (self._img(i), self._lab(i)):
                    if not os.path.isfile(p):
                        raise DataError(f"{p} is missing (listed in {split}.txt); check the PASCAL-Context layout")

    def _img(self, i):
        return os.path.join(self.base, "JPEGImages", i + ".jpg")

    def _lab(self, i):
        return os.path.join(self.base, "SegmentationClassContext", i + ".png")

    def read(self, i):
        return read_image(self._img(i)), self.read_label(i)

    def read_label(self, i):
        lab = read_label(self._lab(i), self.NUM_CLASSES)
        if (lab == IGNORE).any():
            raise DataError(f"label {self._lab(i)} contains 255, but PASCAL-Context (60 classes) labels every pixel "
                            f"0-59; was it converted for the 59-class setting?")
        return lab


class SyntheticSource:
    """An embedded dataset, generated from a seed, nothing to download (see README, 'Datasets', Synthetic).

    Each image holds 2-3 objects of 5 shape classes (disk, square, triangle, ring, cross) on a cluttered, textured
    background (class 0). The class is the shape: an object's colour is drawn at random, with only a weak per-class
    hue preference. Objects overlap (later ones occlude earlier ones), and a one-pixel band just inside each object's
    border is 255 (ignore), like VOC's boundary band. Clutter (thin lines, small dots, stripes) is background.
    """
    NUM_CLASSES = 6
    CLASSES = ("background", "disk", "square", "triangle", "ring", "cross")

    def __init__(self, size=80, num_train=1000, num_val=200, seed=0):
        self.size = size
        rng = np.random.default_rng(seed)
        n = num_train + num_val
        self.images = np.empty((n, size, size, 3), np.uint8)
        self.labels = np.empty((n, size, size), np.uint8)
        for k in range(n):
            self.images[k], self.labels[k] = self.draw(rng, size)
        ids = [f"syn{k:05d}" for k in range(n)]
        self.index = {i: k for k, i in enumerate(ids)}
        self.splits = {"train": ids[:num_train], "val": ids[num_train:]}

    @classmethod
    def draw(cls, rng, s):
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        # background: a random colour gradient, pixel noise and clutter (all class 0)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (np.cos(rng.uniform(0, 2 * np.pi)) * xx + np.sin(rng.uniform(0, 2 * np.pi)) * yy) / s
        img = c0 + (c1 - c0) * ((t - t.min()) / (np.ptp(t) + 1e-6))[..., None]
        for _ in range(rng.integers(2, 6)):
            kind, col = rng.integers(3), rng.uniform(0, 255, 3)
            if kind == 0:    # thin line
                a, d = rng.uniform(0, np.pi), rng.uniform(-s / 2, s / 2)
                m = np.abs(np.cos(a) * (xx - s / 2) + np.sin(a) * (yy - s / 2) - d) < rng.uniform(0.5, 1.5)
            elif kind == 1:  # small dot
                cy, cx, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(1, 3)
                m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            else:            # a patch of stripes
                cy, cx, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(4, 10)
                m = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r) & (np.sin(xx * rng.uniform(0.8, 2.0)) > 0.3)
            img[m] = 0.5 * img[m] + 0.5 * col
        lab = np.zeros((s, s), np.uint8)
        inst = np.zeros((s, s), np.int32)
        for k in range(1, rng.integers(2, 4) + 1):
            c = int(rng.integers(1, cls.NUM_CLASSES))
            r = rng.uniform(0.17, 0.27) * s
            cy, cx = rng.uniform(r * 0.5, s - r * 0.5), rng.uniform(r * 0.5, s - r * 0.5)
            a = rng.uniform(0, 2 * np.pi)
            m = _shape_mask(c, xx - cx, yy - cy, r, a)
            hue = (c / (cls.NUM_CLASSES - 1) + rng.normal(0, 0.3)) % 1.0   # weak class hint
            col = _hsv_to_rgb(hue, rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)) * 255
            shade = 1 + 0.25 * np.sin(xx * rng.uniform(0.2, 0.8) + yy * rng.uniform(0.2, 0.8))[m]
            img[m] = np.clip(col[None] * shade[:, None], 0, 255)
            lab[m], inst[m] = c, k
        lab[_void_band(inst)] = IGNORE
        img = img + rng.normal(0, 8, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8), lab

    def read(self, i):
        k = self.index[i]
        return self.images[k], self.labels[k]

    def read_label(self, i):
        return self.labels[self.index[i]]


def _void_band(inst):
    """The ignore band: object pixels (inst > 0) whose 4-neighbour belongs to another object or to the background."""
    p = np.pad(inst, 1, mode="edge")
    return ((p[1:-1, 1:-1] != p[:-2, 1:-1]) | (p[1:-1, 1:-1] != p[2:, 1:-1]) |
            (p[1:-1, 1:-1] != p[1:-1, :-2]) | (p[1:-1, 1:-1] != p[1:-1, 2:])) & (inst > 0)


def _shape_mask(shape, dx, dy, r, a):
    """Pixels of one of the five shapes (1 disk, 2 square, 3 triangle, 4 ring, 5 cross) of radius r, rotated by a,
    given the pixels' offsets (dx, dy) from its centre."""
    u = np.cos(a) * dx + np.sin(a) * dy   # object-centred, rotated coordinates
    v = -np.sin(a) * dx + np.cos(a) * dy
    if shape == 1:    # disk
        return u * u + v * v <= r * r
    if shape == 2:    # square
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if shape == 3:    # triangle: three half-planes
        m = np.ones_like(u, bool)
        for j in range(3):
            b = a + 2 * np.pi * j / 3
            m &= np.cos(b) * dx + np.sin(b) * dy <= 0.55 * r
        return m
    if shape == 4:    # ring
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.45 * r) ** 2)
    return ((np.abs(u) <= r) & (np.abs(v) <= 0.35 * r)) | ((np.abs(v) <= r) & (np.abs(u) <= 0.35 * r))   # cross


class SyntheticSceneSource:
    """Generated data at a paper's image size and class count, to run a paper's whole configuration (network, crops,
    batch, schedule, evaluation) with nothing to download: for measuring speed and memory (README, "Throughput"),
    never for accuracy. `--data synthetic-voc` / `--data synthetic-cityscapes` select the paper's own preset.

    kind "voc": 10,582 train / 1,449 val images (the VOC presets' train_aug / val), long side 500 and the other side
        333-500 (landscape 3 times in 4), 21 classes: background (0) and 20 object classes, the 5 shapes of
        `SyntheticSource` x 4 fill patterns (plain, stripes, checks, dots); 1-4 objects of radius 8-27% of the
        short side on a cluttered gradient, a void (255) band about 1% of the short side wide inside object borders.
    kind "cityscapes": 2,975 / 500 images of 1024x2048, 19 classes: 0 (road) the background and 18 object classes
        (the first 18 shape x pattern pairs), 6-14 objects of radius 3-12% of the short side, the same border band and
        a void strip along the bottom (Cityscapes' ego vehicle).
    Each item is drawn when it is read (so in the loader's worker) from its own generators, seeded by (seed, index):
    the layout (classes and geometry: all the label needs) from one, the appearance from the other, so `read_label`
    draws no pixel colours. Nothing is held in memory but the id lists.
    """
    KINDS = {"voc": dict(prefix="synvoc", classes=VOCSource.CLASSES, num_train=10582, num_val=1449),
             "cityscapes": dict(prefix="syncs", classes=CityscapesSource.CLASSES, num_train=2975, num_val=500)}
    PATTERNS = 4

    def __init__(self, kind="voc", seed=0):
        if kind not in self.KINDS:
            raise DataError(f"unknown generated dataset {kind!r}; choose one of: {', '.join(self.KINDS)}")
        spec = self.KINDS[kind]
        self.kind, self.seed, self.prefix = kind, seed, spec["prefix"]
        self.CLASSES = spec["classes"]
        self.NUM_CLASSES = len(self.CLASSES)
        ids = [f"{self.prefix}{k:05d}" for k in range(spec["num_train"] + spec["num_val"])]
        self.splits = {"train": ids[:spec["num_train"]], "val": ids[spec["num_train"]:]}

    def _rngs(self, i):
        k = i[len(self.prefix):]
        if not i.startswith(self.prefix) or not k.isdigit():
            raise DataError(f"{i!r} is not an id of the generated {self.kind} dataset (ids: {self.prefix}00000, ...)")
        layout, look = np.random.SeedSequence([self.seed, int(k)]).spawn(2)
        return np.random.default_rng(layout), np.random.default_rng(look)

    def _layout(self, rng):
        """(height, width, objects as (class, cy, cx, r, angle), height of the bottom void strip)."""
        if self.kind == "voc":
            short = int(rng.integers(333, 501))
            h, w = (short, 500) if rng.random() < 0.75 else (500, short)
            n, radius, void = int(rng.integers(1, 5)), (0.08, 0.27), 0
        else:
            h, w = 1024, 2048
            n, radius, void = int(rng.integers(6, 15)), (0.03, 0.12), int(rng.uniform(0.08, 0.2) * h)
        objects = []
        for _ in range(n):
            c = int(rng.integers(1, self.NUM_CLASSES))
            r = rng.uniform(*radius) * min(h, w)
            objects.append((c, float(rng.uniform(r * 0.5, h - r * 0.5)), float(rng.uniform(r * 0.5, w - r * 0.5)),
                            float(r), float(rng.uniform(0, 2 * np.pi))))   # python floats: float32 pixel maths
        return h, w, objects, void

    @staticmethod
    def _window(h, w, cy, cx, r):
        """Bounding box of an object (every shape lies within 1.2 r of its centre) and its pixels' offsets."""
        y0, y1 = max(0, int(cy - 1.2 * r)), min(h, int(cy + 1.2 * r) + 2)
        x0, x1 = max(0, int(cx - 1.2 * r)), min(w, int(cx + 1.2 * r) + 2)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        return (slice(y0, y1), slice(x0, x1)), dx, dy

    def _labels(self, h, w, objects, void):
        lab = np.zeros((h, w), np.uint8)
        inst = np.zeros((h, w), np.int16)
        masks = []
        for k, (c, cy, cx, r, a) in enumerate(objects, 1):      # later objects occlude earlier ones
            win, dx, dy = self._window(h, w, cy, cx, r)
            m = _shape_mask((c - 1) % 5 + 1, dx, dy, r, a)
            lab[win][m], inst[win][m] = c, k
            masks.append((win, m, dx, dy))
        b = max(1, round(min(h, w) / 100))                        # void band: object pixels within b of another region
        p = np.pad(inst, b, mode="edge")
        edge = ((p[b:-b, b:-b] != p[:-2 * b, b:-b]) | (p[b:-b, b:-b] != p[2 * b:, b:-b]) |
                (p[b:-b, b:-b] != p[b:-b, :-2 * b]) | (p[b:-b, b:-b] != p[b:-b, 2 * b:])) & (inst > 0)
        lab[edge] = IGNORE
        if void:
            lab[h - void:] = IGNORE
        return lab, masks

    def read_label(self, i):
        rng, _ = self._rngs(i)
        return self._labels(*self._layout(rng))[0]

    def read(self, i):
        rng, look = self._rngs(i)
        h, w, objects, void = self._layout(rng)
        lab, masks = self._labels(h, w, objects, void)
        # background: a colour gradient with clutter (class 0), as in SyntheticSource
        c0, c1 = look.uniform(0, 255, 3).astype(np.float32), look.uniform(0, 255, 3).astype(np.float32)
        a = float(look.uniform(0, 2 * np.pi))
        t = np.cos(a) * np.arange(w, dtype=np.float32)[None, :] + np.sin(a) * np.arange(h, dtype=np.float32)[:, None]
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        img = c0 + (c1 - c0) * t[..., None]                                   # (H, W, 3) float32
        for _ in range(int(look.integers(3, 9))):                             # patches of stripes
            r = float(look.uniform(0.02, 0.06) * min(h, w))
            win, dx, dy = self._window(h, w, look.uniform(0, h), look.uniform(0, w), r)
            m = (np.abs(dy) < r) & (np.abs(dx) < r) & (np.sin(dx * float(look.uniform(0.3, 1.0))) > 0.3)
            img[win][m] = 0.5 * img[win][m] + 0.5 * look.uniform(0, 255, 3).astype(np.float32)
        for (c, cy, cx, r, a), (win, m, dx, dy) in zip(objects, masks):
            hue = ((c - 1) % 5 / 5 + look.normal(0, 0.3)) % 1.0               # weak hint of the shape
            col = _hsv_to_rgb(hue, look.uniform(0.3, 1.0), look.uniform(0.3, 1.0)) * 255
            col2 = _hsv_to_rgb((hue + 0.5) % 1.0, look.uniform(0.3, 1.0), look.uniform(0.3, 1.0)) * 255
            f = np.float32(look.uniform(0.15, 0.35) * 40 / max(r, 1.0) ** 0.5)   # pattern frequency
            pattern = (c - 1) // 5
            u = np.cos(a) * dx + np.sin(a) * dy
            if pattern == 1:      # stripes along the object's axis
                p = np.sin(u * f) > 0
            elif pattern == 2:    # checks
                p = np.sin(dx * f) * np.sin(dy * f) > 0
            elif pattern == 3:    # dots
                p = np.sin(dx * f) + np.sin(dy * f) > 1.2
            else:                 # plain, softly shaded
                p = np.zeros(m.shape, bool)
            shade = np.float32(1) + np.float32(0.2) * np.sin(u * f * np.float32(0.3))
            fill = np.where(p[..., None], col2, col) * shade[..., None]
            img[win][m] = np.broadcast_to(fill, m.shape + (3,))[m]
        if void:
            img[h - void:] = img[h - void:] * np.float32(0.3)                  # a dark "bonnet"
        img += look.integers(-12, 13, (h, w, 3), dtype=np.int8)               # pixel noise, uniform (cheaper)
        return np.clip(img, 0, 255).astype(np.uint8), lab


def _hsv_to_rgb(h, s, v):
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


@functools.lru_cache(maxsize=2)
def _synthetic(**kwargs):   # read-only, so one copy per process is enough (the tests build it many times)
    return SyntheticSource(**kwargs)


def make_source(name, root=None, download=False, **synthetic_kwargs):
    """Build a dataset source by name; the sources list their ids in `.splits['train' | 'val']`.
    `synthetic_kwargs` size the 80 px `synthetic` dataset; synthetic-voc and synthetic-cityscapes have fixed sizes."""
    if name == "synthetic":
        return _synthetic(**synthetic_kwargs)
    if name in ("synthetic-voc", "synthetic-cityscapes"):
        return SyntheticSceneSource(name.split("-", 1)[1])
    if name not in ("voc", "cityscapes", "stanford", "context"):
        raise DataError(f"unknown --data {name!r}; choose one of: voc, cityscapes, stanford, context, synthetic, "
                        f"synthetic-voc, synthetic-cityscapes")
    if not root:
        raise DataError(f"--data {name} needs --data-root pointing at the dataset (see README, 'Datasets')")
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"--data-root {root!r} is a file; it must name the dataset's folder (see README, 'Datasets')")
    if not download and not os.path.isdir(root):
        raise DataError(f"--data-root {root!r} does not exist (see README, 'Datasets')")
    return {"voc": VOCSource, "cityscapes": CityscapesSource, "stanford": StanfordBackgroundSource,
            "context": PascalContextSource}[name](root, download)


# ----------------------------------------------------------------------------------------------------------------
# Labeled / unlabeled split
# ----------------------------------------------------------------------------------------------------------------
def labeled_split(train_ids, fraction=None, seed=0, split_file=None):
    """Returns (labeled_ids, unlabeled_ids).

    With `split_file`, the labeled ids are read from it (one per line), so every method can train on exactly the
    same split. Otherwise a seeded permutation of the train list is drawn and its first floor(fraction * N) ids are
    labeled (hung2018 card 5.1: 1/8 of 10,582 -> 1,322 labeled / 9,260 unlabeled).
    """
    if split_file:
        if not os.path.isfile(split_file):
            raise DataError(f"--split file {split_file!r} does not exist")
        labeled = _read_list(split_file)
        unknown = sorted(set(labeled) - set(train_ids))
        if unknown:
            raise DataError(f"--split {split_file} names {len(unknown)} ids that are not in the train list "
                            f"(first: {unknown[0]!r}); was it written for another dataset?")
        if not labeled:
            raise DataError(f"--split {split_file} is empty")
    else:
        if fraction is None or not (0 < fraction <= 1):
            raise DataError(f"--labeled must be a fraction in (0, 1], got {fraction}")
        perm = np.random.default_rng(seed).permutation(len(train_ids))
        n = max(1, int(math.floor(fraction * len(train_ids))))
        labeled = [train_ids[k] for k in perm[:n]]
    chosen = set(labeled)
    return labeled, [i for i in train_ids if i not in chosen]


def write_list(path, ids):
    with open(path, "w") as f:
        f.write("".join(i + "\n" for i in ids))


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
class ConfusionMatrix:
    """C x C confusion matrix accumulated over a whole dataset (rows: ground truth, columns: prediction).

    mIoU is dataset-level: IoU_c = TP / (TP + FP + FN) over all pixels of all images, then the mean over classes.
    Ground-truth 255 is skipped. A class absent from both prediction and ground truth has no IoU (NaN) and is left out
    of the mean, not counted as 0. Updates stay on the tensors' device: no host sync until `compute`.
    """

    def __init__(self, num_classes, device="cpu"):
        self.n = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred, label):
        # ignored pixels go to an extra bin that is dropped: fixed-size index_add_, no boolean indexing, no sync
        idx = torch.where(label == IGNORE, self.n * self.n, label.long() * self.n + pred.long()).flatten()
        counts = torch.zeros(self.n * self.n + 1, dtype=torch.int64, device=idx.device)
        counts.index_add_(0, idx, torch.ones_like(idx))
        self.mat += counts[:-1].view(self.n, self.n)

    def compute(self):
        m = self.mat.double().cpu()
        tp, gt, pr = m.diag(), m.sum(1), m.sum(0)
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        present = ~torch.isnan(iou)
        return {"miou": float(iou[present].mean()) if present.any() else float("nan"),
                "iou": [None if math.isnan(v) else float(v) for v in iou.tolist()],
                "pixel_acc": float(tp.sum() / m.sum().clamp(min=1)),
                "mean_acc": float((tp[gt > 0] / gt[gt > 0]).mean()) if (gt > 0).any() else float("nan")}


def format_iou_table(result, class_names):
    lines = [f"{'class':<16} IoU"]
    for name, v in zip(class_names, result["iou"]):
        lines.append(f"{name:<16} {'  n/a' if v is None else f'{100 * v:5.1f}'}")
    lines.append(f"{'mIoU':<16} {100 * result['miou']:5.1f}")
    lines.append(f"{'pixel acc':<16} {100 * result['pixel_acc']:5.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Boundary F1 (BF; Csurka, Larlus, Perronnin, BMVC 2013), as luc2016 card 10 specifies it
# ----------------------------------------------------------------------------------------------------------------
def bf_tolerances(sizes, base=5.0):
    """Tolerance per image: theta_I = base * diag(I) / min_J diag(J), so the smallest image of the evaluated set
    gets exactly `base` pixels (luc2016 card 10, "tolerance rule"). `sizes`: (H, W) of every evaluated image."""
    diags = [math.hypot(h, w) for h, w in sizes]
    return [base * d / min(diags) for d in diags]


def _boundaries(masks):
    """(K, H, W) bool -> pixels of each mask with a 4-neighbour outside it. The image border is not a boundary
    (edge replication): a region that touches the frame does not get a contour along it."""
    m = torch.nn.functional.pad(masks[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    inner = (m[:, :-2, 1:-1] > 0) & (m[:, 2:, 1:-1] > 0) & (m[:, 1:-1, :-2] > 0) & (m[:, 1:-1, 2:] > 0)
    return masks & ~inner


def _within(points, theta):
    """(K, H, W) bool -> pixels whose Euclidean distance to some True pixel is <= theta (a disk-shaped dilation,
    exact on the pixel grid)."""
    r = int(math.floor(theta))
    d = torch.arange(-r, r + 1, dtype=torch.float32, device=points.device)
    disk = ((d[:, None] ** 2 + d[None, :] ** 2) <= theta ** 2 + 1e-9).float()
    return torch.nn.functional.conv2d(points[:, None].float(), disk[None, None], padding=r)[:, 0] > 0.5


def boundary_f1(pred, gt, num_classes, theta):
    """Per-image BF score (luc2016 card 10): for each class c present in the ground truth or the prediction,
    P_c = fraction of predicted boundary pixels within theta of a true boundary pixel, R_c the converse,
    F_c = 2 P_c R_c / (P_c + R_c) (0 when both are 0, and 0 for a class present in only one of the two); the image's
    BF is the mean of F_c. Boundary pixels: 4-neighbour inner contour (`_boundaries`). Pixels whose ground truth is
    255 belong to no class in either map. A class filling the whole image in both maps has no contour and F_c = 1.
    pred, gt: (H, W) integer arrays or tensors. Returns a float in [0, 1] (nan for an image with no class at all)."""
    pred, gt = [(t.detach() if torch.is_tensor(t) else torch.as_tensor(np.asarray(t))).long() for t in (pred, gt)]
    gt = gt.to(pred.device)
    valid = gt != IGNORE
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=pred.device)
    present[torch.where(valid, pred, num_classes).flatten()] = True
    present[torch.where(valid, gt, num_classes).flatten()] = True
    classes = present[:num_classes].nonzero()[:, :, None]               # (K, 1, 1): only the counted classes
    if not len(classes):
        return float("nan")                                             # every pixel void
    P, G = (pred == classes) & valid, gt == classes                      # (K, H, W) class masks
    in_p, in_g = P.flatten(1).any(1), G.flatten(1).any(1)
    bp, bg = _boundaries(P), _boundaries(G)
    n_p, n_g = bp.flatten(1).sum(1), bg.flatten(1).sum(1)
    precision = (bp & _within(bg, theta)).flatten(1).sum(1) / n_p.clamp(min=1)
    recall = (bg & _within(bp, theta)).flatten(1).sum(1) / n_g.clamp(min=1)
    f = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    f = torch.where((n_p == 0) & (n_g == 0), 1.0, f)                   # both without contour: the same full image
    f = torch.where(in_p != in_g, 0.0, f)                               # present in only one of them
    counted = in_p | in_g
    return f[counted].mean().item() if counted.any() else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Palettes and pictures
# ----------------------------------------------------------------------------------------------------------------
def voc_palette(n=256):
    """The standard PASCAL VOC colour map (bit-interleaved class index); 255 -> (224, 224, 192) as in VOC's PNGs."""
    pal = np.zeros((n, 3), np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[k] = (r, g, b)
    return pal


CITYSCAPES_COLORS = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                     (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                     (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]


def palette(name):
    if name in ("cityscapes", "synthetic-cityscapes"):
        pal = np.zeros((256, 3), np.uint8)
        pal[:19] = CITYSCAPES_COLORS
        pal[IGNORE] = (255, 255, 255)
        return pal
    return voc_palette()


def colorize(label, pal):
    """(H, W) integer label map -> (H, W, 3) uint8 RGB."""
    return pal[np.asarray(label, dtype=np.int64).clip(0, 255)]


def heatmap(conf):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, dark blue (0) to yellow (1)."""
    c = np.clip(np.asarray(conf, np.float32), 0, 1)[..., None]
    lo, mid, hi = np.float32((20, 20, 90)), np.float32((200, 40, 90)), np.float32((250, 230, 60))
    return np.where(c < 0.5, lo + (mid - lo) * 2 * c, mid + (hi - mid) * (2 * c - 1)).astype(np.uint8)


def denormalize(img, normalize):
    """Inverse of `Normalize` for pictures: (3, H, W) float tensor -> (H, W, 3) uint8 RGB."""
    x = img.detach().float().cpu().numpy().transpose(1, 2, 0)
    if normalize.mode == "custom":
        x = (x * normalize.std + normalize.mean) * normalize.div
        x = x[:, :, ::-1] if normalize.bgr else x
    elif normalize.mode == "imagenet":
        x = (x * np.float32(normalize.IMAGENET_STD) + np.float32(normalize.IMAGENET_MEAN)) * 255
    else:
        x = (x[:, :, ::-1] if normalize.bgr else x) + np.float32(normalize.CAFFE_MEAN_BGR[::-1])
    return np.clip(x, 0, 255).astype(np.uint8)


def save_grid(path, rows):
    """Save a grid of equally sized (H, W, 3) uint8 pictures, a list of rows, with a 2-pixel white gap."""
    h, w = rows[0][0].shape[:2]
    g = 2
    canvas = np.full((len(rows) * (h + g) - g, max(len(r) for r in rows) * (w + g) - g, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas[i * (h + g):i * (h + g) + h, j * (w + g):j * (w + g) + w] = im
    Image.fromarray(canvas).save(path)


# ----------------------------------------------------------------------------------------------------------------
# Throughput: --benchmark and --compile (README, "Throughput")
# ----------------------------------------------------------------------------------------------------------------
# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets (the figure without 2:4 sparsity), matched as
# substrings of torch.cuda.get_device_name in this order (the more specific names first). `--peak-tflops` overrides;
# a device not listed (and the CPU) gets null.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.4), ("H200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.05), ("L40", 181.05), ("L4", 121.0),
                    ("RTX 4090", 165.2))
# keyword arguments of torch.compile; SEG_COMPILE_BACKEND=eager (dynamo's graphs without inductor's code generation)
# is for checking the compiled path cheaply on a CPU (the tests, results/gpu_benchmark.sh with GPU_BENCH_TINY=1)
COMPILE_OPTIONS = {"backend": os.environ["SEG_COMPILE_BACKEND"]} if os.environ.get("SEG_COMPILE_BACKEND") else {}


class TimedStream:
    """Proxy of an endless training stream: sums the time spent blocked in next() (`wait`, seconds) and the images
    drawn (`images`: batches of (image, label, id); a labels-only stream yields a tensor and counts none). With
    `full_batch` it skips the batches that are smaller (a pass's last one), so that a compiled network sees one batch
    shape: the same batches as a loader built with min_batch = batch size. `state()` and the rest pass through."""

    def __init__(self, stream, full_batch=None):
        self.stream, self.full_batch, self.wait, self.images = stream, full_batch, 0.0, 0

    def __next__(self):
        t = time.perf_counter()
        while True:
            batch = next(self.stream)
            n = len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
            if not self.full_batch or n >= self.full_batch:
                break
        self.wait += time.perf_counter() - t
        self.images += n if isinstance(batch, (list, tuple)) else 0
        return batch

    def __getattr__(self, name):
        return getattr(self.__dict__["stream"], name)


def compile_modules(modules, streams, batch_size):
    """--compile: torch.compile each network in place (nn.Module.compile: state dicts keep their plain names) and
    give the training streams whole batches only (no recompilation for a pass's short last batch)."""
    for m in modules:
        m.compile(**COMPILE_OPTIONS)
    for k in streams:
        streams[k] = TimedStream(streams[k], batch_size)


def benchmark(args, run_dir, streams, modules, end, train_from):
    """--benchmark N: time N iterations of the script's own training loop, write benchmark.json into the run folder
    and return its dict; nothing is evaluated, drawn or checkpointed.

    `train_from(i)` runs the loop from iteration i up to args.stop_at; `end` is the loop's length. The iterations are
    the schedule's last ones, where every loss term is on (L_semi and the like start late): one iteration under
    torch's FlopCounterMode first (eager: the FLOPs of one iteration, forward and backward), then --compile, then
    W = N // 5 + 1 warm-up iterations (at least 5 with --compile: compilation and the recompiles for a second batch
    shape), then the N timed ones. On CUDA the device is synchronised only before and after the timed window; the
    data wait is the time blocked in next() on the streams inside it. With the environment variable
    SEG_SYNC_DEBUG=1 the timed window runs under torch.cuda.set_sync_debug_mode("warn") and the host-device syncs
    it reports are counted, with their source lines, in benchmark.json (the loop's closing log line is one).
    """
    from torch.utils.flop_counter import FlopCounterMode
    n, device = args.benchmark, torch.device(args.device)
    warm = max(n // 5 + 1, 5 if args.compile else 1)
    if end < 1 + warm + n:
        raise DataError(f"--benchmark {n} needs {1 + warm + n} iterations (1 counted, {warm} warm-up, {n} timed) "
                        f"but the schedule has {end}; raise --num-steps")
    i0, cuda = end - (1 + warm + n), device.type == "cuda"
    for k in streams:
        streams[k] = TimedStream(streams[k], args.batch_size if args.compile else None)
    args.log_every, args.eval_every = 10 ** 9, 0      # the loop logs (one sync) only when it stops; no evaluation

    def run_to(start, stop):
        args.stop_at = stop
        train_from(start)

    with FlopCounterMode(display=False) as counter:
        run_to(i0, i0 + 1)
    flops = counter.get_total_flops()
    from torch._dynamo.utils import counters
    graphs = counters["stats"]
    graphs_before = graphs["unique_graphs"]                     # graphs this process compiled before (none, normally)
    if args.compile:
        for m in modules:
            m.compile(**COMPILE_OPTIONS)
    run_to(i0 + 1, i0 + 1 + warm)
    graphs_warm = graphs["unique_graphs"]
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for s in streams.values():
        s.wait, s.images = 0.0, 0
    sync_debug = cuda and os.environ.get("SEG_SYNC_DEBUG") == "1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sync_debug:
            torch.cuda.set_sync_debug_mode("warn")
        t = time.perf_counter()
        run_to(i0 + 1 + warm, i0 + 1 + warm + n)
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in caught:
        if w not in syncs:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops
    if peak is None and cuda:
        peak = next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)
    achieved = flops * n / wall / 1e12
    report = {
        "device": name, "dtype": "bf16" if cuda and not args.no_amp else "fp32", "compile": bool(args.compile),
        "batch_size": args.batch_size, **{k: None if getattr(args, a, None) is None else list(getattr(args, a))
                                          for k, a in (("crop", "crop_size"), ("resize", "resize"))},
        "data": args.data, "workers": args.workers, "torch": torch.__version__,
        "iterations": n, "warmup_iterations": warm, "first_timed_iteration": i0 + 1 + warm, "wall_s": wall,
        "iterations_per_s": n / wall, "images_per_s": sum(s.images for s in streams.values()) / wall,
        "data_wait_share": sum(s.wait for s in streams.values()) / wall,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "flops_per_iteration": flops, "achieved_tflops": achieved,
        "peak_bf16_tflops": peak, "peak_source": None if peak is None else
        ("--peak-tflops" if args.peak_tflops else "vendor datasheet, dense bf16"),
        "fraction_of_peak": achieved / peak if peak else None,
        "graphs_compiled_in_warmup": graphs_warm - graphs_before if args.compile else None,
        "graphs_compiled_in_timed_window": graphs["unique_graphs"] - graphs_warm if args.compile else None,
        "sync_warnings": ({"count": len(syncs), "where": sorted({f"{os.path.basename(w.filename)}:{w.lineno}"
                                                                  for w in syncs})} if sync_debug else None),
    }
    with open(os.path.join(run_dir, "benchmark.json.tmp"), "w") as f:
        json.dump(report, f, indent=1)
    os.replace(os.path.join(run_dir, "benchmark.json.tmp"), os.path.join(run_dir, "benchmark.json"))
    print(f"benchmark: {n} iterations in {wall:.2f} s: {report['iterations_per_s']:.3f} it/s, "
          f"{report['images_per_s']:.1f} img/s, data wait {100 * report['data_wait_share']:.1f}%, "
          f"{flops / 1e9:.1f} GFLOP/iteration, {achieved:.3f} TFLOP/s"
          + (f" ({100 * report['fraction_of_peak']:.1f}% of {peak:g})" if peak else "")
          + (f", peak memory {report['peak_gpu_memory_gib']:.2f} GiB" if cuda else "")
          + f" ({report['dtype']}, compile {'on' if args.compile else 'off'}; {run_dir}/benchmark.json)", flush=True)
    return report


# ----------------------------------------------------------------------------------------------------------------
# A pretrained start for the 80 px `synthetic` miniature (`--init synthetic`; README, "The synthetic miniature")
# ----------------------------------------------------------------------------------------------------------------
# Every paper starts from weights trained on other data (ImageNet, COCO). The miniature's stand-in is a network
# trained, with all labels, on a *disjoint* generated dataset: eight other shapes, filled with textures the miniature
# never shows, on another kind of background. Built on first use by the script that needs it, from a fixed seed and
# with the caller's random state untouched (so a run gives the same numbers whether or not the file existed), and
# cached as <torch hub dir>/checkpoints/synthetic-pretrain-<tag>-v<version>.pt (delete the file to rebuild it).
PRETRAIN_RECIPE = dict(version=1, num_images=2000, size=80, steps=1000, batch_size=8, lr=5e-4, seed=0)


class SyntheticPretrainSource:
    """The pretraining data: `num_images` images of `size` px, 9 classes: background (0) and eight shapes none of which
    is in `SyntheticSource` (ellipse, star, hexagon, crescent, L, chevron, half-disk,
    bar). Objects are filled with stripes, checks or two-colour dots; the background is
    a blotchy two-colour field with arcs. The boundary band is 255 as in the miniature."""
    NUM_CLASSES = 9
    CLASSES = ("background", "ellipse", "star", "hexagon", "crescent", "L", "chevron", "half-disk", "bar")

    def __init__(self, num_images=2000, size=80, seed=0):
        rng = np.random.default_rng(seed + 7919)         # never the same stream as SyntheticSource(seed)
        self.images = np.empty((num_images, size, size, 3), np.uint8)
        self.labels = np.empty((num_images, size, size), np.uint8)
        for k in range(num_images):
            self.images[k], self.labels[k] = self.draw(rng, size)

    @staticmethod
    def _mask(shape, dx, dy, r, a):
        u = np.cos(a) * dx + np.sin(a) * dy
        v = -np.sin(a) * dx + np.cos(a) * dy
        rad, ang = np.hypot(u, v), np.arctan2(v, u)
        if shape == 1:    # ellipse, axes r and 0.5 r
            return (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1
        if shape == 2:    # five-pointed star
            return rad <= r * (0.55 + 0.45 * np.cos(5 * ang) ** 8)
        if shape == 3:    # hexagon
            m = np.ones_like(u, bool)
            for j in range(6):
                b = np.pi * j / 3
                m &= np.cos(b) * u + np.sin(b) * v <= 0.85 * r
            return m
        if shape == 4:    # crescent: a disk less a shifted disk
            return (rad <= r) & ((u - 0.45 * r) ** 2 + v ** 2 > (0.8 * r) ** 2)
        if shape == 5:    # L
            return (((u >= -r) & (u <= -0.3 * r) & (np.abs(v) <= r)) |
                    ((v >= 0.3 * r) & (v <= r) & (u >= -r) & (u <= r)))
        if shape == 6:    # chevron
            return (np.abs(np.abs(u) * 0.9 - (v + 0.3 * r)) <= 0.3 * r) & (np.abs(u) <= r) & (np.abs(v) <= r)
        if shape == 7:    # half-disk
            return (rad <= r) & (u >= -0.1 * r)
        return (np.abs(u) <= r) & (np.abs(v) <= 0.22 * r)   # bar

    @classmethod
    def draw(cls, rng, s):
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        blot = sum(np.sin(xx * rng.uniform(0.05, 0.2) + rng.uniform(0, 6)) * np.sin(yy * rng.uniform(0.05, 0.2) +
                   rng.uniform(0, 6)) for _ in range(3))
        img = np.where((blot > 0)[..., None], c0, c1) * 0.6 + 0.4 * rng.uniform(0, 255, 3)
        for _ in range(rng.integers(1, 4)):             # arcs (background)
            cy, cx, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(5, 25)
            m = np.abs(np.hypot(yy - cy, xx - cx) - r) < 0.8
            img[m] = rng.uniform(0, 255, 3)
        lab = np.zeros((s, s), np.uint8)
        inst = np.zeros((s, s), np.int32)
        for k in range(1, rng.integers(1, 4) + 1):
            c = int(rng.integers(1, cls.NUM_CLASSES))
            r = rng.uniform(0.15, 0.3) * s
            cy, cx = rng.uniform(r * 0.5, s - r * 0.5), rng.uniform(r * 0.5, s - r * 0.5)
            m = cls._mask(c, xx - cx, yy - cy, r, rng.uniform(0, 2 * np.pi))
            ca, cb = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            kind, f = rng.integers(3), rng.uniform(0.3, 0.9)
            if kind == 0:
                t = np.sin(f * (xx * np.cos(c) + yy * np.sin(c))) > 0       # stripes
            elif kind == 1:
                t = (np.sin(f * xx) > 0) ^ (np.sin(f * yy) > 0)              # checks
            else:
                t = (np.sin(f * xx) * np.sin(f * yy)) > 0.5                  # dots
            img[m] = np.where(t[m][:, None], ca, cb)
            lab[m], inst[m] = c, k
        lab[_void_band(inst)] = IGNORE
        img = img + rng.normal(0, 6, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8), lab


def synthetic_pretrained(tag, build, normalize, device="cpu", recipe=None, log=print):
    """Path of the cached pretrained weights for the miniature, training them first if the file does not exist.

    `build(num_classes)` returns the script's own network (its forward maps (N, 3, H, W) to logits at any resolution,
    or to (N, C) image logits for a classifier, trained on which classes are present with binary cross-entropy);
    it is trained with cross-entropy and Adam on `SyntheticPretrainSource` with all labels (random flips), then its
    whole state dict is saved; the script loads it through its usual loading code, which drops the output layer.
    The random state of the caller (torch, CUDA) is restored afterwards."""
    r = dict(PRETRAIN_RECIPE, **(recipe or {}))
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, f"synthetic-pretrain-{tag}-v{r['version']}.pt")
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    lock = None
    try:                                               # two runs starting together build it once
        import fcntl
        lock = open(path + ".lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    try:
        t0 = time.time()
        log(f"building the pretrained start {path} (once; {r['steps']} steps on {r['num_images']} generated images "
            f"of other shapes, common.PRETRAIN_RECIPE)")
        data = SyntheticPretrainSource(r["num_images"], r["size"], r["seed"])
        dev = torch.device(device)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(r["seed"])
            model = build(SyntheticPretrainSource.NUM_CLASSES).to(dev).train()
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=r["lr"])
            rng = np.random.default_rng(r["seed"])
            n = len(data.images)
            order, pos, running = rng.permutation(n), 0, None
            for step in range(r["steps"]):
                if pos + r["batch_size"] > n:
                    order, pos = rng.permutation(n), 0
                idx = np.sort(order[pos:pos + r["batch_size"]])
                pos += r["batch_size"]
                img, lab = data.images[idx], data.labels[idx]
                flip = rng.random(len(idx)) < 0.5
                img = np.where(flip[:, None, None, None], img[:, :, ::-1], img)
                lab = np.where(flip[:, None, None], lab[:, :, ::-1], lab)
                x = normalize.batch(torch.from_numpy(np.ascontiguousarray(img)).permute(0, 3, 1, 2).to(dev))
                y = torch.from_numpy(np.ascontiguousarray(lab)).long().to(dev)
                out = model(x)
                if out.dim() == 2:      # an image classifier (s4gan_mlmt's MLMT branch): multi-label presence
                    present = torch.stack([(y == c).flatten(1).any(1) for c in range(out.shape[1])], 1)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), present.float())
                else:
                    out = out if out.shape[-2:] == y.shape[-2:] else torch.nn.functional.interpolate(
                        out, size=y.shape[-2:], mode="bilinear", align_corners=True)
                    loss = torch.nn.functional.cross_entropy(out.float(), y, ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if (step + 1) % 100 == 0:
                    running = loss.item()
                    eta = (time.time() - t0) / (step + 1) * (r["steps"] - step - 1)
                    log(f"  pretraining [{step + 1}/{r['steps']}] loss_ce {running:.4f} | ETA {eta:.0f} s")
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        tmp = path + ".tmp"
        torch.save({"state_dict": state, "recipe": r, "final_loss_ce": running}, tmp)
        os.replace(tmp, path)
        log(f"pretrained start written in {time.time() - t0:.0f} s: {path}")
        return path
    finally:
        if lock is not None:
            lock.close()


# ----------------------------------------------------------------------------------------------------------------
# Pictures with words: titled grids with a class legend, and training curves (PIL only)
# ----------------------------------------------------------------------------------------------------------------
def _font():
    from PIL import ImageFont
    return ImageFont.load_default()


def save_labeled_grid(path, rows, titles, class_names, pal):
    """`save_grid` with a title above each column and, below, a legend: one colour swatch per class."""
    from PIL import ImageDraw
    h, w = rows[0][0].shape[:2]
    g, head, font = 2, 16, _font()
    grid_w = max(len(r) for r in rows) * (w + g) - g
    sw, col_w = 12, max(90, max(len(n) for n in class_names) * 6 + 22)
    per_line = max(1, grid_w // col_w)
    legend_h = 8 + 16 * ((len(class_names) + per_line - 1) // per_line)
    canvas = Image.new("RGB", (grid_w, head + len(rows) * (h + g) - g + legend_h), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles):
        d.text((j * (w + g) + 3, 2), t, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas.paste(Image.fromarray(im), (j * (w + g), head + i * (h + g)))
    y0 = head + len(rows) * (h + g) + 4
    for k, name in enumerate(list(class_names) + ["void (255)"]):
        x, y = (k % per_line) * col_w + 2, y0 + (k // per_line) * 16
        if y + 14 > canvas.height:
            canvas = _grow(canvas, y + 16)
            d = ImageDraw.Draw(canvas)
        d.rectangle([x, y, x + sw, y + sw], fill=tuple(int(c) for c in pal[IGNORE if k == len(class_names) else k]),
                    outline=(0, 0, 0))
        d.text((x + sw + 4, y), name, fill=(0, 0, 0), font=font)
    canvas.save(path)


def _grow(img, height):
    out = Image.new("RGB", (img.width, height), (255, 255, 255))
    out.paste(img, (0, 0))
    return out


CURVE_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _panel(d, box, title, series, font, ylim=None):
    """One line chart inside box = (x0, y0, x1, y1): series = [(name, [(x, y), ...]), ...]."""
    x0, y0, x1, y1 = box
    d.text((x0 + 4, y0), title, fill=(0, 0, 0), font=font)
    px0, py0, px1, py1 = x0 + 46, y0 + 16, x1 - 8, y1 - 30
    d.rectangle([px0, py0, px1, py1], outline=(0, 0, 0))
    pts = [p for _, s in series for p in s]
    if not pts:
        d.text((px0 + 8, py0 + 8), "(not logged)", fill=(120, 120, 120), font=font)
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xa, xb = min(xs), max(xs)
    ya, yb = ylim or (min(ys), max(ys))
    if yb <= ya:                                  # one value (e.g. only the final val mIoU): centre it
        ya, yb = ya - max(abs(ya) * 0.1, 1e-3), yb + max(abs(yb) * 0.1, 1e-3)
    xb = xb if xb > xa else xa + 1
    fx = lambda v: px0 + (v - xa) / (xb - xa) * (px1 - px0)
    fy = lambda v: py1 - (min(max(v, ya), yb) - ya) / (yb - ya) * (py1 - py0)
    for frac in (0, 0.5, 1):
        v = ya + frac * (yb - ya)
        d.line([px0 - 3, fy(v), px0, fy(v)], fill=(0, 0, 0))
        d.text((x0 + 2, fy(v) - 5), f"{v:.3g}", fill=(0, 0, 0), font=font)
        d.line([px0 + 1, fy(v), px1 - 1, fy(v)], fill=(225, 225, 225)) if 0 < frac < 1 else None
    d.text((px0, py1 + 3), f"{xa:g}", fill=(0, 0, 0), font=font)
    d.text((px1 - 30, py1 + 3), f"{xb:g}", fill=(0, 0, 0), font=font)
    lx = px0
    for k, (name, s) in enumerate(series):
        c = CURVE_COLORS[k % len(CURVE_COLORS)]
        line = [(fx(a), fy(b)) for a, b in s]
        if len(line) > 1:
            d.line(line, fill=c, width=2)
        for p, (_, v) in zip(line, s) if len(line) < 3 else []:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
            d.text((p[0] + 6, p[1] - 12), f"{v:.4g}", fill=c, font=font)
        d.line([lx, py1 + 20, lx + 14, py1 + 20], fill=c, width=3)
        d.text((lx + 17, py1 + 14), name, fill=(0, 0, 0), font=font)
        lx += 24 + 6 * len(name)


def save_curves(run_dir, panels, path=None):
    """curves.png of a run folder from its log.jsonl: `panels` = [(title, [log key, ...], ylim or None), ...], one
    line chart per panel over the iterations (keys that were never logged are left out)."""
    from PIL import ImageDraw
    recs = []
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                recs.append(json.loads(line))
    font, pw, ph = _font(), 520, 190
    img = Image.new("RGB", (pw, ph * len(panels)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for k, (title, keys, ylim) in enumerate(panels):
        series = [(key, [(r["iter"], r[key]) for r in recs if key in r and "iter" in r and r[key] is not None])
                  for key in keys]
        _panel(d, (0, k * ph, pw, (k + 1) * ph), title, [s for s in series if s[1]], font, ylim)
    img.save(path or os.path.join(run_dir, "curves.png"))
