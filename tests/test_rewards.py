"""Built-in reward functions (apr_kernels.rewards): answers found as GSM8K and boxed-answer tasks write
them and compared by value, TRL's think format, chat completions, records without an answer, and
grpo taking them by module path."""

import json

import pytest

from apr_kernels.rewards import exact_match, final_answer, think_format


@pytest.mark.parametrize("text,want", [
    ("so the total is 18 eggs.", "18"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("The answer is \\boxed{\\frac{1}{2}} and not 3", "\\frac{1}{2}"),
    ("first \\boxed{2} then \\boxed{3}", "3"),
    ("no number here", "no number here"),
    ("", None),
    ("#### ", None),
])
def test_final_answer(text, want):
    assert final_answer(text) == want


def test_exact_match_compares_by_value_and_skips_records_without_an_answer():
    completions = ["I think it is 1,000.", "\\boxed{1000}", "the result: $999", "#### 1000.0",
                   [{"role": "assistant", "content": "It is 1000"}], "anything"]
    gsm8k = "Weng earns 12/60 = $0.2 per minute.\n#### 1000"
    got = exact_match(prompts=[""] * 6, completions=completions, answer=["1000", "1000", "1000", gsm8k, "1000", None])
    assert got == [1.0, 1.0, 0.0, 1.0, 1.0, None]
    assert exact_match(completions=["Paris."], answer=["paris"]) == [1.0]
    assert exact_match(completions=["\\boxed{x + 1}"], answer=["\\boxed{x+1}"]) == [0.0]  # text compares as text


def test_think_format_is_trls():
    assert think_format(completions=["<think>\nstep\n</think>\n42", "42", "<think>a</think><think>b</think>x",
                                     "text <think>a</think> 42",
                                     [{"role": "assistant", "content": "<think>ok</think>done"}]]) == \
        [1.0, 0.0, 0.0, 0.0, 1.0]


def test_grpo_takes_them_by_module_path(tmp_path, capsys):
    import torch

    from apr_kernels.cli import main
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.apr", tokenizer=tok,
                    model=Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(257)), fast=False))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n"
                                              for a in range(4)))
    assert main(["grpo", "--init", str(tmp_path / "m.apr"), "--data", str(tmp_path / "p.jsonl"), "--reward",
                 "apr_kernels.rewards:exact_match", "apr_kernels.rewards:think_format", "--steps", "1",
                 "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4", "--max-prompt-len", "16",
                 "--json", "--out", str(tmp_path / "o")]) == 0
    rec = next(json.loads(x) for x in capsys.readouterr().out.splitlines() if '"event": "train"' in x)
    assert "reward_exact_match" in rec and "reward_think_format" in rec
