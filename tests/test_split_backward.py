"""``split_backward.SplitBackward``: a backward in an input half and a weight half (the zero-bubble
pipeline schedule's B and W), against one ``backward()`` of the same graph: the same input and
parameter gradients, the input half computing no weight gradient, the weight half not running the
input's path again, the parameters found in the graph (the tensors the forward used), and a weight
used at two depths (which its split node would count twice) taken from the outputs instead.
test_pipeline_parallel.py runs it in 2- and 4-rank pipelines."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apr_kernels.train.split_backward import SplitBackward


def _cut_at_embedding(model, x, y):
    """``model.loss(x, y)`` with the embedding's output a leaf (as a pipeline stage receives its input):
    (loss, that leaf)."""
    box = {}

    def leaf(_m, _i, out):
        box["h"] = out.detach().requires_grad_()
        return box["h"]

    handle = model.model.embed_tokens.register_forward_hook(leaf)
    try:
        loss = model.loss(x, y)
    finally:
        handle.remove()
    return loss, box["h"]


@pytest.mark.parametrize("preset_name, fast", [("tiny_qwen2", False), ("tiny_llama", False), ("tiny_qwen2_moe", False),
                                               ("tiny_qwen2", True)], ids=["qwen2", "llama", "qwen2_moe", "qwen2_fast"])
def test_two_halves_give_one_backward(use_backend, preset_name, fast):
    """Every decoder layer's parameters (attention with q/k/v bias, norms, MLP or experts and router,
    the tied or untied head) split off the input's path (a projection's weight by its own GEMM), none
    from the outputs; the input half leaves every matrix's gradient unset (the vectors', cheap, come
    with the input's); together the gradients of one ``backward()``. And
    on the fast path (the Triton kernels in the interpreter where they take the shapes: custom ops
    whose backward gives every gradient at once, run in each half)."""
    from apr_kernels.model import Transformer, preset

    use_backend("auto" if fast else "reference")  # (auto: the kernels where they take the shapes)
    torch.manual_seed(0)
    model = Transformer(preset(preset_name), fast=fast)
    x, y = torch.randint(0, 200, (2, 16)), torch.randint(0, 200, (2, 16))
    loss, h = _cut_at_embedding(model, x, y)
    split = SplitBackward([loss], [None], [h])
    # (every parameter: a vector with the inputs, a projection's weight by its own GEMM, or in a group
    # of split nodes; none from the outputs)
    direct = [p for d in split._direct for p in d[-1]]
    reached = [*split.vectors, *direct, *(p for group, _ in split.groups for p in group)]
    used = [p for n, p in model.named_parameters() if n != "model.embed_tokens.weight" or model.config.tie_word_embeddings]
    assert len(reached) == len(used) and {id(p) for p in reached} == {id(p) for p in used}
    assert not split._from_outputs
    names = {id(p): n for n, p in model.named_parameters()}
    # (every projection x @ W.T, its weight's gradient one GEMM: the fast path's fused q/k/v's too)
    assert {names[id(p)].rsplit(".", 2)[-2] for p in direct} >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    split.inputs_pass()
    assert h.grad is not None and all(p.grad is None for p in model.parameters() if p.dim() > 1)
    split.weights_pass()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    got_h = h.grad.clone()
    model.zero_grad(set_to_none=True)
    loss, h = _cut_at_embedding(model, x, y)
    loss.backward()
    torch.testing.assert_close(got_h, h.grad, rtol=1e-5, atol=1e-7)
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("preset_name, fast", [("tiny_qwen2", False), ("tiny_qwen2_moe", True)],
                         ids=["qwen2", "qwen2_moe_fast"])
def test_checkpointed_layers_are_recomputed_once_a_pass(use_backend, preset_name, fast):
    """Under activation checkpointing each layer is recomputed once by the input half and once by
    the weight half (its direct GEMMs' saved inputs and its autograd calls, the fast path's experts
    and fused loss, share one recomputation), not once per saved tensor read; the gradients are one
    backward's."""
    import copy

    from apr_kernels.model import Transformer, preset

    use_backend("auto" if fast else "reference")
    torch.manual_seed(6)
    model = Transformer(preset(preset_name), fast=fast)
    model.gradient_checkpointing = "full"
    whole = copy.deepcopy(model)
    runs = []
    for i, layer in enumerate(model.model.layers):  # (the layer's MLP runs once per forward of the layer)
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: runs.append(i))
    x, y = torch.randint(0, 200, (2, 16)), torch.randint(0, 200, (2, 16))
    loss, h = _cut_at_embedding(model, x, y)
    layers = list(range(len(model.model.layers)))
    assert runs == layers
    split = SplitBackward([loss], [None], [h])
    assert runs == layers  # (finding the projections reads no saved tensor)
    assert bool(split.groups) == fast  # (the experts' weights by autograd calls)
    split.inputs_pass()
    assert sorted(runs) == sorted(layers * 2)
    split.weights_pass()
    assert sorted(runs) == sorted(layers * 3)
    loss, h_whole = _cut_at_embedding(whole, x, y)
    loss.backward()
    torch.testing.assert_close(h.grad, h_whole.grad, rtol=1e-5, atol=1e-7)
    for (n, p), q in zip(model.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


class _Counted(torch.autograd.Function):
    """The identity, counting its backward calls: a node on the input's path only."""

    calls = 0

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        _Counted.calls += 1
        return g


def test_weight_half_does_not_run_the_input_path_again():
    """Between two projections, a node with no parameter below it runs once, in the input half: the
    weight half starts at the projections' own nodes."""
    torch.manual_seed(1)
    first, second = nn.Linear(8, 8), nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    out = second(_Counted.apply(first(x))).pow(2).sum()
    split = SplitBackward([out], [None], [x])
    _Counted.calls = 0
    split.inputs_pass()
    assert _Counted.calls == 1
    split.weights_pass()
    assert _Counted.calls == 1
    got = [p.grad.clone() for p in (*first.parameters(), *second.parameters())]
    for p in (*first.parameters(), *second.parameters()):
        p.grad = None
    second(_Counted.apply(first(x.detach()))).pow(2).sum().backward()
    for g, p in zip(got, (*first.parameters(), *second.parameters())):
        torch.testing.assert_close(g, p.grad)


def test_the_parameters_are_the_graphs_own_leaves():
    """The weights a forward used get their gradients, whatever the module holds by the backward (FSDP
    swaps its gathered copies back out after a forward): they are found in the graph, not asked of the
    module. A leaf that was never used gets none."""
    torch.manual_seed(4)
    layer = nn.Linear(8, 4)
    used_w, used_b = layer.weight, layer.bias
    x = torch.randn(3, 8, requires_grad=True)
    out = layer(x).pow(2).sum()
    layer.weight, layer.bias = nn.Parameter(torch.zeros(4, 8)), nn.Parameter(torch.zeros(4))  # (FSDP's reshard)
    split = SplitBackward([out], [None], [x])
    assert [id(p) for p in split.params] == [id(used_w)] and [id(p) for p in split.vectors] == [id(used_b)]
    split.inputs_pass()
    split.weights_pass()
    assert layer.weight.grad is None and layer.bias.grad is None
    got = used_w.grad.clone(), used_b.grad.clone(), x.grad.clone()
    used_w.grad = used_b.grad = x.grad = None
    (x @ used_w.T + used_b).pow(2).sum().backward()
    for g, t in zip(got, (used_w, used_b, x)):
        torch.testing.assert_close(g, t.grad)


def test_a_weight_used_at_two_depths_comes_from_the_outputs():
    """``W`` applied twice: its first use's split node lies below its second's on the input's path,
    so asking that group's nodes again would count the second use's path twice; the parameter is
    differentiated from the outputs, with the gradient of one backward."""
    torch.manual_seed(2)
    w = torch.randn(6, 6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    x = torch.randn(4, 6, requires_grad=True)
    out = ((x @ w + b) @ w).tanh().sum()
    split = SplitBackward([out], [None], [x])
    assert any(p is w for p in split._from_outputs)
    split.inputs_pass()
    split.weights_pass()
    got_w, got_b, got_x = w.grad.clone(), b.grad.clone(), x.grad.clone()
    w.grad = b.grad = x.grad = None
    ((x @ w + b) @ w).tanh().sum().backward()
    torch.testing.assert_close(got_w, w.grad)
    torch.testing.assert_close(got_b, b.grad)
    torch.testing.assert_close(got_x, x.grad)


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per_expert"])
def test_grouped_mm_computes_only_the_half_each_pass_asks_for(monkeypatch, stacked):
    """The experts' grouped GEMM gives dx in the input half and the weights' gradients in the weight
    half, each computed once (its backward asks autograd which it will use), with one backward's
    gradients."""
    import apr_kernels.ops.grouped_mm as gmm
    from apr_kernels import grouped_mm

    asked = []
    inner = gmm._grouped_mm_backward_impl

    def spy(dy, x, weights, offs, need_dx, need_dw):
        asked.append((need_dx, need_dw))
        return inner(dy, x, weights, offs, need_dx, need_dw)

    monkeypatch.setattr(gmm, "_grouped_mm_backward_impl", spy)
    torch.manual_seed(3)
    x = torch.randn(7, 4, requires_grad=True)
    weights = torch.randn(3, 5, 4, requires_grad=True) if stacked else \
        [torch.randn(5, 4, requires_grad=True) for _ in range(3)]
    params = [weights] if stacked else weights
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)  # (an empty group among them)
    split = SplitBackward([grouped_mm(x * 2, weights, offs).tanh().sum()], [None], [x])
    split.inputs_pass()
    assert asked == [(True, False)]
    split.weights_pass()
    assert asked == [(True, False), (False, True)]
    got = [x.grad.clone(), *(p.grad.clone() for p in params)]
    x.grad = None
    for p in params:
        p.grad = None
    grouped_mm(x * 2, weights, offs).tanh().sum().backward()
    assert asked[-1] == (True, True)
    for g, t in zip(got, [x, *params]):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_projections_compute_only_the_half_each_pass_asks_for(monkeypatch, recipe):
    """A float8 projection's backward (torchao's gives the input's and the weight's gradients at
    once) casts and multiplies only what the pass uses: the input half the output gradient and the
    weight (dX), the weight half the output gradient and the input (dW); together the gradients of
    one backward (which still runs torchao's own code)."""
    pytest.importorskip("torchao")
    import copy

    from train_runs import sixteen_config

    from apr_kernels.model import Transformer
    from apr_kernels.train import float8

    torch.manual_seed(5)
    model = Transformer(sixteen_config(num_layers=1), fast=False)
    names = float8.convert(model, recipe, torch.device("cpu"))
    whole = copy.deepcopy(model)
    import torchao.float8.float8_linear as f8

    roles, inner = [], f8.hp_tensor_to_float8_dynamic

    def spy(t, *args, **kwargs):
        roles.append(kwargs["gemm_input_role"].name)
        return inner(t, *args, **kwargs)

    monkeypatch.setattr(f8, "hp_tensor_to_float8_dynamic", spy)
    x, y = torch.randint(0, 200, (2, 16)), torch.randint(0, 200, (2, 16))
    loss, h = _cut_at_embedding(model, x, y)
    split = SplitBackward([loss], [None], [h])
    roles.clear()
    split.inputs_pass()
    assert sorted(roles) == sorted(["GRAD_OUTPUT", "WEIGHT"] * len(names))
    roles.clear()
    split.weights_pass()
    assert sorted(roles) == sorted(["GRAD_OUTPUT", "INPUT"] * len(names))
    loss, h_whole = _cut_at_embedding(whole, x, y)
    roles.clear()
    loss.backward()
    assert len(roles) == 4 * len(names)  # (torchao's backward: both GEMMs' casts)
    torch.testing.assert_close(h.grad, h_whole.grad, rtol=0, atol=0)
    for (n, p), q in zip(model.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
