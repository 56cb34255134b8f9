"""Generation (model/generate.py): the key/value cache against transformers' own greedy generate on
the same weights, the cache against recomputing the whole sequence, and the sampling filters."""

import pytest
import torch

from apr_kernels.model.generate import generate, sample
from test_model import LLAMA, QWEN, hf_model, ours_from_hf


@pytest.mark.parametrize("cfg", [QWEN, LLAMA], ids=["qwen2-gqa7-bias", "llama-gqa3"])
def test_greedy_generation_equals_transformers_generate(cfg):
    hf = hf_model(cfg)
    ours = ours_from_hf(hf, cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0,
                       use_cache=True)
    got = generate(ours, prompt, 12)
    assert got.shape == (2, 21)
    assert torch.equal(got, want)


def test_cache_equals_recomputing_the_whole_sequence():
    cfg = LLAMA
    model = ours_from_hf(hf_model(cfg), cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    got = generate(model, ids, 10)
    for _ in range(10):  # no cache: the full forward, last position, argmax
        with torch.no_grad():
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ids)


@pytest.mark.parametrize("window", [None, 4], ids=["causal", "sliding-window"])
def test_blocks_appended_to_a_cache_equal_the_whole_sequence(window):
    """next_logits with several new tokens after cached ones (a continued conversation): the block is
    causal over the cache and itself, as the whole-sequence forward (the transformers oracle's logits)."""
    from apr_kernels.model.generate import KVCache, next_logits
    from apr_kernels.model.rope import rope_tables

    cfg = QWEN.replace(sliding_window=window)
    hf = hf_model(QWEN)
    model = ours_from_hf(hf, QWEN)
    model.config = cfg
    for layer in model.model.layers:
        layer.self_attn.window = cfg.layer_window(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(5))
    cos, sin = rope_tables(14, cfg.head_dim, cfg.rope_theta)
    cache = KVCache(model, 2, 14, "cpu", torch.float32)
    got = [next_logits(model, ids[:, a:b], cache, cos, sin) for a, b in ((0, 5), (5, 6), (6, 11), (11, 14))]
    with torch.no_grad():
        want = model(ids).float()
    for (a, b), g in zip(((0, 5), (5, 6), (6, 11), (11, 14)), got):
        torch.testing.assert_close(g, want[:, b - 1], rtol=1e-4, atol=1e-4, msg=f"after tokens {a}:{b}")
    if window is None:  # and the model's whole-sequence logits are transformers'
        with torch.no_grad():
            torch.testing.assert_close(want, hf(ids).logits.float(), rtol=1e-4, atol=1e-4)


