"""Readers that turn each supported dataset into uint8 arrays (N, H, W, C), integer labels and class names.

Decoded arrays are cached as ``.npz`` under the cache directory so that JPEGs are decoded only once.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..io import atomic_path

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
REPO_ROOT = Path(__file__).resolve().parents[3]


def cache_dir() -> Path:
    """Where decoded arrays go: ``$REASSEMBLY_CACHE``, else ``~/.cache/reassembly``."""
    base = os.environ.get("REASSEMBLY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reassembly"
    return Path(base)


def data_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for datasets, in order: the explicit root, ``$REASSEMBLY_DATA``, ``../shared/data`` beside
    the checkout (or the working directory), and the user cache."""
    if root is not None:
        return [Path(root)]
    candidates = []
    if os.environ.get("REASSEMBLY_DATA"):
        env = Path(os.environ["REASSEMBLY_DATA"])
        if not env.is_dir():
            raise DatasetError(f"REASSEMBLY_DATA={env} is not a folder: point it at the folder holding the datasets, "
                               "or unset it")
        candidates.append(env)
    candidates += [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", cache_dir() / "data"]
    unique = []
    for c in candidates:
        if c.resolve() not in [u.resolve() for u in unique]:
            unique.append(c)
    return unique


def _find(roots: list[Path], names: list[str]) -> Path | None:
    for index, root in enumerate(roots):
        for name in names:
            if (root / name).exists():
                env = os.environ.get("REASSEMBLY_DATA")
                if index > 0 and env and roots[0] == Path(env):  # say so rather than fall back without a word
                    _note(f"{' or '.join(names)} is not in REASSEMBLY_DATA={env}; using {root / name}")
                return root / name
    return None


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _not_found(what: str, roots: list[Path], names: list[str], how: str) -> DatasetError:
    looked = ", ".join(str(r / n) for r in roots for n in names)
    return DatasetError(f"{what} not found (looked in {looked}); {how}")


def _cached(key: str, build) -> tuple[np.ndarray, np.ndarray]:
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                return data["images"], data["labels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            _note(f"the decode cache {path} is unreadable ({type(exc).__name__}); decoding again")
    images, labels = build()
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, images=images, labels=labels)
    except OSError as exc:  # the cache only saves time: go on without it
        _note(f"cannot write the decode cache {path} ({exc.strerror or exc}); set REASSEMBLY_CACHE to a writable "
              "folder to decode only once")
    return images, labels


def _decode_image(data: bytes, mode: str = "RGB") -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(mode))


def load_cifar10(split: str, root=None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """CIFAR-10 from ``cifar10-jpg.zip`` (layout ``train|test/<class>/NNNN.jpg``)."""
    roots = data_roots(root)
    path = _find(roots, ["cifar10-jpg.zip"])
    if path is None:
        raise _not_found("CIFAR-10", roots, ["cifar10-jpg.zip"],
                         "pass --data-root DIR or set REASSEMBLY_DATA to a folder holding cifar10-jpg.zip "
                         "(train|test/<class>/NNNN.jpg)")
    stat = path.stat()
    key = f"cifar10-{split}-{stat.st_size}-{int(stat.st_mtime)}"

    def build():
        from tqdm import tqdm

        with zipfile.ZipFile(path) as archive:
            members = sorted(n for n in archive.namelist()
                             if n.startswith(f"{split}/") and Path(n).suffix.lower() in IMAGE_SUFFIXES)
            if not members:
                raise DatasetError(f"{path} holds no '{split}/<class>/*.jpg' images")
            images = np.empty((len(members), 32, 32, 3), np.uint8)
            labels = np.empty(len(members), np.int64)
            for i, name in enumerate(tqdm(members, desc=f"decoding CIFAR-10 {split} (once)", unit="img")):
                label = name.split("/")[1]
                if label not in CIFAR10_CLASSES:
                    raise DatasetError(f"{path}: unexpected class folder {label!r} in {name}")
                images[i] = _decode_image(archive.read(name))
                labels[i] = CIFAR10_CLASSES.index(label)
        return images, labels

    images, labels = _cached(key, build)
    return images, labels, CIFAR10_CLASSES


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise DatasetError(f"{path}: only unsigned-byte idx files are supported")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_fashion_mnist(split: str, root=None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Fashion-MNIST from its four idx files (the Debian package ``dataset-fashion-mnist`` installs them)."""
    roots = data_roots(root)
    folders = ["fashion-mnist", "fashion_mnist"]
    folder = _find(roots, folders)
    if folder is None and root is None and FASHION_MNIST_SYSTEM_DIR.is_dir():
        folder = FASHION_MNIST_SYSTEM_DIR
        if os.environ.get("REASSEMBLY_DATA"):
            _note(f"fashion-mnist is not in REASSEMBLY_DATA={os.environ['REASSEMBLY_DATA']}; using {folder}")
    if folder is None:
        raise _not_found("Fashion-MNIST", roots + [FASHION_MNIST_SYSTEM_DIR.parent], folders,
                         "install it with `apt-get install dataset-fashion-mnist`, or put the four idx files "
                         "in DATA_ROOT/fashion-mnist/")
    prefix = "train" if split == "train" else "t10k"
    files = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        found = [folder / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
        found = [f for f in found if f.is_file()]
        if not found:
            raise DatasetError(f"Fashion-MNIST folder {folder} lacks {prefix}-{kind}(.gz)")
        files[kind] = found[0]
    images = _read_idx(files["images-idx3-ubyte"])[..., None]
    labels = _read_idx(files["labels-idx1-ubyte"]).astype(np.int64)
    return images, labels, FASHION_MNIST_CLASSES


def load_digits(split: str, root=None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """scikit-learn's 8x8 digits, split 80/20 per class with a fixed permutation (seed 0)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DatasetError("the digits dataset needs scikit-learn: `pip install 'reassembly[digits]'`") from None
    bunch = sk_load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    in_test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        in_test[idx[: len(idx) // 5]] = True
    keep = in_test if split == "test" else ~in_test
    return images[keep], labels[keep], tuple(str(d) for d in range(10))


def load_image_folder(folder: str | os.PathLike, split: str, size: int | None = None):
    """``folder/<split>/<class>/*.jpg`` (or ``folder/<class>/*`` when there is no split level)."""
    folder = Path(folder)
    base = folder / split if (folder / split).is_dir() else folder
    if not base.is_dir():
        raise DatasetError(f"image folder {folder} does not exist")
    classes = tuple(sorted(p.name for p in base.iterdir() if p.is_dir()))
    if not classes:
        raise DatasetError(f"image folder {base} has no class sub-folders (expected {base}/<class>/<image>)")
    files, labels = [], []
    for index, name in enumerate(classes):
        for f in sorted((base / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(index)
    if not files:
        raise DatasetError(f"image folder {base} holds no images")
    from PIL import Image

    arrays = []
    for f in files:
        with Image.open(f) as img:
            img = img.convert("RGB")
            if size is not None:
                img = img.resize((size, size), Image.BILINEAR)
            arrays.append(np.asarray(img))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DatasetError(f"images in {base} differ in size ({sorted(shapes)[:3]}...); pass an image size to resize them")
    return np.stack(arrays), np.asarray(labels, np.int64), classes
