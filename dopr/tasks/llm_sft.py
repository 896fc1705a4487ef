"""task=llm_sft: LoRA supervised fine-tuning of any Hugging Face causal LM on math solutions.

Training objective: next-token NLL of the solution given the question (prompt tokens are masked).
Validation: the same NLL on held-out examples. Test: greedy generation of whole solutions, scored by
GSM8K-style answer extraction (``test/accuracy``). The paper's setting is Llama-3.2-3B /
Llama-3.1-8B on OpenMathInstruct-2, judged on GSM8K; offline, tests use a tiny random Llama.

LoRA adapters go on every Linear projection of attention and MLP (peft ``target_modules="all-linear"``,
which leaves the LM head alone). peft's ``lora_A`` and ``lora_B`` are ``nn.Linear`` modules, so
activation preconditioning sees A's input (the layer input) and B's input (A's output); the frozen
base weights are not trainable and are skipped.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dopr.data.sft import SFTExample, answers_match, detect_schema, extract_answer, to_example
from dopr.tasks.base import Task, require_at_least

LOCAL_SUFFIXES = (".jsonl", ".json")
HUB_EVAL_DATASET = "openai/gsm8k"  # what task.eval_dataset=auto means for a Hub training set


def is_local(dataset: str) -> bool:
    """A local file (existing, or named like one) rather than a Hugging Face Hub dataset name."""
    return (Path(dataset).expanduser().exists() or dataset.endswith(LOCAL_SUFFIXES)
            or dataset.startswith((".", "/", "~")))


def _read_local_rows(path: Path) -> list[dict]:
    if path.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"dataset file {path} must be one of {LOCAL_SUFFIXES} (JSON lines or a JSON list of rows)")
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_rows(dataset: str, config_name: str | None, split: str, limit: int | None,
              key: str = "task.dataset") -> list[dict]:
    """Rows of a local .jsonl/.json file, or of a Hugging Face Hub dataset (streamed, first ``limit`` rows).
    ``key`` is the config key that named the dataset, for the error messages."""
    path = Path(dataset).expanduser()
    if path.exists():
        rows = _read_local_rows(path)
        return rows[:limit] if limit else rows
    if is_local(dataset):
        raise FileNotFoundError(f"{key}={dataset}: the file does not exist")
    alternative = f"export it to JSON lines and pass {key}=/path/to/file.jsonl"
    if key == "task.eval_dataset":
        alternative += ", or pass task.eval_dataset=null to hold the test set out of task.dataset"
    try:
        import datasets
    except ImportError as err:  # e.g. a pyarrow built for another numpy
        raise RuntimeError(f"loading Hub dataset {key}={dataset!r} needs the `datasets` package, which failed to "
                           f"import ({err}); or {alternative}") from err
    try:
        stream = datasets.load_dataset(dataset, config_name, split=split, streaming=True)
        rows = []
        for row in stream:
            rows.append(dict(row))
            if limit and len(rows) >= limit:
                break
        return rows
    except Exception as err:  # the Hub client raises many types; all mean "not available here"
        raise RuntimeError(
            f"could not load {key}={dataset!r} (config {config_name!r}, split {split!r}): {err}\n"
            f"Offline? Fetch it once with network access, e.g. `hf download --repo-type dataset "
            f"{dataset}`, or {alternative}") from err


def load_examples(dataset: str, config_name: str | None, split: str, limit: int | None,
                  key: str = "task.dataset") -> list[SFTExample]:
    rows = load_rows(dataset, config_name, split, limit, key)
    if not rows:
        raise ValueError(f"{key}={dataset!r} (split {split!r}) has no rows")
    schema = detect_schema(rows[0].keys())
    return [to_example(row, schema) for row in rows]


class LLMSFTTask(Task):
    headline_metric = "test/accuracy"
    higher_is_better = True

    def __init__(self, seed: int = 0, device: str = "cpu", model: str = "meta-llama/Llama-3.2-3B",
                 dataset: str = "nvidia/OpenMathInstruct-2", dataset_config: str | None = None,
                 train_split: str = "train_1M", train_episodes: int | None = 100_000,
                 eval_dataset: str | None = "auto", eval_dataset_config: str | None = "main",
                 eval_split: str = "test", val_episodes: int = 256, eval_episodes: int = 500, batch_size: int = 8,
                 eval_batch_size: int = 16, max_seq_len: int = 1024, max_new_tokens: int = 512,
                 lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                 lora_target_modules: Any = "all-linear", dtype: str = "auto",
                 gradient_checkpointing: bool = False, **kwargs: Any):
        super().__init__(seed=seed, device=device, **kwargs)
        self.model_name = model
        self.lora = dict(r=int(lora_r), lora_alpha=int(lora_alpha), lora_dropout=float(lora_dropout),
                         target_modules=lora_target_modules if isinstance(lora_target_modules, str)
                         else list(lora_target_modules))
        self.dtype = dtype
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.max_seq_len, self.max_new_tokens = int(max_seq_len), int(max_new_tokens)
        require_at_least(1, batch_size=batch_size, eval_batch_size=eval_batch_size, max_seq_len=max_seq_len,
                         max_new_tokens=max_new_tokens, val_episodes=val_episodes, eval_episodes=eval_episodes,
                         train_episodes=train_episodes)
        if eval_dataset == "auto":  # a local training file is the offline case: test on its own held-out rows
            eval_dataset = None if is_local(dataset) else HUB_EVAL_DATASET

        self.tokenizer = self._load_tokenizer()
        val_episodes, eval_episodes = int(val_episodes), int(eval_episodes)
        held_out = val_episodes + (0 if eval_dataset else eval_episodes)
        limit = None if train_episodes is None else int(train_episodes) + held_out
        examples = load_examples(dataset, dataset_config, train_split, limit)
        if len(examples) <= held_out:
            held = (f"task.val_episodes={val_episodes}"
                    + ("" if eval_dataset else f" and task.eval_episodes={eval_episodes}"))
            room = max(1, len(examples) // 8)
            raise ValueError(
                f"task.dataset={dataset!r} has {len(examples)} rows; holding out {held} leaves none for training. "
                f"Lower them (e.g. task.val_episodes={room}" + ("" if eval_dataset else f" task.eval_episodes={room}")
                + ") or use a bigger dataset")
        random.Random(self.seed).shuffle(examples)
        if eval_dataset:
            test = load_examples(eval_dataset, eval_dataset_config, eval_split, eval_episodes, key="task.eval_dataset")
        else:  # hold the test set out of the training file as well
            test, examples = examples[:eval_episodes], examples[eval_episodes:]
        self.val_examples, self.train_examples = examples[:val_episodes], examples[val_episodes:]
        self.test_examples = test[:eval_episodes]
        self._train_encoded = [e for e in map(self._encode, self.train_examples) if e is not None]
        self._val_encoded = [e for e in map(self._encode, self.val_examples) if e is not None]
        if not self._train_encoded:
            raise ValueError(f"every training example is longer than max_seq_len={self.max_seq_len}")

    # --- loading ----------------------------------------------------------------------------------
    def _load_tokenizer(self):
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        except Exception as err:
            raise RuntimeError(self._fetch_hint("tokenizer", err)) from err
        if tokenizer.pad_token_id is None:  # Llama tokenizers ship without one; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {self.model_name!r} has no eos token; generation could not stop")
        return tokenizer

    def _fetch_hint(self, what: str, err: Exception) -> str:
        return (f"could not load the {what} of {self.model_name!r}: {err}\n"
                f"Offline? Fetch it once with network access (`hf download {self.model_name}`; "
                f"gated models need `hf auth login` first), or pass a local directory as task.model=/path")

    def build_model(self) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(self.seed)
        dtype = self.dtype
        if dtype == "auto":  # bf16 where it is fast, fp32 on CPU
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        try:
            base = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=getattr(torch, dtype))
        except Exception as err:
            raise RuntimeError(self._fetch_hint("weights", err)) from err
        if self.gradient_checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        config = LoraConfig(task_type="CAUSAL_LM", bias="none", **self.lora)
        model = get_peft_model(base, config)
        return model.to(self.device)

    # --- data ---------------------------------------------------------------------------------------
    def _encode(self, example: SFTExample) -> tuple[list[int], int] | None:
        """Token ids of prompt + completion + EOS, and the prompt length; None when too long."""
        prompt = self.tokenizer(example.prompt)["input_ids"]
        completion = self.tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        ids = prompt + completion + [self.tokenizer.eos_token_id]
        if len(prompt) >= self.max_seq_len:
            return None
        return ids[: self.max_seq_len], len(prompt)

    def _collate(self, encoded: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
            attention[i, : len(ids)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device),
                "labels": labels.to(self.device)}

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(self.seed)
        while True:
            yield self._collate(rng.sample(self._train_encoded, min(self.batch_size, len(self._train_encoded))))

    # --- losses -----------------------------------------------------------------------------------
    def _nll_sum(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                              ignore_index=-100, reduction="sum")
        return nll, (targets != -100).sum()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        nll, count = self._nll_sum(model, batch)
        return nll / count.clamp(min=1)

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for start in range(0, len(self._val_encoded), self.eval_batch_size):
            nll, n = self._nll_sum(model, self._collate(self._val_encoded[start:start + self.eval_batch_size]))
            total, count = total + float(nll), count + int(n)
        return {"val/loss": total / max(count, 1)}

    # --- test-time metric: generate whole solutions -------------------------------------------------
    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[str]) -> list[str]:
        """Greedy completions of ``prompts`` (left-padded batches), decoded without special tokens."""
        outputs = []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation appends on the right
        try:
            for start in range(0, len(prompts), self.eval_batch_size):
                enc = self.tokenizer(prompts[start:start + self.eval_batch_size], return_tensors="pt", padding=True)
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                new_tokens = max(1, min(self.max_new_tokens, self.max_seq_len - enc["input_ids"].shape[1]))
                out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id,
                                     eos_token_id=self.tokenizer.eos_token_id)
                outputs += self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        finally:
            self.tokenizer.padding_side = side
        return outputs

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        completions = self.generate(model, [e.prompt for e in self.test_examples])
        correct = [answers_match(extract_answer(c), e.answer) for c, e in zip(completions, self.test_examples)]
        return {"test/accuracy": sum(correct) / len(correct)}
