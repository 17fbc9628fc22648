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
FONT_PACKAGES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "font_packages.txt")
FULL_FACE_COUNT = 23  # distinct faces with every package of font_packages.txt installed (Debian 12)

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


class DataSetTooSmall(ValueError):
    """The installed data gives fewer classes than a run needs; the message names the cause
    (missing font packages) and the command that installs them."""


def font_packages():
    """The Debian packages the glyph set is rendered from (font_packages.txt)."""
    with open(FONT_PACKAGES_FILE) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def missing_font_packages():
    """The packages of font_packages.txt that dpkg does not list as installed; None when
    there is no dpkg (not a Debian-like system)."""
    import shutil
    import subprocess
    if shutil.which("dpkg-query") is None:
        return None
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *font_packages()],
                         capture_output=True, text=True).stdout
    ok = {line.split()[0] for line in out.splitlines() if line.endswith("install ok installed")}
    return [p for p in font_packages() if p not in ok]


def too_small_message(n_classes, need, need_text, n_faces, min_faces, max_classes=None, font_dirs=FONT_DIRS):
    """Why the glyph set has fewer classes than a run needs, and what installs the rest."""
    lines = [f"glyphs: the data set is too small for this run: it needs {need} classes ({need_text}); the "
             f"installed fonts give {n_classes}, the characters drawn in >= {min_faces} (--min-faces) of the "
             f"{n_faces} distinct CJK faces found (every package of python/font_packages.txt installed gives "
             f"{FULL_FACE_COUNT} faces)."]
    missing = missing_font_packages()
    if max_classes is not None and n_classes >= max_classes:
        lines.append(f"--max-classes {max_classes} caps the characters: raise it.")
    elif missing:
        lines += [f"Missing font packages ({len(missing)}): {' '.join(missing)}. Install them with",
                  f"    sudo apt-get install -y --no-install-recommends {' '.join(missing)}",
                  "(or: sudo bash python/install_data.sh, which waits for a busy apt lock), then rerun."]
    elif missing is None:
        lines.append("Install the CJK fonts of python/font_packages.txt (Debian package names) into "
                     f"{' or '.join(font_dirs)}, then rerun.")
    else:
        lines.append(f"Every package of python/font_packages.txt is installed, yet fewer faces were found in "
                     f"{' or '.join(font_dirs)} than expected.")
    lines.append("Or ask for less: fewer classes (--pretrain-classes, --test-classes) or fewer faces per character "
                 "(--min-faces).")
    return "\n".join(lines)


def classes_needed(test_classes, pretrain_classes, min_train_classes):
    """(classes, description) a glyph run needs: test + pretraining + training classes."""
    n_test = test_classes or 1000
    need = n_test + pretrain_classes + max(1, min_train_classes)
    text = f"{n_test} test" + (f" + {pretrain_classes} pretraining (--pretrain-classes)" if pretrain_classes else "") \
        + f" + at least {max(1, min_train_classes)} training"
    return need, text


