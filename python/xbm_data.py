"""Offline data for the training app: class-disjoint train/test splits of small grey images.

- `glyphs`: CJK characters rendered from the installed font packages (install_data.sh),
  one class per character, one sample per distinct font face. Rendered once into a cache
  directory. Thousands of classes with ~20 samples each: an Omniglot-like set.
- `fashion`: Fashion-MNIST from Debian's dataset-fashion-mnist (gzipped IDX files).
- `digits`: scikit-learn's 8x8 digits (ship with scikit-learn), upsampled.

Every set is returned as uint8 images (N, 1, 32, 32), white ink on black, and int64
labels. Train and test classes are disjoint, as in the paper's protocol (CUB, Cars, SOP:
the first half of the classes trains, the rest is the retrieval test).
"""
import glob
import gzip
import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
DATASETS = ("glyphs", "fashion", "digits")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"

# Glyph rendering. Bump GLYPH_VERSION when the rendering changes so old caches are not reused.
GLYPH_VERSION = 1
CJK_RANGE = (0x4E00, 0x9FFF)        # CJK Unified Ideographs
MIN_FACE_COVERAGE = 2000            # a face must have this many ideographs to count as CJK
DUPLICATE_THRESHOLD = 0.03          # mean |a - b| (images in [0, 1]) below which two faces are one
PROBE_CHARS = 48
# 8x8-pixel bitmap designs drawn as outlines: complex characters become illegible blobs.
EXCLUDED_FAMILIES = ("Misaki",)


@dataclass
class Split:
    name: str
    train_images: torch.Tensor   # uint8 (N, 1, 32, 32)
    train_labels: torch.Tensor   # int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    info: str
    pretrain_images: torch.Tensor = None   # a third disjoint class set (glyphs with pretrain_classes > 0)
    pretrain_labels: torch.Tensor = None

    def describe(self):
        def cls(t):
            return int(torch.unique(t).numel())
        pre = "" if self.pretrain_labels is None else \
            f"pretrain {len(self.pretrain_labels)} images / {cls(self.pretrain_labels)} classes, "
        return (f"{self.name}: {pre}train {len(self.train_labels)} images / {cls(self.train_labels)} classes, "
                f"test {len(self.test_labels)} images / {cls(self.test_labels)} classes (disjoint); {self.info}")


def load(name, cache_dir, test_classes=None, max_classes=10000, min_faces=12, split_seed=0, quiet=False,
         pretrain_classes=0):
    """The class-disjoint split of dataset `name` (one of DATASETS).

    Glyphs with `pretrain_classes` > 0 get a third class set, disjoint from the train and
    test classes, for pretraining a backbone that is then fine-tuned on the train classes.

    Glyph test images get one fixed random affine distortion each (the training jitter's
    distribution, seeded by split_seed): without it, retrieval across fonts is nearly
    solved by raw pixels (R@1 ~0.95), with it raw pixels give R@1 ~0.3 and the model has to
    learn invariance to the distortions, as with hand-drawn sets like Omniglot."""
    if name == "digits":
        return _split_by_class_range("digits", *_digits(), test_classes or 5, "scikit-learn digits, 8x8 upsampled")
    if name == "fashion":
        (xtr, ytr), (xte, yte) = _fashion()
        n_test = test_classes or 5
        first_test = 10 - n_test
        tr, te = ytr < first_test, yte >= first_test
        return Split("fashion", xtr[tr], ytr[tr], xte[te], yte[te],
                     f"Fashion-MNIST, train split of classes 0-{first_test - 1}, test split of {first_test}-9")
    if name == "glyphs":
        images, labels, chars, faces = glyphs(cache_dir, max_classes=max_classes, min_faces=min_faces, quiet=quiet)
        n_classes = len(chars)
        n_test = test_classes or min(1000, n_classes // 2)
        if not 0 < n_test < n_classes:
            raise ValueError(f"--test-classes: expected 1..{n_classes - 1}, got {n_test}")
        if not 0 <= pretrain_classes < n_classes - n_test:
            raise ValueError(f"--pretrain-classes: expected 0..{n_classes - n_test - 1} ({n_classes} classes, "
                             f"{n_test} for test), got {pretrain_classes}")
        order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(split_seed))
        role = torch.zeros(n_classes, dtype=torch.int64)  # 0 train, 1 test, 2 pretrain
        role[order[:n_test]] = 1
        role[order[n_test:n_test + pretrain_classes]] = 2
        r = role[labels]
        te, pre = r == 1, r == 2
        tr = r == 0
        test_images = jitter(images[te].float() / 255.0, torch.Generator().manual_seed(split_seed + 1))
        test_images = (test_images * 255.0).round().clamp(0, 255).to(torch.uint8)
        split = Split("glyphs", images[tr], labels[tr], test_images, labels[te],
                      f"{len(faces)} font faces, characters U+{min(chars):04X}..U+{max(chars):04X}, "
                      f"test images distorted once (fixed seed)")
        if pretrain_classes:
            split.pretrain_images, split.pretrain_labels = images[pre], labels[pre]
        return split
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")


