#!/usr/bin/env python3
"""Generate ``csrc/tokenizer/unicode_tables.cpp`` by probing Hugging Face ``tokenizers``.

The BERT normalizer and pre-tokenizer of the Rust ``tokenizers`` library use their
own Unicode tables (older punctuation categories, their own CJK ranges, Rust's
``char::to_lowercase`` one character at a time, NFD from the
``unicode-normalization-alignments`` crate). Python's ``unicodedata`` does not
reproduce them, so this script asks the reference implementation directly, one
code point at a time, over all of 0..0x10FFFF (surrogates excluded: they cannot
occur in UTF-8 text):

* ``clean_text``: is the code point removed, or replaced by a space?
* ``handle_chinese_chars``: is it padded with spaces (a "CJK" character)?
* ``strip_accents`` alone (NFD, then drop Mn): the NFD decomposition
  (``tokenizers.normalizers.NFD``), which characters are dropped (Mn), and the
  canonical combining class of every combining character, found by asking NFD
  whether it reorders the character against one reference character per class
  (NFD's canonical reordering moves offsets positionally, which the C++ core
  must reproduce)
* ``lowercase`` alone: what does it become?
* ``BertPreTokenizer`` on ``"a" + c + "a"``: whitespace (dropped) or punctuation (isolated)?

The generated file is checked in; the C++ core has no run-time dependency on
``tokenizers``. Re-run after upgrading ``tokenizers`` and commit the result:

    python scripts/gen_unicode_tables.py            # writes csrc/tokenizer/unicode_tables.cpp
    python scripts/gen_unicode_tables.py --check    # exit 1 if the checked-in file is stale
"""
from __future__ import annotations

import argparse
import os
import sys

import tokenizers
from tokenizers.normalizers import NFD, BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

# Flag bits, mirrored in csrc/tokenizer/unicode_tables.h.
REMOVE = 1  # clean_text drops it (NUL, U+FFFD, control characters)
CLEAN_WS = 2  # clean_text turns it into ' '
CJK = 4  # handle_chinese_chars surrounds it with spaces
PRE_WS = 8  # the pre-tokenizer treats it as whitespace
PRE_PUNCT = 16  # the pre-tokenizer isolates it as punctuation
HAS_NFD = 32  # NFD decomposes it (see the NFD map)
HAS_LOWER = 64  # lowercase changes it (see the lower map)
MARK = 128  # dropped by strip_accents (Mn) and/or has a non-zero combining class (see the mark map)

N = 0x110000
BLOCK = 256


def probe_ccc(nfd, atomic):
    """{cp: combining class} as HF's NFD sees it, for the characters that have one."""
    import unicodedata

    by_class = {}
    for cp in range(N):
        if 0xD800 <= cp <= 0xDFFF or cp not in atomic:
            continue
        v = unicodedata.combining(chr(cp))
        if v:
            by_class.setdefault(v, []).append(cp)
    # One reference character per class that NFD reorders consistently against the
    # others (characters newer than HF's Unicode data are starters there: skipped).
    refs = {}
    for v, cps in sorted(by_class.items()):
        for cp in cps:
            ok = True
            for w, other in refs.items():
                a, b = chr(other), chr(cp)
                swapped = nfd.normalize_str(b + a) != b + a  # b first: reordered iff ccc(b) > ccc(a)
                if swapped != (v > w):
                    ok = False
                    break
            if ok:
                refs[v] = cp
                break
    out = {}
    for cp in range(N):
        if 0xD800 <= cp <= 0xDFFF or cp not in atomic or not unicodedata.combining(chr(cp)):
            continue
        c = chr(cp)
        lower_than, equal = [], []
        for v, r in refs.items():
            rc = chr(r)
            after = nfd.normalize_str(rc + c) != rc + c  # reordered: ccc(ref) > ccc(c)
            before = nfd.normalize_str(c + rc) != c + rc  # reordered: ccc(c) > ccc(ref)
            if not after and not before:
                equal.append(v)
            elif after:
                lower_than.append(v)
        if len(equal) == len(refs):
            continue  # a starter (class 0) for HF: never reordered
        if len(equal) != 1:
            raise AssertionError(f"cannot determine the combining class of U+{cp:04X}: {equal}")
        out[cp] = equal[0]
    return out


