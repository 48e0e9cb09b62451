"""Start-up time of the CLI: `stemma --help` and `stemma validate` on the worked example.

Printed against a baseline measured in the same run: the bare interpreter start
(`python -c pass`). The bar for `stemma validate` is 0.5 s of wall time.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest

#: Runs per command; the median is reported.
REPEATS = 7
#: Wall-time bar for `stemma validate` from the issue.
VALIDATE_BAR_S = 0.5


def _median_wall(args: list[str], cwd) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        assert result.returncode == 0, result.stderr
    return statistics.median(times)


@pytest.mark.benchmark
def test_cli_start_up(repo_root, stemma_exe, tmp_path):
    config = tmp_path / "credit.yaml"
    config.write_text((repo_root / "configs" / "credit.yaml").read_text())
    (tmp_path / "data.dvc").write_text("outs: []\n")
    (tmp_path / "data" / "credit").mkdir(parents=True)
    (tmp_path / "data" / "credit" / "train.parquet").write_bytes(b"")

    bare = _median_wall([sys.executable, "-c", "pass"], tmp_path)
    help_s = _median_wall([*stemma_exe, "--help"], tmp_path)
    validate_s = _median_wall([*stemma_exe, "validate", str(config)], tmp_path)
    print(
        f"\nCLI start-up (median of {REPEATS}): python -c pass {bare * 1000:.0f} ms; "
        f"stemma --help {help_s * 1000:.0f} ms ({help_s / bare:.1f}x bare python); "
        f"stemma validate {validate_s * 1000:.0f} ms ({validate_s / bare:.1f}x bare python; "
        f"bar {VALIDATE_BAR_S * 1000:.0f} ms)"
    )
    assert validate_s < VALIDATE_BAR_S
