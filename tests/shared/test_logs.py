"""JSON log lines from processes that share one stderr (as ``distill up``'s do) stay whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

EMIT = """
import sys
from distill.shared import logs
logs.configure("worker", sys.argv[1])
log = logs.get_logger()
for i in range(int(sys.argv[2])):
    log.info("tick", i=i, padding="x" * 200)
"""


def test_processes_sharing_stderr_write_whole_lines() -> None:
    """Each record and its newline go out in one write: with print (the record, then the newline)
    two processes' records ran together on one line (seen in CI: `distill up`'s workers)."""
    count = 3000
    read, write = os.pipe()
    env = {**os.environ, "DISTILL_LOG_JSON": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", EMIT, f"w{i}", str(count)], stderr=write,
                              env=env) for i in range(3)]  # fmt: skip
    os.close(write)
    with os.fdopen(read) as stream:
        lines = stream.read().splitlines()
    assert all(p.wait(60) == 0 for p in procs)
    records = [json.loads(line) for line in lines]  # a run-together line does not parse
    assert len(records) == 3 * count
    assert {r["id"] for r in records} == {"w0", "w1", "w2"}


def test_repeats_say_a_warning_once_per_interval_with_the_count_held_back() -> None:
    from distill.shared.logs import REPEAT_KEYS, Repeats

    r = Repeats(every_s=60.0)
    assert r.due("a", now=0.0) == 0
    assert [r.due("a", now=t) for t in (0.1, 0.2, 59.9)] == [None, None, None]
    assert r.due("b", now=1.0) == 0  # another key is said at once
    assert r.due("a", now=60.0) == 3  # said again, with the three held back
    assert r.due("a", now=61.0) is None
    for i in range(REPEAT_KEYS + 5):  # keys from peers cannot grow the table without bound
        r.due(("peer", i), now=100.0)
    assert len(r._last) <= REPEAT_KEYS
