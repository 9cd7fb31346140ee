"""Build a real-text corpus (>= 20 MB by default) from files already on a Debian machine.

Nothing is downloaded and the text is not committed: the tokenizer tests and
benchmarks call :func:`build_corpus` (or run this script) to create it on the
machine they run on. Sources, in order, each capped so the corpus mixes them:

* licence texts and package documentation: ``/usr/share/common-licenses``,
  ``/usr/share/doc/**`` (copyright files, READMEs, changelogs, gzip included)
* manual pages, English and translated: ``/usr/share/man/**`` (gzip)
* translated user-interface strings (many scripts and languages): the
  ``msgstr`` entries of gettext catalogues ``/usr/share/locale/**/*.mo``
* locale definitions ``/usr/share/i18n/locales``, Perl documentation
* Python's own standard library and its documentation strings (always present
  where Python runs, so the corpus reaches its size on a minimal image too)

Each output line is one non-empty line of a source file (UTF-8 only; files that
are not valid UTF-8 are skipped). The order is deterministic (sorted paths), so
two runs on the same machine give the same file.

    python scripts/build_corpus.py [--out PATH] [--mb 24]      (or: python -m turbotune.corpus)

The default location is ``$TURBOTUNE_CORPUS`` or ``~/.cache/turbotune/corpus.txt``.
"""
from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys
import sysconfig
from typing import Iterator, List, Optional, Tuple

from .tokenizers._io import atomic_open

MB = 1 << 20


def _walk(root: str, exts: Optional[Tuple[str, ...]] = None) -> Iterator[str]:
    if not os.path.isdir(root):
        return
    for dirpath, dirnames, filenames in os.walk(root):
        # Python's own library only: not the third-party packages installed beside it.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in sorted(filenames):
            if exts is None or f.endswith(exts):
                p = os.path.join(dirpath, f)
                if os.path.isfile(p) and not os.path.islink(p):
                    yield p


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8 * MB)
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
        if b"\x00" in raw[:4096]:
            return None
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile, ValueError):
        return None


def _mo_strings(path: str) -> Optional[str]:
    """The translated strings (msgstr) of a GNU gettext .mo catalogue."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        magic = struct.unpack("<I", data[:4])[0]
        end = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
        if end is None:
            return None
        n, _, trans_off = struct.unpack(end + "3I", data[8:20])
        out = []
        for i in range(1, n):  # entry 0 is the catalogue header
            length, off = struct.unpack(end + "2I", data[trans_off + 8 * i: trans_off + 8 * i + 8])
            s = data[off:off + length].decode("utf-8")
            out.extend(s.split("\x00"))
        return "\n".join(out)
    except (OSError, struct.error, UnicodeDecodeError):
        return None


def _sources() -> List[Tuple[str, float, Iterator[Tuple[str, Optional[str]]]]]:
    """(name, share of the target size, iterator of (path, text))."""
    stdlib = sysconfig.get_paths()["stdlib"]

    def files(roots, exts=None, reader=_read_text):
        for r in roots:
            for p in _walk(r, exts):
                yield p, reader(p)

    return [
        ("licences+docs", 0.25, files(["/usr/share/common-licenses", "/usr/share/doc"])),
        ("man pages", 0.20, files(["/usr/share/man"])),
        ("translations", 0.25, files(["/usr/share/locale"], (".mo",), _mo_strings)),
        ("locales+perl", 0.05, files(["/usr/share/i18n/locales", "/usr/share/perl"], None)),
        ("python stdlib", 1.0, files([stdlib], (".py", ".txt", ".rst", ".html", ".json", ".xml", ".cfg"))),
    ]


def build_corpus(out: str, mb: float = 24.0, quiet: bool = False) -> str:
    """Write the corpus to ``out`` (creating directories) unless it already has >= ``mb`` MB; return ``out``."""
    target = int(mb * MB)
    if os.path.isfile(out) and os.path.getsize(out) >= target:
        return out
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    total = 0
    stats = []
    # A temporary file of its own (unique name beside `out`, renamed over it when complete): two
    # builds running at once each write their own, and the last rename wins with a whole file.
    with atomic_open(out, "w", encoding="utf-8", newline="\n") as f:
        for name, share, it in _sources():
            cap = target - total if share >= 1.0 else int(target * share)
            got = 0
            for _path, text in it:
                if got >= cap or total >= target:
                    break
                if not text:
                    continue
                for line in text.splitlines():
                    line = line.strip()
                    if not line:
                        continue
                    data = line + "\n"
                    f.write(data)
                    n = len(data.encode("utf-8"))
                    got += n
                    total += n
            stats.append((name, got))
        if total < target:  # raised inside the block: the temporary file is removed, `out` untouched
            raise RuntimeError(
                f"only {total / MB:.1f} MB of text found on this machine, {mb} MB wanted: sources {stats}")
    if not quiet:
        print(f"wrote {out}: {total / MB:.1f} MB ({', '.join(f'{n} {g / MB:.1f} MB' for n, g in stats)})")
    return out


def default_path() -> str:
    """``$TURBOTUNE_CORPUS``, else ``$XDG_CACHE_HOME/turbotune/corpus.txt`` (``~/.cache`` by default)."""
    env = os.environ.get("TURBOTUNE_CORPUS")
    if env:
        return env
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "turbotune", "corpus.txt")


def corpus_path(mb: float = 24.0) -> str:
    """The corpus at :func:`default_path`, built on first use (about a second)."""
    return build_corpus(default_path(), mb, quiet=True)


def main() -> int:
    ap = argparse.ArgumentParser(description="Build the tokenizer corpus from text files on this machine.")
    ap.add_argument("--out", default=default_path())
    ap.add_argument("--mb", type=float, default=24.0)
    args = ap.parse_args()
    build_corpus(args.out, args.mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
