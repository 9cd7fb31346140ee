#!/usr/bin/env python3
"""Build the tokenizer test/benchmark corpus (>= 20 MB of real text from files on this
machine; nothing downloaded, nothing committed). See :mod:`turbotune.corpus`.

    python scripts/build_corpus.py [--out PATH] [--mb 24]
"""
import sys

from turbotune.corpus import main

if __name__ == "__main__":
    sys.exit(main())