def test_eos_stops_and_finished_rows_repeat_it():
    cfg = QWEN
    model = ours_from_hf(hf_model(cfg), cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    free = generate(model, prompt, 8)
    eos = int(free[0, 6])  # row 0's third new token becomes the end-of-text id
    got = generate(model, prompt, 8, eos_id=eos)
    row0 = got[0, 4:].tolist()
    assert row0[:3] == free[0, 4:7].tolist() and all(t == eos for t in row0[2:])
    first1 = next((i for i, t in enumerate(free[1, 4:].tolist()) if t == eos), None)
    if first1 is None:  # row 1 never produces it: it runs to max_new_tokens
        assert got.shape[1] == 12 and torch.equal(got[1], free[1])


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    assert sample(logits).tolist() == [3, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, temperature=1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {2, 3} and set(draws[:, 1].tolist()) == {0, 1}
    # top_p 0.5: the first token holds 0.64 of the mass (softmax of 0..3), so only it remains
    draws = torch.stack([sample(logits, temperature=1.0, top_p=0.5, generator=g) for _ in range(50)])
    assert set(draws[:, 0].tolist()) == {3} and set(draws[:, 1].tolist()) == {0}
    # top_p 0.9: 0.64 + 0.24 = 0.88 < 0.9, so a third token stays
    draws = torch.stack([sample(logits, temperature=1.0, top_p=0.9, generator=g) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {1, 2, 3}


def test_generate_refuses_bad_requests():
    cfg = LLAMA.replace(max_position_embeddings=16)
    model = ours_from_hf(hf_model(cfg), cfg)
    with pytest.raises(ValueError, match=r"prompt \(10\) \+ max_new_tokens \(7\) = 17 positions exceed "
                                         r"max_position_embeddings=16"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\] with T >= 1"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)


def test_vocab_size_keeps_generation_inside_the_tokenizer():
    cfg = QWEN
    model = ours_from_hf(hf_model(cfg), cfg)
    prompt = torch.randint(0, cfg.vocab_size, (3, 4), generator=torch.Generator().manual_seed(1))
    free = generate(model, prompt, 10)
    assert (free[:, 4:] >= 10).any()  # without the limit the model picks ids past 10
    for temperature in (0.0, 1.0):
        got = generate(model, prompt, 10, temperature=temperature, vocab_size=10,
                       generator=torch.Generator().manual_seed(0))
        assert (got[:, 4:] < 10).all()


def test_any_of_several_stop_ids_ends_a_row():
    cfg = QWEN
    model = ours_from_hf(hf_model(cfg), cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    free = generate(model, prompt, 10)[0, 4:].tolist()
    a, b = free[5], free[3]  # b comes first: generation stops there, whatever a is
    got = generate(model, prompt, 10, eos_id={a, b})[0, 4:].tolist()
    first = min(i for i, t in enumerate(free) if t in (a, b))
    assert got == free[:first + 1]


@pytest.mark.parametrize("cfg", [QWEN, LLAMA, LLAMA.replace(sliding_window=4)],
                         ids=["qwen2-gqa7-bias", "llama-gqa3", "sliding-window-4"])
def test_left_padded_batch_equals_each_prompt_alone(cfg):
    """generate_batch on prompts of 3..11 tokens (left-padded together): each row's greedy completion
    is the one ``generate`` gives the prompt alone (itself equal to transformers'), cut after its first
    stop id; with a sliding window shorter than the prompts too."""
    from apr_kernels.model.generate import generate_batch

    from apr_kernels.model import Transformer

    plain = cfg.replace(sliding_window=None)
    model = Transformer(cfg, fast=False).eval()  # (the window changes no weight)
    model.load_state_dict(ours_from_hf(hf_model(plain), plain).state_dict())
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (7, 3, 11, 5)]
    alone = [generate(model, torch.tensor([p]), 10)[0, len(p):].tolist() for p in prompts]
    stop = alone[1][4]  # row 1's fifth token ends it (and any other row that produces it)
    got = generate_batch(model, prompts, 10, stops={stop})
    for row, want in zip(got, alone):
        cut = next((i for i, t in enumerate(want) if t == stop), None)
        assert row == (want if cut is None else want[: cut + 1])
    assert len(got[1]) <= 5


def test_each_group_of_a_batch_samples_as_it_would_alone():
    """Per-group generators: a group's samples do not depend on what else is in the batch."""
    from apr_kernels.model.generate import generate_batch

    model = ours_from_hf(hf_model(QWEN), QWEN)
    a, b = [5, 9, 2], [7, 1, 4, 4, 8, 3]
    kw = {"temperature": 1.0, "top_k": 20}
    together = generate_batch(model, [a] * 3 + [b] * 2, 8, generators=[(3, torch.Generator().manual_seed(1)),
                                                                        (2, torch.Generator().manual_seed(2))], **kw)
    first = generate_batch(model, [a] * 3, 8, generators=[(3, torch.Generator().manual_seed(1))], **kw)
    second = generate_batch(model, [b] * 2, 8, generators=[(2, torch.Generator().manual_seed(2))], **kw)
    assert together == first + second
    alone = generate(model, torch.tensor([a] * 3), 8, generator=torch.Generator().manual_seed(1), **kw)
    assert together[:3] == alone[:, 3:].tolist()
    assert len({tuple(r) for r in together[:3]}) > 1  # the rows of a group differ


def test_stop_ids_per_row():
    from apr_kernels.model.generate import generate_batch

    model = ours_from_hf(hf_model(QWEN), QWEN)
    prompts = [[5, 9, 2], [7, 1, 4, 4]]
    free = generate_batch(model, prompts, 8)
    x, y = free[0][2], free[1][5]
    got = generate_batch(model, prompts, 8, stops=[{x}, {y}])
    assert got[0] == free[0][: free[0].index(x) + 1] and got[1] == free[1][: free[1].index(y) + 1]
    with pytest.raises(ValueError, match="generators cover 3 rows; expected 2"):
        generate_batch(model, prompts, 8, generators=[(3, None)])


def test_cli_generates_for_a_file_of_prompts(tmp_path, capsys):
    """generate --prompts: greedy completions of a file's prompts equal each --prompt run alone; sampled
    ones do not depend on the batch size; chat prompts get assistant messages; fields are kept."""
    import json

    from apr_kernels.cli import main
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.tokenizer import Tokenizer
    from apr_kernels.train.checkpoint import save_checkpoint

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)},
                               {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}, eos_id=256)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.apr", tokenizer=tok,
                    model=Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(259)), fast=False))
    texts = ["def f(x):", "Hello", "import os\n"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)) +
                       json.dumps({"prompt": [{"role": "user", "content": "hi"}], "id": 3}) + "\n")
    common = ["generate", "--init", str(tmp_path / "m.apr"), "--max-new-tokens", "12"]
    assert main([*common, "--prompts", str(prompts), "--temperature", "0", "--batch-size", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in lines] == [0, 1, 2, 3] and all(r["sample"] == 0 for r in lines)
    for t, r in zip(texts, lines):
        assert main([*common, "--prompt", t, "--temperature", "0", "--json"]) == 0
        alone = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert r["prompt"] == t and r["completion"] == alone["completion"]
    assert lines[3]["completion"][0]["role"] == "assistant" and isinstance(lines[3]["completion"][0]["content"], str)
    sampled = {}
    for batch in ("1", "4"):
        out = tmp_path / f"s{batch}.jsonl"
        assert main([*common, "--prompts", str(prompts), "--num-return-sequences", "2", "--temperature", "1.0",
                     "--seed", "3", "--batch-size", batch, "--output", str(out)]) == 0
        sampled[batch] = [json.loads(x) for x in out.read_text().splitlines()]
    assert sampled["1"] == sampled["4"] and len(sampled["1"]) == 8
    assert [r["sample"] for r in sampled["1"][:2]] == [0, 1]


def test_cli_scores_completions_and_keeps_the_best_or_pairs(tmp_path, capsys):
    """generate --prompts --reward: each completion carries the weighted sum of the functions' scores
    (a reward function here, written to count letters); --keep best writes each prompt's highest-scoring
    completion of those --keep all wrote, --keep pairs its best and worst as a dpo record (none for a
    prompt whose completions all score alike), and dpo reads them."""
    import json

    from apr_kernels.cli import main
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import byte_tokenizer
    from apr_kernels.train.preference import read_pairs

    tok = byte_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.apr", tokenizer=tok,
                    model=Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(257)), fast=False))
    (tmp_path / "r.py").write_text(
        "def letters(prompts, completions, **kw):\n"
        "    return [float(sum(c.isalpha() for c in t)) for t in completions]\n"
        "def flat(prompts, completions, tag, **kw):\n"
        "    return [0.0 if g == 'same' else None for g in tag]\n"
        "def const(prompts, completions, **kw):\n"
        "    return [1.0] * len(completions)\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say:", "tag": "x"}) + "\n" + json.dumps({"prompt": "Go:", "tag": "same"})
                       + "\n")
    common = ["generate", "--init", str(tmp_path / "m.apr"), "--prompts", str(prompts), "--max-new-tokens", "8",
              "--num-return-sequences", "4", "--temperature", "1.0", "--top-k", "0", "--seed", "1"]
    rewards = ["--reward", f"{tmp_path / 'r.py'}:letters", f"{tmp_path / 'r.py'}:flat", "--reward-weights", "0.5", "1"]
    assert main([*common, *rewards]) == 0
    every = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(every) == 8
    for line in every:
        letters = sum(c.isalpha() for c in line["completion"])
        assert line["reward"] == 0.5 * letters and line["rewards"]["letters"] == letters
        assert line["rewards"]["flat"] == (0.0 if line["tag"] == "same" else None)
    assert main([*common, *rewards, "--keep", "best"]) == 0
    best = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    for b, group in zip(best, (every[:4], every[4:])):
        top = max(group, key=lambda r: (r["reward"], -r["sample"]))
        assert b == top
    assert main([*common, "--reward", f"{tmp_path / 'r.py'}:letters", "--keep", "pairs",
                 "--output", str(tmp_path / "pairs.jsonl")]) == 0
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    for pair, group in zip(pairs, (every[:4], every[4:])):
        scores = [2 * r["reward"] for r in group if r["tag"] == pair["tag"]]
        assert pair["chosen_reward"] == max(scores) > pair["rejected_reward"] == min(scores)
        assert {pair["chosen"], pair["rejected"]} <= {r["completion"] for r in group}
    assert len(read_pairs([tmp_path / "pairs.jsonl"], tok, 64)) == len(pairs) >= 1
    assert main([*common, "--reward", f"{tmp_path / 'r.py'}:const", "--keep", "pairs"]) == 0  # all alike: no pair
    assert capsys.readouterr().out == ""
    assert main(["generate", "--init", str(tmp_path / "m.apr"), "--prompts", str(prompts), "--keep", "best"]) != 0
    assert "--keep best needs --reward" in capsys.readouterr().err


