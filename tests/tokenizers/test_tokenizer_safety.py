"""Bad input never crashes the process: each probe runs in a subprocess, so a segfault or an abort
fails the test (naming the probe) instead of killing pytest.

* The batch entry points release the GIL while reading the caller's strings: another thread
  clearing the caller's list mid-encode must neither crash nor change the result.
* The bad-input probes (None, bytes, lone surrogates, non-str items, bad ids and options,
  malformed tokenizer folders) are listed in ``tests/tokenizer_probes.py`` and run, with every
  other public function's, by ``tests/test_bad_input.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Big non-ASCII strings: with MALLOC_MMAP_THRESHOLD_ below their size each one is its own mmap,
# unmapped the moment its last reference goes, so reading it afterwards faults at once.
RACE = r"""
import sys, threading, time
import numpy as np
from turbotune.data import packaged_model_dir
from turbotune.tokenizers import BertTokenizer

tok = BertTokenizer.from_pretrained(packaged_model_dir(), num_threads=int(sys.argv[1]))

def make():
    return ["naïve café résumé %d " % i * 12000 for i in range(12)]  # ~240 KB each

calls = {
    "encode_batch_ragged": lambda texts, pairs: tok.encode_batch_ragged(texts)[0],
    "__call__": lambda texts, pairs: tok(texts, padding=True, return_tensors="np")["input_ids"],
    "__call__ with pairs": lambda texts, pairs: tok(texts, pairs, padding=True, return_tensors="np")["input_ids"],
}
for name, call in calls.items():
    print("mode", name, flush=True)
    ref = make()
    expected = call(ref, ref[::-1])
    for round in range(3):
        texts, pairs = make(), make()[::-1]
        go = threading.Event()

        def mutate():
            go.wait()
            time.sleep(0.005 + 0.01 * round)
            texts[:] = ["x"] * len(texts)  # drops the only references to the big strings
            pairs.clear()

        t = threading.Thread(target=mutate)
        t.start()
        go.set()
        got = call(texts, pairs)
        t.join()
        assert np.array_equal(got, expected), name + ": the result changed"
print("ok")
"""


def _run(code, *args, env=None, timeout=300):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=e)


@pytest.mark.parametrize("threads", [1, 2])
def test_list_cleared_by_another_thread_during_encoding(threads):
    """encode_batch_ragged, __call__ and __call__ with pairs, each while another thread clears the lists."""
    proc = _run(RACE, str(threads), env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        f"exit code {proc.returncode} (negative = killed by that signal)\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
