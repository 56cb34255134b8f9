"""Document masking (model/documents.py): spans from end-of-text ids, and packed rows computed as if
each document were alone, against transformers' Qwen2/Llama run on each document separately."""

import pytest
import torch

from apr_kernels.model import Documents, Transformer, preset
from kernel_helpers import assert_grads_near, spy_launchers
from test_model import LLAMA, QWEN, hf_model, ours_from_hf

EOS = 3


def rows_with_documents(vocab, B=2, S=29, seed=0):
    """[B, S] ids with EOS (id 3) ending documents at fixed places (one EOS as a row's last token,
    one document of length 1) and no other 3s."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, vocab, (B, S), generator=g)
    for r, c in [(0, 6), (0, 7), (0, S - 9), (0, S - 1), (1, 11)]:
        x[r, c] = EOS
    return x


def test_spans_from_eos_by_hand():
    x = torch.tensor([[5, EOS, 7, 8, EOS], [EOS, 1, 2, 3 + 1, 4]])
    d = Documents.from_eos(x, EOS)
    # row 0: [5 EOS] [7 8 EOS]; row 1: [EOS] [1 2 4 4]: an EOS ending row 0 adds no extra span
    assert d.cu_seqlens.dtype == torch.int32
    assert d.cu_seqlens.tolist() == [0, 2, 5, 6, 10] and d.max_seqlen == 4
    d.check(2, 5)
    doc, pos = d.token_index(10)
    assert doc.tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3]
    assert pos.tolist() == [0, 1, 0, 1, 2, 0, 0, 1, 2, 3]
    plain = Documents.from_eos(torch.tensor([[1, 2, 4], [5, 6, 7]]), EOS)
    assert plain.cu_seqlens.tolist() == [0, 3, 6] and plain.max_seqlen == 3


@pytest.mark.parametrize("cu,max_seqlen,match", [
    ([0, 2, 10], 8, r"row starts missing from cu_seqlens: \[5\]"),
    ([0, 5, 9], 5, r"rise from 0 to 10 \(= 2 rows x 5 tokens\)"),
    ([0, 6, 5, 10], 5, r"without decreasing"),
    ([0, 5, 10], 4, r"max_seqlen 4 is shorter than the longest span \(5\)"),
])
def test_check_refuses_spans_that_do_not_fit_the_batch(cu, max_seqlen, match):
    with pytest.raises(ValueError, match=match):
        Documents(torch.tensor(cu, dtype=torch.int32), max_seqlen).check(2, 5)


def _per_document_reference(hf, x, d):
    """transformers' logits for each document run alone, placed at the document's packed rows."""
    flat = x.flatten()
    out = []
    bounds = d.cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        with torch.no_grad():
            out.append(hf(flat[None, a:b]).logits[0])
    return torch.cat(out).view(*x.shape, -1)


# head_dim 16: the smallest the Triton kernels take
@pytest.mark.parametrize("backend_name", ["eager", "reference", "triton"])
@pytest.mark.parametrize("cfg", [QWEN.replace(hidden_size=112), LLAMA.replace(hidden_size=96)],
                         ids=["qwen2-gqa7", "llama-gqa3"])
def test_packed_logits_equal_each_document_alone_in_transformers(use_backend, monkeypatch, cfg, backend_name):
    hf = hf_model(cfg)
    model = ours_from_hf(hf, cfg)
    model.fast = backend_name != "eager"
    if model.fast:
        use_backend(backend_name)
    calls = spy_launchers(monkeypatch, "attention", ("attention_fwd",))
    x = rows_with_documents(cfg.vocab_size)
    d = Documents.from_eos(x, EOS)
    assert d.cu_seqlens.tolist() == [0, 7, 8, 21, 29, 41, 58]  # row 0: 4 documents, row 1: 2
    with torch.no_grad():
        got = model(x, documents=d)
        unmasked = model(x)
    want = _per_document_reference(hf, x, d)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    # the mask matters: without it, tokens after the first document of a row see earlier documents
    assert (unmasked[0, 7:] - want[0, 7:]).abs().max() > 1e-2
    torch.testing.assert_close(unmasked[:, :7], want[:, :7], rtol=1e-5, atol=5e-5)
    assert bool(calls) == (backend_name == "triton")


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_fast_loss_and_gradients_match_eager_with_documents(use_backend, backend_name):
    use_backend(backend_name)
    cfg = preset("tiny_qwen2").replace(hidden_size=112)  # head_dim 16
    eager = Transformer(cfg, fast=False)
    fast = Transformer(cfg, fast=True)
    fast.load_state_dict(eager.state_dict())
    x = rows_with_documents(cfg.vocab_size, S=24)
    d = Documents.from_eos(x[:, :-1], EOS)
    la = eager.loss(x[:, :-1], x[:, 1:], documents=d)
    lb = fast.loss(x[:, :-1], x[:, 1:], documents=d)
    assert lb.item() == pytest.approx(la.item(), rel=1e-5)
    assert la.item() != pytest.approx(eager.loss(x[:, :-1], x[:, 1:]).item(), rel=1e-6)
    la.backward()
    lb.backward()
    for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointing_and_compile_keep_document_masking():
    cfg = preset("tiny_llama")
    model = Transformer(cfg, fast=True)
    x = rows_with_documents(cfg.vocab_size, S=20)
    d = Documents.from_eos(x[:, :-1], EOS)
    want = model.loss(x[:, :-1], x[:, 1:], documents=d)
    want.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    again = model.loss(x[:, :-1], x[:, 1:], documents=d)
    again.backward()
    assert torch.equal(again, want)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-6, atol=1e-7)
    model.gradient_checkpointing = False
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x[:, :-1], x[:, 1:], documents=d), want)


def test_documents_on_another_device_are_refused():
    cfg = preset("tiny_llama")
    x = torch.randint(4, cfg.vocab_size, (1, 8))
    d = Documents(torch.tensor([0, 8], dtype=torch.int32, device="meta"), 8)
    with pytest.raises(ValueError, match=r"documents: cu_seqlens is on meta; expected the input's device cpu"):
        Transformer(cfg)(x, documents=d)


@pytest.mark.cuda
def test_gpu_fast_path_with_documents_matches_eager():
    """Qwen2-0.5B layer shapes on the GPU: the varlen kernels under bf16 autocast against the eager
    masked path, loss and gradients."""
    cfg = preset("qwen2_0_5b").replace(num_layers=2, vocab_size=320)
    torch.manual_seed(0)
    eager = Transformer(cfg, fast=False).cuda()
    fast = Transformer(cfg, fast=True).cuda()
    fast.load_state_dict(eager.state_dict())
    x = rows_with_documents(cfg.vocab_size, B=4, S=513)
    d = Documents.from_eos(x[:, :-1], EOS).to("cuda")
    x = x.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        la = eager.loss(x[:, :-1], x[:, 1:], documents=d)
        lb = fast.loss(x[:, :-1], x[:, 1:], documents=d)
    la.backward()
    lb.backward()
    assert lb.item() == pytest.approx(la.item(), rel=2e-2)
    assert_grads_near(eager, fast)
