"""Tests of the language-model tasks: lm_arith (small GPT on arithmetic) and llm_sft (LoRA SFT).

Everything runs offline: the SFT tests build a tiny random Llama and a character-level tokenizer in
a temp dir and run the real code path on a GSM8K-schema jsonl.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from dopr.data import arith, sft
from dopr.data.arith import ArithmeticProblems, CharTokenizer, Problem, encode_problems
from dopr.models.gpt import GPT, generate
from dopr.tasks.lm_arith import LMArithTask

torch.set_num_threads(1)


# --- arithmetic data ------------------------------------------------------------------------------

def metrics_before_and_after_training(task, model, opt, steps):
    """validate()+evaluate() metrics of ``model`` before and after ``steps`` plain training steps."""
    model.eval()
    before = {**task.validate(model), **task.evaluate(model)}
    batches = task.train_batches()
    model.train()
    for _ in range(steps):
        loss = task.loss(model, next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = {**task.validate(model), **task.evaluate(model)}
    return before, after

def test_scratchpads_of_known_problems():
    assert Problem("add", 345, 678, 3).prompt == "345+678="
    assert Problem("add", 345, 678, 3).completion == "5+8+0=13;4+7+1=12;3+6+1=10;>1023$"
    assert Problem("mul", 345, 7, 3).completion == "5*7+0=35;4*7+3=31;3*7+3=24;>2415$"
    assert Problem("mul", 12, 34, 2).completion == (
        "2*4+0=8;1*4+0=4;=48,2*3+0=6;1*3+0=3;=360,:8+0+0=8;4+6+0=10;0+3+1=4;>408$")
    assert Problem("add", 0, 0, 1).completion == "0+0+0=0;>0$"


def test_sampled_problems_are_correct_and_fit():
    gen = ArithmeticProblems(("add", "mul"), 1, 4, mul_multiplier_digits=2)
    rng = random.Random(0)
    tokenizer = CharTokenizer()
    for _ in range(300):
        p = gen.sample(rng)
        assert len(str(p.a)) == p.length and gen.min_digits <= p.length <= gen.max_digits
        expected = p.a + p.b if p.op == "add" else p.a * p.b
        assert arith.extract_answer(p.completion) == str(expected)
        assert 1 + len(p.prompt) + len(p.completion) <= gen.max_sequence_length()
        assert tokenizer.decode(tokenizer.encode(p.prompt + p.completion)) == p.prompt + p.completion


def test_arith_answer_extraction():
    assert arith.extract_answer("5+8+0=13;>1023$") == "1023"
    assert arith.extract_answer(">12$>99$") == "12"  # nothing after the first EOS counts
    assert arith.extract_answer("5+8+0=13;1023$") is None  # no answer mark
    assert arith.extract_answer("5+8+0=13;>$") is None
    assert arith.extract_answer("5+8+0=13;>10+3$") is None
    assert arith.extract_answer("3>5>7") == "7"  # unterminated: the last mark wins


def test_bad_arith_inputs_are_named():
    with pytest.raises(ValueError, match="operations"):
        ArithmeticProblems(("div",))
    with pytest.raises(ValueError, match="min_digits"):
        ArithmeticProblems(("add",), 3, 2)
    with pytest.raises(ValueError, match="not in the tokenizer alphabet"):
        CharTokenizer().encode("1-2")


def test_completion_mask_covers_exactly_the_completion():
    tok = CharTokenizer()
    p = Problem("add", 12, 34, 2)
    ids, mask = encode_problems([p], tok, 40)
    row = tok.decode(ids[0][mask[0]])
    assert row == p.completion
    assert tok.decode(ids[0][: 1 + len(p.prompt)]) == "^" + p.prompt


# --- the GPT and generation -----------------------------------------------------------------------
def test_gpt_is_causal_and_all_matrices_are_linear():
    torch.manual_seed(0)
    model = GPT(vocab_size=20, max_seq_len=16, n_layers=2, d_model=32, n_heads=4).eval()
    ids = torch.randint(0, 20, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 20
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])
        assert not torch.allclose(model(ids)[:, 6:], model(changed)[:, 6:])
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 1  # qkv, proj, mlp in, mlp out per block; the head


class OracleLM(nn.Module):
    """Predicts the reference completion of known prompts with certainty (a stand-in for a perfect
    model), optionally writing one wrong final-answer digit."""

    def __init__(self, problems, tokenizer: CharTokenizer, wrong_last_digit: bool = False):
        super().__init__()
        self.tokenizer = tokenizer
        self.texts = {}
        for p in problems:
            completion = p.completion
            if wrong_last_digit:
                d = completion[-2]
                completion = completion[:-2] + str((int(d) + 1) % 10) + "$"
            self.texts["^" + p.prompt] = completion

    def forward(self, ids):
        logits = torch.full((*ids.shape, self.tokenizer.vocab_size), -30.0)
        for i, row in enumerate(ids.tolist()):
            text = self.tokenizer.decode(row)
            for t in range(len(row)):
                prefix = text[: t + 1]
                prompt = prefix[: prefix.index("=") + 1] if "=" in prefix else None
                if prompt in self.texts:
                    done = len(prefix) - len(prompt)
                    target = (self.texts[prompt] + "$")[done] if done < len(self.texts[prompt]) else "$"
                    logits[i, t, self.tokenizer.stoi[target]] = 30.0
        return logits


def small_task(**overrides):
    kwargs = dict(seed=0, max_digits=3, val_episodes=24, eval_episodes_per_length=8, d_model=32, n_layers=1,
                  batch_size=16, sample_temperature=1.0)
    kwargs.update(overrides)
    return LMArithTask(**kwargs)


def test_evaluation_of_a_perfect_and_of_a_nearly_perfect_model():
    task = small_task()
    perfect = OracleLM(task.test_problems + task.val_problems, task.tokenizer)
    metrics = task.evaluate(perfect)
    assert metrics["test/exact_match"] == 1.0 and metrics["test/exact_match_whole_sequence"] == 1.0
    assert all(metrics[f"test/exact_match_len{n}"] == 1.0 for n in (1, 2, 3))
    assert metrics["test/exact_match_sampled"] == 1.0  # a certain model samples what it would pick
    assert task.validate(perfect)["val/loss"] < 1e-6
    # every scratchpad step right, the last answer digit wrong: exact match is 0, not "almost 1"
    wrong = OracleLM(task.test_problems, task.tokenizer, wrong_last_digit=True)
    metrics = task.evaluate(wrong)
    assert metrics["test/exact_match"] == 0.0 and metrics["test/exact_match_whole_sequence"] == 0.0


def test_scoring_counts_per_length():
    task = small_task()
    problems = [Problem("add", 1, 2, 1), Problem("add", 3, 4, 1), Problem("add", 12, 34, 2)]
    completions = [problems[0].completion, "0+0+0=0;>8$", "2+4+0=6;1+3+0=4;>46$"]  # right, wrong, right
    metrics = task.score(problems, completions, "exact_match")
    assert metrics["test/exact_match"] == pytest.approx(2 / 3)
    assert metrics["test/exact_match_len1"] == 0.5 and metrics["test/exact_match_len2"] == 1.0
    assert metrics["test/exact_match_whole_sequence"] == pytest.approx(2 / 3)


def test_test_lengths_score_only_the_chosen_lengths():
    task = small_task(test_lengths=[3, 2])
    assert sorted({p.length for p in task.test_problems}) == [2, 3] and len(task.test_problems) == 16
    metrics = task.evaluate(OracleLM(task.test_problems + task.val_problems, task.tokenizer))
    assert metrics["test/exact_match"] == 1.0
    assert "test/exact_match_len1" not in metrics and metrics["test/exact_match_len3"] == 1.0
    for bad in ([4], [], [0, 2]):
        with pytest.raises(ValueError, match="task.test_lengths"):
            small_task(test_lengths=bad)


def _decoded_prompts(task, ids):
    texts = [task.tokenizer.decode(row[1:]) for row in ids.tolist()]  # after BOS
    return [text[: text.index("=") + 1] for text in texts]


def test_a_finite_training_set_is_one_dataset_seen_in_shuffled_epochs():
    pool = small_task(train_episodes=48)
    assert len(pool.train_problems) == 48
    assert [p.prompt for p in small_task(seed=5, train_episodes=48).train_problems] == \
        [p.prompt for p in pool.train_problems]  # the same set for every seed
    assert not {p.prompt for p in pool.train_problems} & pool._held_out
    prompts = [p.prompt for p in pool.train_problems]
    batches = pool.train_batches()
    for _ in range(2):  # 48 problems, batches of 16: each epoch is three batches holding the set once
        epoch = [prompt for _ in range(3) for prompt in _decoded_prompts(pool, next(batches)[0])]
        assert sorted(epoch) == sorted(prompts)
    other = small_task(seed=1, train_episodes=48).train_batches()
    assert _decoded_prompts(pool, next(pool.train_batches())[0]) != _decoded_prompts(pool, next(other)[0])
    perfect = OracleLM(pool.train_problems + pool.val_problems, pool.tokenizer)
    metrics = pool.validate(perfect)
    assert metrics["val/train_set_loss"] < 1e-6 and metrics["val/loss"] < 1e-6
    assert "val/train_set_loss" not in small_task().validate(perfect)  # the unlimited stream has no train set
    with pytest.raises(ValueError, match="train_episodes"):
        small_task(train_episodes=0)


def test_greedy_generation_follows_argmax_and_stops_at_eos():
    torch.manual_seed(1)
    model = GPT(vocab_size=12, max_seq_len=20, n_layers=1, d_model=16, n_heads=2).eval()
    prompt = torch.randint(0, 12, (3, 4))
    out = generate(model, prompt, 6, eos_id=99)  # an eos that never comes: 6 new tokens
    ids = prompt
    for t in range(6):
        nxt = model(ids)[:, -1].argmax(-1)
        assert torch.equal(out[:, t], nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
    eos = int(out[0, 2])
    out = generate(model, prompt, 6, eos_id=eos)
    first = (out[0] == eos).nonzero()[0, 0]
    assert (out[0, first:] == eos).all()  # rows that finished keep emitting eos
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 2, eos_id=0, temperature=-1)


def test_lm_arith_learns_one_digit_addition():
    task = small_task(min_digits=1, max_digits=1, d_model=48, n_layers=2, batch_size=32, eval_episodes_per_length=40)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before, after = metrics_before_and_after_training(task, model, opt, steps=250)
    assert before["test/exact_match"] < 0.2
    assert after["val/loss"] < 0.5 * before["val/loss"]
    assert after["test/exact_match"] > 0.5, after


def test_ap_preconditions_every_gpt_matrix():
    from dopr.optim import build_optimizer

    task = small_task()
    model = task.build_model()
    opt = build_optimizer(model, "dopr_adamw", lr=1e-3)
    hooked = {layer.name for layer in opt.preconditioner.layers}
    assert hooked == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# --- SFT data: schemas and answer extraction ------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234 apples", "1234"),
    ("so $18 in total.\n#### $18.00", "18"),
    ("#### -3", "-3"),
    ("Thus the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{12} then \\boxed{\\text{40}}", "40"),
    ("The answer is 42.", "42"),
    ("First 3, then 0.50", "0.5"),
    ("no number here", None),
    ("#### 5\n#### 6", "5"),
])
def test_sft_answer_extraction(text, expected):
    assert sft.extract_answer(text) == expected


def test_answers_match_numerically():
    assert sft.answers_match("0.5", "0.50") and sft.answers_match("18", "18")
    assert not sft.answers_match("17", "18") and not sft.answers_match(None, "18")
    assert sft.answers_match("\\frac{1}{2}", "\\frac{1}{2}")


def test_schemas_become_prompt_completion_answer():
    gsm = sft.to_example({"question": "1+1?", "answer": "1+1=2\n#### 2"}, "gsm8k")
    assert gsm.prompt == "Question: 1+1?\nAnswer: " and gsm.completion.endswith("#### 2") and gsm.answer == "2"
    omi = sft.to_example({"problem": "Half of 1?", "generated_solution": "It is $\\boxed{0.5}$.",
                          "expected_answer": "0.5"}, "openmathinstruct2")
    assert omi.completion.endswith("\\boxed{0.5}$.\n#### 0.5") and omi.answer == "0.5"
    assert sft.extract_answer(omi.completion) == "0.5"
    assert sft.detect_schema(["problem", "generated_solution", "expected_answer", "extra"]) == "openmathinstruct2"
    with pytest.raises(ValueError, match="match no known schema"):
        sft.detect_schema(["prompt", "response"])


# --- LoRA SFT end to end, offline -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_fixture(tmp_path_factory):
    return sft.write_tiny_fixture(tmp_path_factory.mktemp("sft"))


def sft_task(tiny_fixture, **overrides):
    from dopr.tasks.llm_sft import LLMSFTTask

    kwargs = dict(model=tiny_fixture["model"], dataset=tiny_fixture["dataset"], eval_dataset=None, val_episodes=8,
                  eval_episodes=8, batch_size=8, max_seq_len=128, max_new_tokens=40, lora_r=8)
    kwargs.update(overrides)
    return LLMSFTTask(**kwargs)


def test_lora_sft_end_to_end_offline(tiny_fixture):
    from dopr.optim import build_optimizer

    task = sft_task(tiny_fixture)
    model = task.build_model()
    opt = build_optimizer(model, "dopr_adamw", lr=1e-2)
    # AP sees exactly the adapters: every lora_A and lora_B, none of the frozen base weights
    hooked = {layer.name for layer in opt.preconditioner.layers}
    adapters = {n for n, p in model.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))}
    assert hooked == adapters and len(adapters) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    before, after = metrics_before_and_after_training(task, model, opt, steps=60)
    texts = task.generate(model, [e.prompt for e in task.test_examples])
    assert before["test/accuracy"] == 0.0
    assert after["val/loss"] < 0.5 * before["val/loss"]
    assert after["test/accuracy"] >= 0.75, (after, texts)
    assert sum("#### 7" in t for t in texts) >= 6, texts


def test_ap_on_lora_uses_layer_input_for_A_and_A_output_for_B(tiny_fixture):
    """The AP gradient of lora_A is G_A P(x) with x the adapted layer's input, and that of lora_B is
    G_B P(A x): checked against the dense formula on one projection."""
    from dopr.optim import ActivationPreconditioner, APConfig, damped_inverse

    task = sft_task(tiny_fixture)
    model = task.build_model()
    with torch.no_grad():  # lora_B starts at zero, which would make A's gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ap = ActivationPreconditioner(model, APConfig(damping=1e-2))
    layer = dict(model.named_modules())["base_model.model.model.layers.1.mlp.down_proj"]
    seen = {}
    layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    layer.lora_A["default"].register_forward_hook(lambda m, args, out: seen.__setitem__("ax", out.detach()))
    model.train()
    task.loss(model, next(task.train_batches())).backward()
    grads = {k: getattr(layer, k)["default"].weight.grad.clone() for k in ("lora_A", "lora_B")}
    ap.step()
    for key, z in (("lora_A", seen["x"]), ("lora_B", seen["ax"])):
        z = z.reshape(-1, z.shape[-1]).double()
        P = damped_inverse((z.T @ z / z.shape[0])[None], 1e-2)[0]
        expected = (grads[key].double() @ P).float()
        torch.testing.assert_close(getattr(layer, key)["default"].weight.grad, expected, rtol=1e-3, atol=1e-6)


def test_missing_model_or_dataset_says_how_to_fetch(tiny_fixture, tmp_path):
    from dopr.tasks.llm_sft import LLMSFTTask

    with pytest.raises(FileNotFoundError, match="does not exist"):
        sft_task(tiny_fixture, dataset=str(tmp_path / "missing.jsonl"))
    empty_model_dir = tmp_path / "not-a-model"
    empty_model_dir.mkdir()
    with pytest.raises(RuntimeError, match="hf download"):
        LLMSFTTask(model=str(empty_model_dir), dataset=tiny_fixture["dataset"], eval_dataset=None,
                   val_episodes=2, eval_episodes=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    with pytest.raises(ValueError, match="match no known schema"):
        sft_task(tiny_fixture, dataset=str(bad))


# --- configs ----------------------------------------------------------------------------------------
def test_task_configs_compose_and_build(tiny_fixture):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from pathlib import Path

    config_dir = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose("config", overrides=["task=lm_arith", "task.eval_episodes_per_length=2", "task.val_episodes=4"])
        task = instantiate(cfg.task, _convert_="all")
        assert isinstance(task, LMArithTask) and task.seq_len == task.problems.max_sequence_length()
        cfg = compose("config", overrides=["task=llm_sft", f"task.model={tiny_fixture['model']}",
                                           f"task.dataset={tiny_fixture['dataset']}", "task.eval_dataset=null",
                                           "task.val_episodes=4", "task.eval_episodes=4", "task.max_seq_len=128"])
        task = instantiate(cfg.task, _convert_="all")
        assert len(task.test_examples) == 4 and len(task.train_examples) == 64 - 8
