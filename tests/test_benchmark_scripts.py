"""The benchmark scripts that drive the published tables start and document their options."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["peers.py", "peer_quantize.py", "freedoms_ablation.py", "block_memory.py",
                                    "rotation_rtn.py"])
def test_script_help(script):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_peers_ours_recipes_exist_for_every_setting():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peers
    finally:
        sys.path.pop(0)
    for setting in peers.SETTINGS:
        assert (ROOT / "configs" / "smollm2-135m" / f"reduced-{setting.lower()}.yaml").is_file(), setting
