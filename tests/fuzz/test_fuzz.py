"""A bounded coverage-guided fuzzing run of every target (atheris); ``make fuzz`` runs longer.

Each target starts from its seeds in ``fuzz/seeds`` and fails the test on any crash, hang or
exception the target does not expect. FUZZ_SECONDS sets the time per target (default 15).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("FUZZ_SECONDS", "15"))


TARGETS = sorted(p.name for p in (ROOT / "fuzz" / "seeds").iterdir())  # each has seeds


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "fuzz" / "seeds" / target, corpus)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            target,
            f"-max_total_time={SECONDS}",
            "-max_len=4096",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS * 4 + 60,
    )
    tail = "\n".join(proc.stderr.splitlines()[-30:])
    assert proc.returncode == 0, f"fuzzer found a problem:\n{tail}"
    done = re.search(r"Done (\d+) runs", proc.stderr)
    assert done and int(done.group(1)) > 100, tail
    print(f"{target}: {done.group(1)} executions in {SECONDS} s")
