"""The tiny model is built the same, byte for byte, in any process on any core count: the
embedded run's figures then differ between machines only by the run itself."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from vespo.models.tiny import tiny_model


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_a_fresh_build_in_another_process_is_identical(tmp_path):
    cached = tiny_model()  # the build every run uses (made by this process or an earlier one)
    fresh = tmp_path / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", f"from vespo.models.tiny import tiny_model; tiny_model(path={str(fresh)!r})"],
                   check=True, env=env, timeout=600)  # fmt: skip
    assert digests(fresh) == digests(cached)
