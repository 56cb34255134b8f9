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
