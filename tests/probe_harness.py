"""Run bad-input probes in a subprocess, so that a segfault or an abort fails one probe instead of
killing pytest.

A probe is ``(code, expected)``: ``code`` is Python run with ``exec`` in a copy of a namespace
prepared once per subprocess by a setup script; ``expected`` is ``"ok"`` (the code must run to the
end; assert a correct result inside it), ``"Type1|Type2: regex"``: the code must raise an
exception that is an instance of one of the named types (matched against the names in its MRO, so
``ValueError`` accepts a ``ValueError`` subclass) whose message matches ``regex`` (``re.search``), or
``"ok|Type: regex"``: either.

:func:`run_probes` runs a list of probes in one subprocess, one ``RESULT`` line per probe. When the
process dies (a signal, ``os._exit``) or hangs, the probe that was running is reported as
``CRASHED: ...`` / ``TIMEOUT: ...`` and the remaining probes run in a fresh subprocess, so one crash
neither hides nor fails the other probes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

Probe = Tuple[str, str]

# The driver: reads {"setup", "probes", "vars", "start", "mem_gib"} as JSON on stdin. After the setup
# (imports), the address space is capped at the current size + mem_gib, so a probe that allocates
# a huge tensor gets an allocation error instead of filling the (shared) machine's memory.
DRIVER = r"""
import json, resource, sys, traceback
spec = json.loads(sys.stdin.read())
ns = dict(spec["vars"])
exec(spec["setup"], ns)
if spec["mem_gib"]:
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    cap = vm + int(spec["mem_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
for i in range(spec["start"], len(spec["probes"])):
    print("START", i, flush=True)
    try:
        exec(spec["probes"][i], dict(ns))
        got = {"ok": True}
    except BaseException as exc:
        got = {"ok": False, "types": [c.__name__ for c in type(exc).__mro__],
               "message": str(exc), "where": traceback.format_exc(limit=-3)[-1500:]}
    print("RESULT", json.dumps([i, got]), flush=True)
"""


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_probes(setup: str, probes: Sequence[str], *, vars: Optional[dict] = None, env: Optional[dict] = None,
               timeout: float = 120.0, mem_gib: float = 4.0) -> List[dict]:
    """Run ``probes`` (code strings) after ``setup``; one result dict per probe, in order.

    Result: ``{"ok": True}``, ``{"ok": False, "types": [...MRO names], "message", "where"}``, or
    ``{"crashed": "..."}`` for the probe during which the subprocess died or hung (``timeout``
    seconds per subprocess).
    """
    e = dict(os.environ)
    e.update(env or {})
    results: Dict[int, dict] = {}
    start = 0
    while start < len(probes):
        spec = json.dumps({"setup": setup, "probes": list(probes), "vars": vars or {}, "start": start,
                           "mem_gib": mem_gib})
        proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=e)
        try:
            out, err = proc.communicate(spec, timeout=timeout)
            died = _describe_exit(proc.returncode) if proc.returncode != 0 else None
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            died = f"timed out after {timeout:.0f} s"
        running = None
        for line in out.splitlines():
            if line.startswith("START "):
                running = int(line.split()[1])
            elif line.startswith("RESULT "):
                i, got = json.loads(line[len("RESULT "):])
                results[i] = got
                running = None
        if died is None and running is None and len(results) == len(probes):
            break
        if running is None and (died is None or not results or max(results) < start):
            # the setup itself failed (or printed nothing): report it on every remaining probe
            for i in range(start, len(probes)):
                results[i] = {"crashed": f"the probe process failed before probe {i} ({died or 'no output'}):\n"
                                         f"{err[-3000:]}"}
            break
        if running is None:  # finished the last probe, then died (e.g. at exit)
            running = max(results)
            results[running] = {"crashed": f"the process died after the last probe ({died}):\n{err[-3000:]}"}
        else:
            results[running] = {"crashed": f"{died} during this probe:\n{err[-3000:]}"}
        start = running + 1
    return [results.get(i, {"crashed": "no result"}) for i in range(len(probes))]


def mismatch(expected: str, got: dict) -> Optional[str]:
    """None when ``got`` (a result of :func:`run_probes`) meets ``expected``, else why not."""
    if "crashed" in got:
        return f"CRASHED: {got['crashed']}"
    if expected == "ok":
        if got["ok"]:
            return None
        return f"expected it to run, got {got['types'][0]}: {got['message']}\n{got['where']}"
    if expected.startswith("ok|"):  # either runs, or raises the error that follows
        if got["ok"]:
            return None
        expected = expected[3:]
    types, _, pattern = expected.partition(": ")
    if got["ok"]:
        return f"expected {expected}, but it ran without an error"
    if not set(types.split("|")) & set(got["types"]):
        return f"expected {expected}, got {got['types'][0]}: {got['message']}\n{got['where']}"
    if pattern and re.search(pattern, got["message"], re.S) is None:
        return f"expected a message matching {pattern!r}, got {got['types'][0]}: {got['message']}"
    return None