def load(name, cache_dir, test_classes=None, max_classes=10000, min_faces=12, split_seed=0, quiet=False,
         pretrain_classes=0, min_train_classes=1):
    """The class-disjoint split of dataset `name` (one of DATASETS).

    Glyphs with `pretrain_classes` > 0 get a third class set, disjoint from the train and
    test classes, for pretraining a backbone that is then fine-tuned on the train classes.
    A glyph set with fewer than test + pretrain + `min_train_classes` classes raises
    DataSetTooSmall before anything is rendered (the installed fonts decide the count).

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
        need = classes_needed(test_classes, pretrain_classes, min_train_classes) \
            if (test_classes or pretrain_classes) else (0, "")
        images, labels, chars, faces = glyphs(cache_dir, max_classes=max_classes, min_faces=min_faces, quiet=quiet,
                                              need_classes=need)
        n_classes = len(chars)
        n_test = test_classes or min(1000, n_classes // 2)
        if not 0 < n_test < n_classes:
            raise ValueError(f"--test-classes: expected 1..{n_classes - 1}, got {n_test}")
        if pretrain_classes < 0:
            raise ValueError(f"--pretrain-classes: expected >= 0, got {pretrain_classes}")
        if n_test + pretrain_classes + max(1, min_train_classes) > n_classes:
            raise DataSetTooSmall(too_small_message(n_classes, *classes_needed(n_test, pretrain_classes,
                                                                                min_train_classes), len(faces),
                                                    min_faces, max_classes))
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
    kept, kept_probes, broken = [], [], []
    for face in faces:
        try:
            r = _Renderer(face[0], face[1])
            imgs = [r(ch) for ch in probe]
        except OSError as exc:  # e.g. FreeType "invalid opcode" in a font's hinting program
            broken.append(f"{face[2]} ({exc})")
            continue
        if any(im is None for im in imgs):
            continue
        p = np.stack(imgs).astype(np.float32) / 255.0
        if all(np.abs(p - q).mean() >= DUPLICATE_THRESHOLD for q in kept_probes):
            kept.append(face)
            kept_probes.append(p)
    if broken and not quiet:
        print(f"glyphs: {len(broken)} of {len(faces)} installed CJK faces are left out because FreeType cannot "
              f"render them (an error in the font's hinting program; expected for some Ume variants): "
              f"{', '.join(broken)}")
    return kept


def _cache_key(faces, max_classes, min_faces):
    desc = [GLYPH_VERSION, IMAGE_SIZE, max_classes, min_faces, DUPLICATE_THRESHOLD,
            [(os.path.basename(p), i, os.path.getsize(p), len(c)) for p, i, _, c in faces]]
    return hashlib.sha1(json.dumps(desc).encode()).hexdigest()[:12]


def glyphs(cache_dir, max_classes=10000, min_faces=12, font_dirs=FONT_DIRS, quiet=False, need_classes=(0, "")):
    """(images uint8 (N,1,32,32), labels int64 (N,), chars [code point per class], faces [names]).

    Characters are those present in at least `min_faces` distinct faces, most widely
    covered first (ties by code point), at most `max_classes` of them. `need_classes`
    (count, description): raise DataSetTooSmall, before rendering, when fewer characters
    qualify (the message names the missing font packages); without it, fewer installed faces
    than `min_faces` lower the bar to all of them."""
    need, need_text = need_classes
    faces = find_faces(font_dirs)
    if len(faces) < 2:
        raise DataSetTooSmall(too_small_message(0, max(need, 2), need_text or "at least 2", len(faces), min_faces,
                                                font_dirs=font_dirs))
    path = os.path.join(cache_dir, f"glyphs-{_cache_key(faces, max_classes, min_faces)}.npz")
    if os.path.exists(path):
        z = np.load(path)
        n = len(z["chars"]) if len(z["faces"]) >= min_faces else 0  # a cache rendered under the relaxed rule
        if n < need:
            raise DataSetTooSmall(too_small_message(n, need, need_text, len(z["faces"]), min_faces, max_classes,
                                                    font_dirs))
        return (torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]).long(), z["chars"].tolist(),
                z["faces"].tolist())
    faces = _distinct_faces(faces, quiet)
    coverage = {}
    for f in faces:
        for c in f[3]:
            coverage[c] = coverage.get(c, 0) + 1
    # Without a class count to meet, fewer faces than min_faces relax the rule (small test
    # sets); a run that needs classes gets them from min_faces faces or stops here.
    required = min_faces if need else min(min_faces, len(faces))
    chars = sorted((c for c, n in coverage.items() if n >= required), key=lambda c: (-coverage[c], c))[:max_classes]
    chars.sort()
    if len(chars) < need:  # before the rendering, which takes a while
        raise DataSetTooSmall(too_small_message(len(chars), need, need_text, len(faces), min_faces, max_classes,
                                                font_dirs))
    if not quiet:
        print(f"glyphs: rendering {len(chars)} characters from {len(faces)} faces into {path} (once, about "
              f"{max(5, round(len(chars) * len(faces) / 8000))} s)", flush=True)
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
