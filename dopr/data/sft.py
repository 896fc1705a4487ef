"""Math SFT data: dataset schemas, prompt format, and GSM8K-style answer extraction.

Two schemas are recognized from their fields:

- OpenMathInstruct-2 (``problem``, ``generated_solution``, ``expected_answer``); solutions end in
  ``\\boxed{...}``.
- GSM8K (``question``, ``answer``), where ``answer`` is a worked solution ending ``#### N``.

Every example becomes ``(prompt, completion, reference_answer)``. The completion always ends with a
``#### <answer>`` line so that a model fine-tuned on either schema writes its final answer the same
way, and the extractor reads ``#### N`` first, then ``\\boxed{N}``, then the last number.

``python -m dopr.data.sft tiny_fixture=DIR`` writes a tiny random Llama model, a character-level
tokenizer and a GSM8K-schema jsonl to DIR, for offline smoke runs of ``task=llm_sft``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

PROMPT_TEMPLATE = "Question: {question}\nAnswer: "
FINAL_MARK = "####"

SCHEMAS = {
    "openmathinstruct2": ("problem", "generated_solution", "expected_answer"),
    "gsm8k": ("question", "answer"),
}


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    completion: str
    answer: str  # normalized reference answer


def detect_schema(columns) -> str:
    """Name of the schema whose fields are all present in ``columns``."""
    columns = set(columns)
    for name, fields in SCHEMAS.items():
        if set(fields) <= columns:
            return name
    expected = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in SCHEMAS.items())
    raise ValueError(f"dataset columns {sorted(columns)} match no known schema ({expected}); "
                     "rename the fields or convert the file to one of these schemas")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_answer(text: str | None) -> str | None:
    """Canonical form of a final answer: no ``$``, commas, spaces or trailing period; ``12.0`` -> ``12``;
    ``\\frac{a}{b}`` stays as written (compared as a string). None for an empty answer."""
    if text is None:
        return None
    s = text.strip().strip(".").replace("$", "").replace(",", "").replace(" ", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    if re.fullmatch(r"-?\d+\.\d*|-?\.\d+", s):
        value = float(s)
        s = str(int(value)) if value == int(value) else repr(value)
    return s or None


def _last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}``, with nested braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a generated solution, GSM8K-style.

    Order: the text after the first ``####`` (up to the end of that line); else the last
    ``\\boxed{...}``; else the last number in the text. Normalized with :func:`normalize_answer`.
    """
    if FINAL_MARK in text:
        after = text.split(FINAL_MARK, 1)[1].strip().splitlines()
        candidate = after[0] if after else ""
        numbers = _NUMBER.findall(candidate)
        # "#### 1,234 apples" -> 1234; "#### \frac{1}{2}" -> kept as written
        return normalize_answer(numbers[0] if numbers and not candidate.lstrip().startswith("\\") else candidate)
    boxed = _last_boxed(text)
    if boxed is not None:
        return normalize_answer(boxed)
    numbers = _NUMBER.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None


def to_example(row: dict, schema: str) -> SFTExample:
    """One dataset row as (prompt, completion ending in ``#### answer``, normalized answer)."""
    if schema == "gsm8k":
        question, solution = row["question"], row["answer"]
        answer = extract_answer(solution)
        if FINAL_MARK not in solution:
            solution = f"{solution.rstrip()}\n{FINAL_MARK} {answer}"
    elif schema == "openmathinstruct2":
        question, answer = row["problem"], normalize_answer(str(row["expected_answer"]))
        solution = f"{row['generated_solution'].rstrip()}\n{FINAL_MARK} {row['expected_answer']}"
    else:
        raise ValueError(f"unknown schema {schema!r}; known: {sorted(SCHEMAS)}")
    return SFTExample(PROMPT_TEMPLATE.format(question=question.strip()), solution.strip(), answer)


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Exact match after normalization; numerically equal numbers match (``0.50`` == ``.5``)."""
    if predicted is None or reference is None:
        return False
    if predicted == reference:
        return True
    try:
        return abs(float(predicted) - float(reference)) < 1e-9
    except ValueError:
        return False


# --- offline fixture ------------------------------------------------------------------------------

TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?!+-*/=#$()\n"


def write_char_tokenizer(out_dir: str | Path):
    """Save a character-level ``PreTrainedTokenizerFast`` (built with the tokenizers library) to out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(TINY_CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def write_tiny_fixture(out_dir: str | Path, n_examples: int = 64, answer_of=lambda i: 7,
                       init_range: float = 0.3) -> dict[str, str]:
    """Write a tiny random Llama, its tokenizer and a GSM8K-schema jsonl under out_dir.

    ``answer_of(i)`` sets example i's answer (a constant by default, which a tiny model learns in a
    few dozen steps: enough to see generation and answer extraction work end to end). ``init_range``
    is the weights' init std; the usual 0.02 leaves a 32-wide random model so close to uniform that
    LoRA needs hundreds of steps to move it, while 0.3 gives it features LoRA can steer in ~50.
    Returns the paths: ``{"model": ..., "dataset": ...}``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    model_dir = out / "tiny-llama"
    tokenizer = write_char_tokenizer(model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                         initializer_range=init_range)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    rows = []
    for i in range(n_examples):
        a, b = i % 9 + 1, (i * 7) % 9 + 1
        answer = answer_of(i)
        rows.append({"question": f"Tom has {a} apples and gets {b} more. How many?",
                     "answer": f"He has {a}+{b} apples.\n{FINAL_MARK} {answer}"})
    data_path = out / "tiny_gsm8k.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model_dir), "dataset": str(data_path)}


if __name__ == "__main__":
    import sys

    from dopr.cli import parse_script_args

    @dataclass
    class TinyFixtureArgs:
        tiny_fixture: str  # the folder to write to

    args = parse_script_args(sys.argv[1:], TinyFixtureArgs, __doc__)
    paths = write_tiny_fixture(args.tiny_fixture)
    print(f"task.model={paths['model']} task.dataset={paths['dataset']}")
