"""Zero-shot tasks through lm-evaluation-harness: our LM wrapper's scores and a local task run."""
from __future__ import annotations

import importlib
import json
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from omniquant_pl.errors import ConfigError, OmniQuantError

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")
pytestmark = pytest.mark.lm_eval

from omniquant_pl.eval.zeroshot import OmniQuantLM, run_tasks

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "a spoon", "blue"], 0),
    ("How many legs does a spider have?", ["two", "eight"], 1),
    ("What color is snow?", ["green", "orange", "white", "black"], 2),
    ("What do bees make?", ["honey", "iron"], 0),
    ("Which is bigger, the Earth or the Moon?", ["the Moon", "the Earth"], 1),
]


def write_task(folder, name: str = "tiny_mc") -> None:
    """A multiple-choice lm-eval task: YAML + JSONL data in `folder`."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )


def _requests(*args):
    return [SimpleNamespace(args=pair) for pair in args]


def direct_loglikelihood(model, tokenizer, context: str, continuation: str, max_length: int = 10_000):
    """Sum of log p(continuation token | everything before it), from one plain forward."""
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_cont = len(whole) - len(context_ids)
    inputs = torch.tensor(whole[:-1][-max_length:]).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=inputs).logits.float(), dim=-1)[0]  # (T, V)
    targets = torch.tensor(whole[-n_cont:])
    return logprobs[-n_cont:].gather(1, targets.unsqueeze(1)).sum().item()


def test_loglikelihood_equals_a_direct_sum_of_continuation_logprobs(tokenizer):
    model = tiny_llama()
    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris"),
             ("Short", " and a much longer continuation of several tokens"),
             ("The quick brown fox jumps over the lazy dog.", " It"),
             ("x", " y z")]
    lm = OmniQuantLM(model, tokenizer, batch_size=3)  # batches of mixed lengths need padding
    scores = lm.loglikelihood(_requests(*pairs), disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(pairs, scores):
        assert score == pytest.approx(direct_loglikelihood(model, tokenizer, context, continuation), abs=1e-4)
        assert isinstance(greedy, bool)
    # left truncation to max_length keeps the last tokens
    short = OmniQuantLM(model, tokenizer, batch_size=2, max_length=6)
    (score, _), = short.loglikelihood(_requests(pairs[2]), disable_tqdm=True)
    assert score == pytest.approx(direct_loglikelihood(model, tokenizer, *pairs[2], max_length=6), abs=1e-4)


def test_loglikelihood_rolling_scores_every_token_once(tokenizer):
    model = tiny_llama()
    text = "Rolling windows score every token of a document exactly once."
    lm = OmniQuantLM(model, tokenizer, batch_size=4)
    (total,) = lm.loglikelihood_rolling(_requests((text,)))
    ids = [tokenizer.eos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits.float(), dim=-1)[0]
    expected = logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item()
    assert total == pytest.approx(expected, abs=1e-4)
    (windowed,) = OmniQuantLM(model, tokenizer, max_length=5).loglikelihood_rolling(_requests((text,)))
    assert windowed != pytest.approx(expected, abs=1e-4)  # shorter contexts: a different (finite) score
    with pytest.raises(OmniQuantError, match="generate_until"):
        lm.generate_until(_requests(("Q:", {"until": ["\n"]})))


def test_local_multiple_choice_task_runs_through_lm_eval(tmp_path, tokenizer):
    write_task(tmp_path)
    model = tiny_llama(seed=3)
    table = run_tasks(model, tokenizer, ["tiny_mc"], include_path=str(tmp_path), batch_size=4)
    result = table["tiny_mc"]
    assert result["samples"] == len(QUESTIONS) and result["num_fewshot"] == 0
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert 0.0 <= result[key] <= 1.0
    # the harness's accuracy is the argmax of our log-likelihoods (acc_norm: per byte of the choice)
    lm = OmniQuantLM(model, tokenizer)
    hits, norm_hits = 0, 0
    for question, choices, answer in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        scores = [s for s, _ in lm.loglikelihood(_requests(*[(context, " " + c) for c in choices]), disable_tqdm=True)]
        per_byte = [s / len(c) for s, c in zip(scores, choices)]
        hits += max(range(len(choices)), key=scores.__getitem__) == answer
        norm_hits += max(range(len(choices)), key=per_byte.__getitem__) == answer
    assert result["acc"] == pytest.approx(hits / len(QUESTIONS))
    assert result["acc_norm"] == pytest.approx(norm_hits / len(QUESTIONS))
    limited = run_tasks(model, tokenizer, ["tiny_mc"], limit=2, include_path=str(tmp_path))["tiny_mc"]
    assert limited["samples"] == 2


def test_unknown_task_and_bad_folder_are_one_line_errors(tmp_path, tokenizer, monkeypatch):
    import functools

    from omniquant_pl.eval import zeroshot

    write_task(tmp_path)
    # indexing lm-eval's ~15k built-in tasks takes ~12 s: search only the local folder here
    monkeypatch.setattr(zeroshot, "TaskManager", functools.partial(zeroshot.TaskManager, include_defaults=False))
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['no_such_task_xyz'\]"):
        run_tasks(tiny_llama(), tokenizer, ["tiny_mc", "no_such_task_xyz"], include_path=str(tmp_path))
    with pytest.raises(ConfigError, match="not a folder"):
        run_tasks(tiny_llama(), tokenizer, ["tiny_mc"], include_path=str(tmp_path / "missing"))


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.delitem(sys.modules, "omniquant_pl.eval.zeroshot")
    with pytest.raises(OmniQuantError, match=r'pip install -e "\.\[eval\]"'):
        importlib.import_module("omniquant_pl.eval.zeroshot")


def test_calibrate_runs_the_configured_tasks(tmp_path, tiny_model_dir):
    import cli

    write_task(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["calibrate", "--model.name_or_path", str(tiny_model_dir), "--quant.wbits", "4",
                     "--calib.source", "pydoc", "--calib.nsamples", "2", "--calib.seqlen", "32",
                     "--train.epochs", "1", "--eval.datasets", "[]", "--eval.baselines", "[fp]",
                     "--eval.tasks", "[tiny_mc]", "--eval.task_include_path", str(tmp_path),
                     "--output_dir", str(out), "--save_model", "false"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["zeroshot"]) == {"fp", "omniquant"}
    for method in ("fp", "omniquant"):
        assert results["zeroshot"][method]["tiny_mc"]["samples"] == len(QUESTIONS)
        assert 0.0 <= results["zeroshot"][method]["tiny_mc"]["acc"] <= 1.0
