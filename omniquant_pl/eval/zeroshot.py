"""Zero-shot / few-shot tasks through lm-evaluation-harness on an in-memory causal LM.

`OmniQuantLM` wraps the model object itself (not a path), so whatever is installed on it is what
gets scored: a fake-quant model with its activation-quantizer hooks, an RTN context, a saved
model. lm-eval's own `TemplateLM` splits (context, continuation) into tokens; this class scores
the token pairs in right-padded batches. lm-eval is an optional extra: ``pip install -e ".[eval]"``.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omniquant_pl.errors import ConfigError, OmniQuantError

try:
    from lm_eval import simple_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # the optional extra is not installed
    raise OmniQuantError(
        'zero-shot tasks need lm-evaluation-harness, which is not installed: pip install -e ".[eval]" '
        f"(or pip install 'lm-eval>=0.4.2'); import failed with: {err}"
    ) from err

log = logging.getLogger(__name__)
logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-request INFO lines drown our output

TokenRequest = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation), context ids, continuation ids)
METRICS = ("acc", "acc_norm")


@register_model("omniquant")
class OmniQuantLM(TemplateLM):
    """lm-eval model over an in-memory Hugging Face causal LM and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        positions = getattr(model.config, "max_position_embeddings", None) or 2048
        self._max_length = max_length or positions

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _model_inputs(self, request: TokenRequest) -> tuple[list[int], int]:
        """Input ids (left-truncated to max_length) and how many trailing positions score the continuation."""
        _, context, continuation = request
        if not continuation:
            raise OmniQuantError("lm-eval asked for the log-likelihood of an empty continuation")
        tokens = (context + continuation)[-(self.max_length + 1):]
        return tokens[:-1], len(continuation)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[TokenRequest], **kwargs) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation's tokens and whether greedy decoding gives them."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inputs = [self._model_inputs(requests[i]) for i in chunk]
            width = max(len(ids) for ids, _ in inputs)
            batch = torch.full((len(chunk), width), self.eot_token_id or 0, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, _) in enumerate(inputs):  # right padding: real tokens keep positions 0..len-1
                batch[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            logits = self.model(input_ids=batch.to(self._device), attention_mask=mask.to(self._device),
                                use_cache=False).logits
            for row, (index, (ids, n_cont)) in enumerate(zip(chunk, inputs)):
                target = torch.tensor(requests[index][2][-n_cont:])  # (n_cont,)
                # only the continuation's positions: (n_cont, V), not the whole (B, T, V) batch
                scored = F.log_softmax(logits[row, len(ids) - n_cont : len(ids)].float(), dim=-1).cpu()
                total = scored.gather(1, target.unsqueeze(1)).sum().item()
                greedy = bool((scored.argmax(dim=-1) == target).all())
                results[index] = (total, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[index][0], (total, greedy))
        self.model.train(was_training)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of max_length (each token scored once)."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = [make_disjoint_window(pair) for pair in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([((text, ""), ctx, cont) for ctx, cont in windows])
            totals.append(sum(score for score, _ in scores))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise OmniQuantError(
            "this task generates text (lm-eval generate_until), which omniquant's evaluator does not run; "
            "use log-likelihood tasks (multiple_choice, e.g. piqa, arc_easy, arc_challenge, boolq, hellaswag, winogrande)"
        )


def task_manager(tasks: list[str], include_path: str | None) -> TaskManager:
    """Index only the local task folder when it holds every requested task (fast), else lm-eval's too."""
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"eval.task_include_path '{include_path}' is not a folder of task YAML files")
    candidates = []
    if include_path and "include_defaults" in inspect.signature(TaskManager).parameters:
        candidates.append(dict(include_path=include_path, include_defaults=False))
    candidates.append(dict(include_path=include_path))
    for kwargs in candidates:
        manager = TaskManager(**kwargs)
        missing = [task for task in tasks if task not in manager.all_tasks]
        if not missing:
            return manager
    where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks (no eval.task_include_path given)"
    raise ConfigError(f"unknown task(s) {missing}: not in {where}; check the names (lm-eval --tasks list) "
                      "or point eval.task_include_path at a folder with their YAML files")


def _metrics(task_results: dict) -> dict:
    """{"acc,none": .., "acc_stderr,none": ..} -> {"acc": .., "acc_stderr": ..} for acc and acc_norm."""
    out = {}
    for metric in METRICS:
        for key in (metric, f"{metric}_stderr"):
            value = task_results.get(f"{key},none")
            if isinstance(value, (int, float)):
                out[key] = float(value)
    return out


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], num_fewshot: int = 0, limit: int = 0,
              include_path: str | None = None, batch_size: int = 8,
              device: torch.device | str | None = None, seed: int = 1234) -> dict[str, dict]:
    """Accuracy and normalized accuracy (with stderr) per task: {task: {acc, acc_norm, ..., samples}}."""
    manager = task_manager(tasks, include_path)
    lm = OmniQuantLM(model, tokenizer, batch_size=batch_size, device=device)
    kwargs = dict(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit or None, task_manager=manager,
                  log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                  torch_random_seed=seed, fewshot_random_seed=seed)
    accepted = inspect.signature(simple_evaluate).parameters  # older lm-eval releases lack some seeds
    output = simple_evaluate(**{key: value for key, value in kwargs.items() if key in accepted})
    table = {}
    for task, task_results in output["results"].items():
        metrics = _metrics(task_results)
        if not metrics:
            log.warning("task %s reported no acc/acc_norm (metrics: %s)", task, sorted(task_results))
        samples = output.get("n-samples", {}).get(task, {})
        table[task] = {**metrics, "samples": samples.get("effective"), "num_fewshot": num_fewshot}
    return table