def probe():
    clean = BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    chinese = BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    strip = BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=True, lowercase=False)
    nfd = NFD()
    lower = BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=True)
    pre = BertPreTokenizer()
    flags = bytearray(N)
    nfd_map = {}
    lower_map = {}
    stripped = {}
    for cp in range(N):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        f = 0
        s = clean.normalize_str(c)
        if s == "":
            f |= REMOVE
        elif s == " " and c != " ":
            f |= CLEAN_WS
        elif s != c:
            raise AssertionError(f"clean_text maps U+{cp:04X} to {s!r}: unsupported")
        s = chinese.normalize_str(c)
        if s == f" {c} ":
            f |= CJK
        elif s != c:
            raise AssertionError(f"handle_chinese_chars maps U+{cp:04X} to {s!r}: unsupported")
        s = nfd.normalize_str(c)
        if s != c:
            f |= HAS_NFD
            nfd_map[cp] = s
        s = strip.normalize_str(c)
        if s != c:
            stripped[cp] = s
        s = lower.normalize_str(c)
        if s != c:
            f |= HAS_LOWER
            lower_map[cp] = s
        parts = [p for p, _ in pre.pre_tokenize_str("a" + c + "a")]
        if parts == ["a", "a"]:
            f |= PRE_WS
        elif parts == ["a", c, "a"]:
            f |= PRE_PUNCT
        elif parts != ["a" + c + "a"]:
            raise AssertionError(f"pre-tokenizer splits 'a'+U+{cp:04X}+'a' as {parts!r}: unsupported")
        flags[cp] = f
    atomic = {cp for cp in range(N) if not 0xD800 <= cp <= 0xDFFF and cp not in nfd_map}
    ccc = probe_ccc(nfd, atomic)
    mn = {cp for cp in atomic if stripped.get(cp) == ""}
    marks = {}
    for cp in sorted(mn | set(ccc)):
        flags[cp] |= MARK
        marks[cp] = (ccc.get(cp, 0), 1 if cp in mn else 0)
    # strip_accents(c) must be NFD(c) without its Mn characters, character by character.
    for cp in range(N):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        want = stripped.get(cp, chr(cp))
        got = "".join(d for d in nfd_map.get(cp, chr(cp)) if ord(d) not in mn)
        if want != got:
            raise AssertionError(f"strip_accents(U+{cp:04X}) = {want!r} is not NFD minus Mn ({got!r}): unsupported")
    return flags, nfd_map, lower_map, marks


def emit(flags, nfd_map, lower_map, marks) -> str:
    # Two-stage table: block index (cp >> 8) -> deduplicated 256-entry block of flags.
    blocks = []
    block_ids = {}
    index = []
    for b in range(N // BLOCK):
        chunk = bytes(flags[b * BLOCK:(b + 1) * BLOCK])
        if chunk not in block_ids:
            block_ids[chunk] = len(blocks)
            blocks.append(chunk)
        index.append(block_ids[chunk])
    out = []
    w = out.append
    w("// GENERATED by scripts/gen_unicode_tables.py from Hugging Face tokenizers "
      f"{tokenizers.__version__} -- do not edit.\n")
    w("// Probes BertNormalizer / BertPreTokenizer code point by code point; see the script.\n")
    w('#include "tokenizer/unicode_tables.h"\n\nnamespace turbotune {\nnamespace tok {\n\n')
    w(f'const char* const kUnicodeTablesSource = "tokenizers {tokenizers.__version__}";\n\n')
    w(f"const uint16_t kFlagIndex[{len(index)}] = {{\n")
    for i in range(0, len(index), 24):
        w("  " + ", ".join(str(x) for x in index[i:i + 24]) + ",\n")
    w("};\n\n")
    w(f"const uint8_t kFlagBlocks[{len(blocks)}][256] = {{\n")
    for blk in blocks:
        w("  {")
        w(", ".join(str(x) for x in blk))
        w("},\n")
    w("};\n\n")
    w(f"const MarkEntry kMarkMap[{len(marks)}] = {{\n")
    items = sorted(marks.items())
    for i in range(0, len(items), 8):
        w("  " + " ".join(f"{{{cp}, {c}, {m}}}," for cp, (c, m) in items[i:i + 8]) + "\n")
    w("};\n")
    w(f"const size_t kMarkMapSize = {len(marks)};\n\n")
    for name, mp in (("Nfd", nfd_map), ("Lower", lower_map)):
        pool = []
        entries = []
        for cp in sorted(mp):
            cps = [ord(ch) for ch in mp[cp]]
            assert len(cps) <= 255
            entries.append((cp, len(pool), len(cps)))
            pool.extend(cps)
        w(f"const uint32_t k{name}Pool[{max(1, len(pool))}] = {{\n")
        for i in range(0, len(pool), 16):
            w("  " + ", ".join(str(x) for x in pool[i:i + 16]) + ",\n")
        if not pool:
            w("  0\n")
        w("};\n")
        w(f"const MapEntry k{name}Map[{len(entries)}] = {{\n")
        for i in range(0, len(entries), 6):
            w("  " + " ".join(f"{{{cp}, {off}, {n}}}," for cp, off, n in entries[i:i + 6]) + "\n")
        w("};\n")
        w(f"const size_t k{name}MapSize = {len(entries)};\n\n")
    w("}  // namespace tok\n}  // namespace turbotune\n")
    return "".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "csrc", "tokenizer", "unicode_tables.cpp"))
    ap.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = ap.parse_args()
    text = emit(*probe())
    if args.check:
        with open(args.out, encoding="utf-8") as f:
            same = f.read() == text
        print("up to date" if same else f"{args.out} is stale: re-run scripts/gen_unicode_tables.py")
        return 0 if same else 1
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
