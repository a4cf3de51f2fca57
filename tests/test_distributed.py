"""Data-parallel calibration (torchrun, Lightning's DDP strategy, gloo on the CPU) equals a single
process whose batch is the global batch; only rank 0 writes; a batch that cannot split is refused.

Tolerance of the equality: learned parameters rtol 1e-5 / atol 1e-6 and losses rtol 1e-5 (the two
runs add the same gradients in another order and batch shape; measured: at most 1 ulp). Weight-only
(W4A16+LET): with 4-bit activations a rounding-sized difference can flip an activation's rounding
and grow over the steps (benchmarks/distributed.py measures both).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import cli
from omniquant_pl.distributed import Processes
from omniquant_pl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6
# (name, global batch, shuffle, nsamples, steps_per_call): 4 batches in one Lightning step; then
# 3 shuffled batches of 4, 4 and a last one of 2 (1 window per process), 2 optimizer steps per call
CASES = [("batch2", 2, False, 8, 16), ("batch4_shuffled", 4, True, 10, 2)]


def _config(tmp_path: Path, model_dir: Path, name: str, batch_size: int, shuffle: bool, nsamples: int,
            steps_per_call: int) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "quant": {"wbits": 4, "abits": 16, "let": True, "group_size": 16},
        "calib": {"source": "pydoc", "nsamples": nsamples, "seqlen": 32},
        "train": {"epochs": 2, "batch_size": batch_size, "shuffle": shuffle, "accelerator": "cpu",
                  "steps_per_call": steps_per_call, "lwc_lr": 5e-2, "let_lr": 1e-2, "keep_best": False},
        "eval": {"datasets": ["pydoc"], "seqlen": 32, "max_windows": 1, "baselines": ["fp"]},
        "output_dir": str(tmp_path / "outputs" / name),
        "save_model": shuffle,
        "trainer": {"callbacks": [{"class_path": "distributed_entry.TrainedStatePerRank",
                                   "init_args": {"record_dir": str(tmp_path / "records" / name)}}]},
    }
    (tmp_path / "records" / name).mkdir(parents=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    from conftest import tiny_llama

    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, llama_dir):
    configs = [_config(tmp_path, llama_dir, *case) for case in CASES]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "distributed_entry.py"), str(tmp_path / "outputs"), str(tmp_path / "records"),
         *map(str, configs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 1 wrote nothing under the output folders (the recorder does see rank 0's writes)
    assert json.loads((tmp_path / "records" / "writes_rank1.json").read_text()) == []
    assert any("results.json" in path for _, path in json.loads((tmp_path / "records" / "writes_rank0.json").read_text()))

    for (name, *_), config in zip(CASES, configs):
        parallel, single = tmp_path / "outputs" / name, tmp_path / "single" / name
        # every process trained the same parameters (all-reduced gradients), bit for bit
        records = tmp_path / "records" / name
        rank0, rank1 = (torch.load(records / f"trained_rank{r}.pt") for r in (0, 1))
        assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
        assert cli.main(["calibrate", "--config", str(config), "--output_dir", str(single)]) == 0
        single_trained = torch.load(records / "trained_rank0.pt")  # the one process is rank 0
        for key in single_trained:
            torch.testing.assert_close(rank0[key], single_trained[key], rtol=RTOL, atol=ATOL)
        # what rank 0 wrote equals the single process's files
        learned, reference = (load_file(d / "learned_params.safetensors") for d in (parallel, single))
        assert learned.keys() == reference.keys() and any(k.startswith("layers.1.") for k in learned)
        assert any((v - 4.0).abs().max() > 1e-2 for k, v in reference.items() if k.endswith("lwc.upper"))  # trained
        for key in reference:
            torch.testing.assert_close(learned[key], reference[key], rtol=RTOL, atol=ATOL)
        results, expected = (json.loads((d / "results.json").read_text()) for d in (parallel, single))
        assert results["plan"]["processes"] == 2 and expected["plan"]["processes"] == 1
        for block, block_expected in zip(results["blocks"], expected["blocks"], strict=True):
            assert len(block["epoch_losses"]) == 2
            torch.testing.assert_close(block["epoch_losses"], block_expected["epoch_losses"], rtol=RTOL, atol=0)
            for loss in ("rtn_loss", "init_loss", "final_loss"):
                torch.testing.assert_close(block[loss], block_expected[loss], rtol=RTOL, atol=0)
        assert results["perplexity"].keys() == {"fp", "omniquant"}  # rank 0 evaluated
        assert results["calibration_ids_sha256"] == expected["calibration_ids_sha256"]  # resumable at any count
        assert (parallel / "model").is_dir() == (name == "batch4_shuffled")


def test_shards_are_each_process_part_of_every_global_batch():
    ranks = [Processes(world_size=2, rank=r, local_world_size=2) for r in (0, 1)]
    assert [p.shard_rows(8, 4) for p in ranks] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # a last global batch of 2 windows: one per process
    assert [p.shard_rows(10, 4) for p in ranks] == [[0, 1, 4, 5, 8], [2, 3, 6, 7, 9]]
    assert ranks[1].local_batch_size(4, 10) == 2 and Processes().local_batch_size(3, 10) == 3
    with pytest.raises(ConfigError, match="calib.nsamples 9 leaves a last batch of 1 windows"):
        ranks[0].local_batch_size(4, 9)


def test_batch_that_cannot_split_is_refused_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError) as err:
        Processes(world_size=2, local_world_size=2).local_batch_size(1, 8)
    assert str(err.value) == ("train.batch_size 1 cannot be split over 2 processes; set train.batch_size to a "
                              "multiple of 2")
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    code = cli.main(["calibrate", "--model.name_or_path", str(tmp_path / "no-model-here"), "--train.batch_size", "3",
                     "--output_dir", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: train.batch_size 3 cannot be split over 2 processes; set train.batch_size to a multiple of 2")
