"""Procedurally generated, verifiable arithmetic problems with a scratchpad, and a character tokenizer.

A problem is a prompt and a completion. The completion is a chain of thought (the scratchpad) that
works digit by digit from the least significant end, then ``>`` and the final answer, then ``$``::

    prompt      345+678=
    completion  5+8+0=13;4+7+1=12;3+6+1=10;>1023$

    prompt      345*7=
    completion  5*7+0=35;4*7+3=31;3*7+3=24;>2415$

Multiplication by a multi-digit number multiplies by one digit at a time (each with its own carry
steps, ending in ``=P,`` where P is that partial product), then adds the shifted partial products
with the same carry steps as addition (each sum introduced by ``:``).

The number of digits of the first operand is the length knob: the completion grows linearly with it
and so does the number of steps the model must get right in a row, which is where a small one-step
(teacher-forced) error turns into a large whole-sequence (test-time) error.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

PAD, BOS, EOS = "_", "^", "$"
ANSWER_MARK = ">"
ALPHABET = PAD + BOS + EOS + "0123456789+*=;:,>"
OPERATIONS = ("add", "mul")


class CharTokenizer:
    """One token per character of a fixed alphabet; PAD is id 0."""

    def __init__(self, alphabet: str = ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self.stoi = {ch: i for i, ch in enumerate(alphabet)}
        self.pad_id, self.bos_id, self.eos_id = (self.stoi[c] for c in (PAD, BOS, EOS))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the tokenizer alphabet {self.alphabet!r}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)


def _digits_lsb_first(x: int) -> list[int]:
    return [int(ch) for ch in reversed(str(x))]


def addition_steps(a: int, b: int) -> str:
    """Carry steps ``a_i+b_i+c=s;`` from the least significant digit; the shorter number is zero-padded."""
    da, db = _digits_lsb_first(a), _digits_lsb_first(b)
    n = max(len(da), len(db))
    da, db = da + [0] * (n - len(da)), db + [0] * (n - len(db))
    carry, steps = 0, []
    for x, y in zip(da, db):
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s};")
        carry = s // 10
    return "".join(steps)


def single_digit_product_steps(a: int, d: int) -> str:
    """Carry steps ``a_i*d+c=p;`` for a times one digit d."""
    carry, steps = 0, []
    for x in _digits_lsb_first(a):
        p = x * d + carry
        steps.append(f"{x}*{d}+{carry}={p};")
        carry = p // 10
    return "".join(steps)


def scratchpad(op: str, a: int, b: int) -> str:
    """The chain of thought for ``a op b`` (without the final answer)."""
    if op == "add":
        return addition_steps(a, b)
    if op == "mul":
        b_digits = _digits_lsb_first(b)
        if len(b_digits) == 1:
            return single_digit_product_steps(a, b)
        parts = []
        for shift, d in enumerate(b_digits):
            parts.append(f"{single_digit_product_steps(a, d)}={a * d * 10 ** shift},")
        total = a * b_digits[0]
        for shift, d in enumerate(b_digits[1:], start=1):
            partial = a * d * 10**shift
            parts.append(f":{addition_steps(total, partial)}")
            total += partial
        return "".join(parts)
    raise ValueError(f"unknown operation {op!r}; choose one of {OPERATIONS}")


@dataclass(frozen=True)
class Problem:
    op: str
    a: int
    b: int
    length: int  # digits of the first operand: the length knob

    @property
    def prompt(self) -> str:
        return f"{self.a}{'+' if self.op == 'add' else '*'}{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b if self.op == "add" else self.a * self.b)

    @property
    def completion(self) -> str:
        return f"{scratchpad(self.op, self.a, self.b)}{ANSWER_MARK}{self.answer}{EOS}"


def extract_answer(completion: str) -> str | None:
    """The final answer of a generated completion: the digits after the last ``>`` up to ``$``.

    None when the model never wrote an answer mark, or wrote no digits after it.
    """
    text = completion.split(EOS, 1)[0]
    if ANSWER_MARK not in text:
        return None
    answer = text.rsplit(ANSWER_MARK, 1)[1]
    return answer if answer.isdigit() else None


def _random_number(rng: random.Random, digits: int) -> int:
    if digits < 1:
        raise ValueError(f"a number needs at least 1 digit, got {digits}")
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


class ArithmeticProblems:
    """Sampler of problems. ``min_digits..max_digits`` is the length of the first operand (uniform);
    for addition the second operand has the same number of digits, for multiplication it has
    ``mul_multiplier_digits`` digits."""

    def __init__(self, operations=("add",), min_digits: int = 1, max_digits: int = 4,
                 mul_multiplier_digits: int = 1):
        operations = tuple(operations)
        bad = [op for op in operations if op not in OPERATIONS]
        if not operations or bad:
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {operations}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if mul_multiplier_digits < 1:
            raise ValueError(f"mul_multiplier_digits must be >= 1, got {mul_multiplier_digits}")
        self.operations = operations
        self.min_digits, self.max_digits = int(min_digits), int(max_digits)
        self.mul_multiplier_digits = int(mul_multiplier_digits)

    @property
    def lengths(self) -> range:
        return range(self.min_digits, self.max_digits + 1)

    def sample(self, rng: random.Random, length: int | None = None) -> Problem:
        op = rng.choice(self.operations)
        n = rng.randint(self.min_digits, self.max_digits) if length is None else int(length)
        a = _random_number(rng, n)
        b = _random_number(rng, n if op == "add" else self.mul_multiplier_digits)
        return Problem(op, a, b, n)

    def max_sequence_length(self) -> int:
        """Longest BOS + prompt + completion over the configured range (all-nines operands are longest)."""
        longest = 0
        for op in self.operations:
            a = 10**self.max_digits - 1
            b = a if op == "add" else 10**self.mul_multiplier_digits - 1
            p = Problem(op, a, b, self.max_digits)
            longest = max(longest, 1 + len(p.prompt) + len(p.completion))
        return longest


def encode_problems(problems: list[Problem], tokenizer: CharTokenizer, seq_len: int):
    """Token ids and a completion mask, right-padded to ``seq_len``.

    Returns ``(ids, completion_mask)``, both (n, seq_len); ``completion_mask[i, t]`` is True when
    token t of row i belongs to the completion (scratchpad, answer and EOS), i.e. when predicting it
    from the tokens before it is part of the answer loss.
    """
    ids = torch.full((len(problems), seq_len), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(problems), seq_len), dtype=torch.bool)
    for i, p in enumerate(problems):
        prompt = [tokenizer.bos_id] + tokenizer.encode(p.prompt)
        completion = tokenizer.encode(p.completion)
        row = prompt + completion
        if len(row) > seq_len:
            raise ValueError(f"problem {p.prompt} needs {len(row)} tokens, more than seq_len={seq_len}")
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, len(prompt) : len(row)] = True
    return ids, mask
