"""The engine computes what it computed before its restructure (see reference_runs.py)."""
from __future__ import annotations

import json

import pytest
from reference_runs import REFERENCE, compute, stack


def test_fixed_seed_runs_reproduce_the_reference_file(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    runs = compute(tmp_path)
    exact = reference["stack"] == stack()
    for name, expected in reference["runs"].items():
        got = runs[name]
        if exact:  # the same kernels: every bit
            assert got == expected, name
            continue
        assert got["learned"].keys() == expected["learned"].keys() and got["codes"].keys() == expected["codes"].keys()
        for block, want in zip(got["blocks"], expected["blocks"], strict=True):
            for key in ("rtn_loss", "init_loss", "final_loss"):
                assert block[key] == pytest.approx(want[key], rel=1e-4), (name, key)
        for method, table in expected["perplexity"].items():
            for dataset, ppl in table.items():
                assert got["perplexity"][method][dataset] == pytest.approx(ppl, rel=1e-4), (name, method)
