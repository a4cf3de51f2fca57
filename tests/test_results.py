"""Typed results: results.json, checkpoint.json and a saved model's config.omniquant are written from
and read back through the classes of results.py; files written before the schema existed (tests/data/v1/,
written by the code of that time) still load, and a run checkpointed then still resumes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from omniquant_pl.errors import OmniQuantError
from omniquant_pl.results import SCHEMA_VERSION, BlockResult, RunResults, SavedModelMeta, read_results

V1 = Path(__file__).resolve().parent / "data" / "v1"


def test_a_results_file_from_before_the_schema_loads_and_writes_back_losslessly():
    old = json.loads((V1 / "results.json").read_text())
    assert "schema_version" not in old and old["device"] == "cpu"  # the old layout: settings at the top
    results = read_results(V1 / "results.json")
    assert results.quant_tag == "W4A16g16" and results.finished_blocks == 2 and results.plan is None
    assert results.blocks[1].final_loss == old["blocks"][1]["final_loss"]
    assert results.perplexity["omniquant"]["pydoc"].ppl == old["perplexity"]["omniquant"]["pydoc"]["ppl"]
    assert results.extra["device"] == "cpu" and results.extra["precision"] == "32-true"
    written = results.to_dict()
    assert written.pop("schema_version") == SCHEMA_VERSION
    assert written == old  # nothing lost, nothing invented
    assert RunResults.from_dict(results.to_dict()) == results


def test_a_new_run_writes_results_json_that_reads_back_to_the_returned_results(tmp_path, tokenizer):
    from conftest import tiny_llama
    from family_checks import tiny_run_config

    from omniquant_pl import QuantConfig, calibrate

    results = calibrate(tiny_run_config(tmp_path, "run", QuantConfig(wbits=4, group_size=16)), model=tiny_llama(),
                        tokenizer=tokenizer)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION and on_disk["plan"]["device"] == "cpu"
    assert read_results(tmp_path / "run" / "results.json") == results
    assert on_disk == results.to_dict()
    assert isinstance(results.blocks[0], BlockResult) and results.plan.precision == "32-true"
    checkpoint = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert RunResults.from_dict(checkpoint["results"]).blocks == results.blocks


def test_saved_model_metadata_round_trips_and_the_old_one_loads():
    old = json.loads((V1 / "model-config.json").read_text())["omniquant"]
    meta = SavedModelMeta.from_dict(old)
    assert (meta.method, meta.wbits, meta.group_size, meta.activations) == ("omniquant-lwc", 4, 16, None)
    assert meta.quant_config().tag == "W4A16g16"
    assert SavedModelMeta.from_dict(meta.to_dict()) == meta
    assert SavedModelMeta.from_dict(None) is None

    from omniquant_pl.config import QuantConfig

    w4a4 = SavedModelMeta.of_run(QuantConfig(wbits=4, abits=4, let=True))
    assert w4a4.method == "omniquant-lwc+let" and w4a4.activations.bits == 4
    assert SavedModelMeta.from_dict(json.loads(json.dumps(w4a4.to_dict()))) == w4a4


def test_a_newer_or_damaged_results_file_is_a_one_line_error(tmp_path):
    newer = tmp_path / "results.json"
    newer.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "config": {}, "quant_tag": "W4A16",
                                 "model_type": "llama"}))
    with pytest.raises(OmniQuantError, match="newer omniquant-pl") as err:
        read_results(newer)
    assert "\n" not in str(err.value)
    newer.write_text("{not json")
    with pytest.raises(OmniQuantError, match="not a readable results.json"):
        read_results(newer)


def test_a_run_checkpointed_before_the_schema_resumes(tmp_path, tokenizer):
    """tests/data/v1/cut: block 0 of 2 finished by the code of that time (old checkpoint.json
    layout); resumed now, it finishes block 1 and writes the new layout, block 0's result kept."""
    from conftest import tiny_llama

    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate

    run = tmp_path / "cut"
    shutil.copytree(V1 / "cut", run)
    old_block = json.loads((run / "checkpoint.json").read_text())["results"]["blocks"][0]
    config = RunConfig(model=ModelConfig("in-memory"), quant=QuantConfig(wbits=4, group_size=16),
                       calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32), train=TrainConfig(epochs=2, batch_size=2),
                       eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=1, baselines=["fp", "rtn"]),
                       output_dir=str(run), save_model=False, resume=True)
    results = calibrate(config, model=tiny_llama(), tokenizer=tokenizer)
    assert results.resumed_at_block == 1 and results.finished_blocks == 2
    assert results.blocks[0].final_loss == old_block["final_loss"]
    assert json.loads((run / "results.json").read_text())["schema_version"] == SCHEMA_VERSION
    finished = json.loads((V1 / "results.json").read_text())  # the same run, uninterrupted, by the old code
    assert [b.final_loss for b in results.blocks] == pytest.approx([b["final_loss"] for b in finished["blocks"]],
                                                                   rel=1e-6)