def test_cli_chat_keeps_the_conversation_and_resets(tmp_path, capsys, monkeypatch):
    """chat: each input line is a user turn answered with the conversation so far as the prompt (the
    first answer is `generate --chat`'s; the second is greedy decoding of the three rendered turns);
    /reset starts over; an empty line ends."""
    import io
    import json

    from apr_kernels.cli import main
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.model.generate import generate
    from apr_kernels.tokenizer import Tokenizer
    from apr_kernels.train.chat import generation_prompt
    from apr_kernels.train.checkpoint import save_checkpoint

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)},
                               {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}, eos_id=256)
    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(259)), fast=False)
    save_checkpoint(tmp_path / "m.apr", tokenizer=tok, model=model)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand then?\n/reset\nhi\n\nignored\n"))
    assert main(["chat", "--init", str(tmp_path / "m.apr"), "--temperature", "0", "--max-new-tokens", "10",
                 "--json"]) == 0
    turns = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [t["user"] for t in turns] == ["hi", "and then?", "hi"]
    assert main(["generate", "--init", str(tmp_path / "m.apr"), "--chat", "--prompt", "hi", "--temperature", "0",
                 "--max-new-tokens", "10", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])["completion"]
    assert turns[0]["assistant"] == first == turns[2]["assistant"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "and then?"}]
    text, close = generation_prompt(messages, tok)
    prompt = tok.encode(text, special=True)
    ids = generate(model.eval(), torch.tensor([prompt]), 10, eos_id={close, 256}, vocab_size=tok.vocab_size)[0].tolist()
    new = ids[len(prompt):]
    new = new[:next((i for i, t in enumerate(new) if t in (close, 256)), len(new))]
    assert turns[1]["assistant"] == tok.decode(prompt + new)[len(tok.decode(prompt)):]