def _split_by_class_range(name, images, labels, n_test, info):
    first_test = int(labels.max()) + 1 - n_test
    te = labels >= first_test
    return Split(name, images[~te], labels[~te], images[te], labels[te], info)


# --- small sets -------------------------------------------------------------------------

def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8), torch.from_numpy(d.target).long()


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion(root=None):
    root = root or os.environ.get("FASHION_MNIST_DIR", FASHION_DIR)
    files = {k: os.path.join(root, f"{k}-ubyte.gz") for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [p for p in files.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({missing[0]}); install Debian's dataset-fashion-mnist "
                                f"(python/install_data.sh) or set FASHION_MNIST_DIR")

    def images(key):
        x = torch.from_numpy(_read_idx(files[key]).copy())[:, None]
        pad = (IMAGE_SIZE - x.shape[-1]) // 2
        return F.pad(x, (pad, pad, pad, pad))

    def labels(key):
        return torch.from_numpy(_read_idx(files[key]).astype(np.int64))

    return ((images("train-images-idx3"), labels("train-labels-idx1")),
            (images("t10k-images-idx3"), labels("t10k-labels-idx1")))


# --- glyphs -----------------------------------------------------------------------------

def find_faces(font_dirs=FONT_DIRS):
    """[(path, index, name, set of ideograph code points)] of the installed CJK faces,
    one entry per face (a .ttc collection holds several)."""
    import logging
    from fontTools.ttLib import TTCollection, TTFont
    logging.getLogger("fontTools").setLevel(logging.ERROR)  # some fonts' tables make it chatty
    paths = set()
    for d in font_dirs:
        for ext in ("ttf", "otf", "ttc", "otc", "TTF", "OTF", "TTC"):
            paths.update(os.path.realpath(p) for p in glob.glob(os.path.join(d, "**", f"*.{ext}"), recursive=True))
    faces = []
    for path in sorted(paths):
        try:
            n = len(TTCollection(path, lazy=True).fonts) if path.lower().endswith(("ttc", "otc")) else 1
            for index in range(n):
                font = TTFont(path, fontNumber=index, lazy=True)
                cmap = font.getBestCmap() or {}
                cps = {c for c in cmap if CJK_RANGE[0] <= c <= CJK_RANGE[1]}
                family, name = font["name"].getDebugName(1) or "", font["name"].getDebugName(4) or ""
                if len(cps) >= MIN_FACE_COVERAGE and not any(family.startswith(x) for x in EXCLUDED_FAMILIES):
                    faces.append((path, index, name or os.path.basename(path), cps))
        except Exception:  # a broken or non-font file: not a face
            continue
    return faces


class _Renderer:
    """Draws one character centred (by its ink box) at 2x, then box-filters to 32x32."""

    def __init__(self, path, index, size=IMAGE_SIZE, scale=2):
        from PIL import ImageFont
        self.S = size * scale
        self.size = size
        self.font = ImageFont.truetype(path, int(self.S * 0.8), index=index)

    def __call__(self, ch):
        from PIL import Image, ImageDraw
        S = self.S
        canvas = Image.new("L", (2 * S, 2 * S), 0)
        ImageDraw.Draw(canvas).text((S, S), ch, fill=255, font=self.font, anchor="mm")
        box = canvas.getbbox()
        if box is None:
            return None
        glyph = canvas.crop(box)
        w, h = glyph.size
        if max(w, h) > S:
            f = S / max(w, h)
            glyph = glyph.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)
            w, h = glyph.size
        out = Image.new("L", (S, S), 0)
        out.paste(glyph, ((S - w) // 2, (S - h) // 2))
        return np.asarray(out.resize((self.size, self.size), Image.BOX))


def _distinct_faces(faces, quiet):
    """Renders a probe set per face; drops faces that fail to render and faces whose
    probe images are near-identical to an earlier face's (derived or renamed fonts,
    locale variants in one collection)."""
    common = set.intersection(*(f[3] for f in faces))
    probe = sorted(common)
    probe = [chr(c) for c in probe[::max(1, len(probe) // PROBE_CHARS)][:PROBE_CHARS]]
    kept, kept_probes = [], []
    for face in faces:
        try:
            r = _Renderer(face[0], face[1])
            imgs = [r(ch) for ch in probe]
        except OSError as exc:  # e.g. FreeType "invalid opcode" in a font's hinting program
            if not quiet:
                print(f"  skipping {face[2]}: {exc}")
            continue
        if any(im is None for im in imgs):
            continue
        p = np.stack(imgs).astype(np.float32) / 255.0
        if all(np.abs(p - q).mean() >= DUPLICATE_THRESHOLD for q in kept_probes):
            kept.append(face)
            kept_probes.append(p)
    return kept


def _cache_key(faces, max_classes, min_faces):
    desc = [GLYPH_VERSION, IMAGE_SIZE, max_classes, min_faces, DUPLICATE_THRESHOLD,
            [(os.path.basename(p), i, os.path.getsize(p), len(c)) for p, i, _, c in faces]]
    return hashlib.sha1(json.dumps(desc).encode()).hexdigest()[:12]


def glyphs(cache_dir, max_classes=10000, min_faces=12, font_dirs=FONT_DIRS, quiet=False):
    """(images uint8 (N,1,32,32), labels int64 (N,), chars [code point per class], faces [names]).

    Characters are those present in at least `min_faces` distinct faces, most widely
    covered first (ties by code point), at most `max_classes` of them."""
    faces = find_faces(font_dirs)
    if len(faces) < 2:
        raise FileNotFoundError("glyphs: fewer than 2 CJK font faces installed; run python/install_data.sh "
                                "(Debian font packages)")
    path = os.path.join(cache_dir, f"glyphs-{_cache_key(faces, max_classes, min_faces)}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return (torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]).long(), z["chars"].tolist(),
                z["faces"].tolist())
    if not quiet:
        print(f"glyphs: rendering into {path} (once)")
    faces = _distinct_faces(faces, quiet)
    coverage = {}
    for f in faces:
        for c in f[3]:
            coverage[c] = coverage.get(c, 0) + 1
    need = min(min_faces, len(faces))
    chars = sorted((c for c, n in coverage.items() if n >= need), key=lambda c: (-coverage[c], c))[:max_classes]
    chars.sort()
    cls = {c: i for i, c in enumerate(chars)}
    images, labels = [], []
    from tqdm import tqdm
    for face in tqdm(faces, desc="rendering faces", disable=quiet or not sys.stderr.isatty()):
        r = _Renderer(face[0], face[1])
        for c in chars:
            if c not in face[3]:
                continue
            try:
                im = r(chr(c))
            except OSError:
                continue
            if im is not None and im.sum() >= 255 * 4:  # an empty or near-empty glyph is not a sample
                images.append(im)
                labels.append(cls[c])
    images = np.stack(images)[:, None]
    labels = np.asarray(labels, dtype=np.int32)
    # keep classes with at least 2 samples, relabelled 0..C-1
    counts = np.bincount(labels, minlength=len(chars))
    keep_cls = np.flatnonzero(counts >= 2)
    remap = np.full(len(chars), -1, dtype=np.int32)
    remap[keep_cls] = np.arange(len(keep_cls), dtype=np.int32)
    keep = remap[labels] >= 0
    images, labels = images[keep], remap[labels[keep]]
    chars = [chars[i] for i in keep_cls]
    names = [f"{n} ({os.path.basename(p)}:{i})" for p, i, n, _ in faces]
    os.makedirs(cache_dir, exist_ok=True)
    # One temporary file per process: concurrent first runs (study.py --jobs N, torchrun)
    # each render and atomically replace; the cache ends up whole either way.
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez_compressed(tmp, images=images, labels=labels, chars=np.asarray(chars, dtype=np.int32),
                        faces=np.asarray(names))
    os.replace(tmp, path)
    if not quiet:
        print(f"glyphs: {len(labels)} images, {len(chars)} classes, {len(faces)} faces: " + ", ".join(names))
    return torch.from_numpy(images), torch.from_numpy(labels).long(), chars, names


# --- sampling and augmentation ------------------------------------------------------------

class PKSampler:
    """Each batch: P classes drawn without replacement (uniformly over classes with at least
    K samples), then K samples of each drawn without replacement. Its only state is the
    torch.Generator, so get_state()/set_state() resume the exact sequence of batches."""

    def __init__(self, labels, classes_per_batch, samples_per_class, generator):
        labels = torch.as_tensor(labels)
        order = torch.argsort(labels, stable=True)
        classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        ok = counts >= samples_per_class
        if int(ok.sum()) < classes_per_batch:
            raise ValueError(f"classes per batch: {classes_per_batch} requested but only {int(ok.sum())} classes "
                             f"have >= {samples_per_class} samples")
        self.order, self.starts, self.counts = order, starts[ok], counts[ok]
        self.P, self.K, self.generator = classes_per_batch, samples_per_class, generator

    def sample(self):
        g = self.generator
        picked = torch.randperm(len(self.counts), generator=g)[:self.P]
        idx = [self.order[self.starts[c] + torch.randperm(int(self.counts[c]), generator=g)[:self.K]] for c in picked]
        return torch.cat(idx)


def jitter(images, generator, max_degrees=15.0, max_shift=0.12, scale=(0.8, 1.15), max_shear=0.2):
    """Small random affine distortions (rotation, scale, shear, shift) of a float batch
    (B, 1, H, W); the parameters come from `generator` (CPU), so they resume exactly."""
    B = images.shape[0]
    u = torch.rand(B, 5, generator=generator, dtype=torch.float64)
    ang = (u[:, 0] * 2 - 1) * max_degrees * np.pi / 180
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    sh = (u[:, 2] * 2 - 1) * max_shear
    tx, ty = (u[:, 3] * 2 - 1) * max_shift, (u[:, 4] * 2 - 1) * max_shift
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin + sh, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype).to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