def test_cli_eval_prompts_mean_reward_and_unbiased_pass_at_k(tmp_path, capsys):
    """eval --prompts --reward: the mean reward of the sampled completions, and pass@k from each prompt's
    n samples (a pass: reward >= the threshold) with Chen et al.'s unbiased estimator, the samples being
    generate --prompts' with the same seed; greedy by default."""
    import json
    import math

    from apr_kernels.cli import main
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import byte_tokenizer
    from apr_kernels.train.evaluation import pass_at_k

    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    tok = byte_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.apr", tokenizer=tok,
                    model=Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(257)), fast=False))
    (tmp_path / "r.py").write_text("def lower(prompts, completions, **kw):\n"
                                   "    return [float(sum(c.islower() for c in t) >= 1) for t in completions]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say:", "Go:", "Now:")))
    common = ["--init", str(tmp_path / "m.apr"), "--prompts", str(prompts), "--reward", f"{tmp_path / 'r.py'}:lower",
              "--max-new-tokens", "6", "--temperature", "1.0", "--top-k", "0", "--seed", "2"]
    assert main(["eval", *common, "--num-samples", "4", "--pass-k", "1", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(["generate", *common, "--num-return-sequences", "4", "--batch-size", "8"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 12 and res["prompts"] == 3 and res["samples"] == 4
    assert res["reward"] == pytest.approx(sum(x["reward"] for x in lines) / 12)
    passed = [sum(x["reward"] >= 1 for x in lines[i:i + 4]) for i in range(0, 12, 4)]
    for k in (1, 2):
        assert res[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, c, k) for c in passed) / 3)
    assert 0 < res["pass@1"] < 1  # the toy task's samples differ
    assert main(["eval", "--init", str(tmp_path / "m.apr"), "--prompts", str(prompts), "--num-samples", "3",
                 "--reward", f"{tmp_path / 'r.py'}:lower"]) == 1  # several greedy samples: refused
    assert "expected 1 greedy sample, or several sampled at a temperature > 0" in capsys.readouterr().err


def test_generate_and_chat_under_torchrun_refuse_what_they_cannot_share(tmp_path, monkeypatch, capsys):
    """Under torchrun the ranks share ``--prompts``' batches (test_distributed.py runs them); a single
    ``--prompt`` has nothing to share and ``chat`` one terminal: refused by name before any process
    group (unless the model is split over all the ranks: not over copies). ``eval --parallel fsdp``
    needs torchrun and no sampling; ``--tensor-parallel`` torchrun, and neither FSDP nor a quantised
    copy beside it."""
    from apr_kernels.cli import main

    m = str(tmp_path / "m.apr")
    # eval --parallel fsdp: the model sharded over torchrun's ranks (not for sampling)
    assert main(["eval", "--init", m, "--data", m, "--parallel", "fsdp"]) != 0
    assert "eval --parallel fsdp shards the model over torchrun's ranks; expected a torchrun launch" \
        in capsys.readouterr().err
    assert main(["eval", "--init", m, "--prompts", m, "--reward", "r.py:f", "--parallel", "fsdp"]) != 0
    assert "eval --parallel fsdp shards the model for --data, --choices and --pairs; --prompts samples with a " \
        "whole model on each rank (--parallel ddp)" in capsys.readouterr().err
    assert main(["eval", "--init", m, "--data", m, "--fsdp-shard-size", "2"]) != 0
    assert "eval --fsdp-shard-size 2 shards within groups of ranks; expected --parallel fsdp under torchrun" \
        in capsys.readouterr().err
    # --tensor-parallel: the model split over torchrun's ranks, whole on none of them
    assert main(["eval", "--init", m, "--data", m, "--tensor-parallel", "2"]) != 0
    assert "--tensor-parallel 2 splits the model over torchrun's ranks; expected a torchrun launch" \
        in capsys.readouterr().err
    assert main(["eval", "--init", m, "--data", m, "--tensor-parallel", "2", "--parallel", "fsdp"]) != 0
    assert "eval --tensor-parallel 2 with --parallel fsdp: expected one of the two" in capsys.readouterr().err
    assert main(["generate", "--init", m, "--prompts", m, "--tensor-parallel", "2", "--quantize", "q8"]) != 0
    assert "generate --tensor-parallel 2 with --quantize q8: the quantised copy is made whole on one device" \
        in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generate", "--init", str(tmp_path / "m.apr"), "--prompt", "hi"]) != 0
    assert "generate under torchrun shares a file of prompts among the ranks; give --prompts FILE.jsonl" \
        in capsys.readouterr().err
    assert main(["chat", "--init", str(tmp_path / "m.apr")]) != 0
    assert "chat is a conversation on one terminal: run it in one process, not under torchrun" \
        in capsys.readouterr().err
    # one prompt or conversation under torchrun: on one model split over every rank, not on copies
    from apr_kernels.train.distributed import DistEnv
    from apr_kernels.train.generation import whole_world
    from apr_kernels.train.tensor_parallel import TensorParallel

    whole_world(DistEnv(rank=1, world_size=2, model_split=TensorParallel(None, 1, 2)), "chat")
    with pytest.raises(ValueError, match=r"chat under torchrun: one prompt for one model; with --tensor-parallel 2 the "
                                         r"4 ranks would hold 2 copies answering it alike; expected --tensor-parallel 4"):
        whole_world(DistEnv(rank=1, world_size=4, model_split=TensorParallel(None, 1, 2)), "chat")
