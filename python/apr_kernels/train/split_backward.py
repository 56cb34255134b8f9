"""A backward in two passes, for zero-bubble pipeline schedules (Qi et al., 2024, "Zero Bubble
Pipeline Parallelism"): first the gradients of a stage's inputs (``B``: what the previous stage waits
for), later those of its weight matrices (``W``: what nobody waits for, run where the pipeline would
idle).

How, on any autograd graph (the model's own kernels, LoRA, experts, float8, tensor-parallel
collectives):

* ``B`` asks autograd for the inputs' gradients (``torch.autograd.grad(..., retain_graph=True)``),
  and for the vectors' (norms' weights, biases: cheap reductions). Autograd then runs only the nodes
  on a path to one of them, and each computes only the gradients that path needs: a projection's
  ``x @ W.T`` node gives ``dX`` and skips ``dW``. Before it runs, each node of that path with an
  edge towards a matrix off the path (a "split" node) has its incoming gradient kept by a hook.
* ``W``: a split node that is a projection's product (``mm``/``addmm`` whose only way to a parameter
  is ``W.T``, through autocast's casts, or a fused q/k/v's concatenated weights) gives
  ``dW = dY.T @ x`` as one GEMM of the kept gradient and its saved input, with no autograd call:
  every plain projection (LoRA's adapters too), so the weight pass of a dense stage is a list of
  GEMMs. The other split nodes (the experts', float8's, the fused loss's) run again from their kept
  gradients, asked for their parameters only (``torch.autograd.grad`` from
  ``GradientEdge``s), grouped by the nodes they share, groups that cannot reach each other's
  parameters along the path sharing one call. A group whose node reaches one of its parameters along
  the path (a weight used at two depths, which it would count twice), or a parameter no split node
  reaches, takes its gradient from the outputs instead (correct, only slower).

A custom op whose backward gives every gradient at once runs whole in each pass unless it asks
autograd which it will use (the experts' grouped GEMM does: ``ops/grouped_mm._wanted``; so does
float8's matmul, ``float8._install_halves``). The gradients are added to ``.grad`` as ``backward()``
adds them. The graph is kept from ``B`` to ``W`` (``retain_graph``), so a micro-batch's activations
live until its ``W``. Under activation checkpointing each pass recomputes a layer once: ``W`` reads
its saved tensors within one ``torch.utils.checkpoint.GraphExecGroup`` (each read outside a
backward, or each backward call, would recompute it again), and finding the projections reads none
(``_raw_saved_*``). Host cost: one walk of the graph (5 ms for 12 Qwen2-0.5B layers on this
project's CPU, where their B and W together take as long as one backward), and about 0.3 ms per
autograd call of the weight pass, which dense layers do not make.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils import checkpoint

# (a torch without it recomputes a checkpointed region at each read: correct, only slower)
_GraphExecGroup = getattr(checkpoint, "GraphExecGroup", None)


def _children(node) -> list:
    return [n for n, _ in node.next_functions if n is not None]


def _post_order(roots: list, kids: dict) -> list:
    """The nodes reachable from ``roots``, each after all of its children (``kids``: filled, node ->
    children)."""
    order, seen = [], set()
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        kids[root] = _children(root)
        stack = [(root, iter(kids[root]))]
        while stack:
            node, rest = stack[-1]
            for kid in rest:
                if kid not in seen:
                    seen.add(kid)
                    kids[kid] = _children(kid)
                    stack.append((kid, iter(kids[kid])))
                    break
            else:
                stack.pop()
                order.append(node)
    return order


def _accumulate(params, grads) -> None:
    """Add ``grads`` to the parameters' ``.grad`` (in the parameter's layout) as ``backward()`` does."""
    for p, g in zip(params, grads):
        if g is not None:
            g = g.contiguous()
            p.grad = g if p.grad is None else p.grad + g


def _leaf_through_casts(node, kids: dict):
    """The parameter at the end of a chain of dtype casts (autocast's) from ``node``, or None."""
    while node is not None and node.name() == "ToCopyBackward0" and len(kids[node]) == 1:
        node = kids[node][0]
    return getattr(node, "variable", None)


def _projection(node, kids: dict, to_input: dict, below: dict, mask: int):
    """``(saved input's attribute, alpha, [W, ...])`` when ``node`` is the product of a projection
    ``x @ W.T`` (``mm``, or ``addmm`` with a bias) through which only W's gradient leaves the inputs'
    path: by a transpose and dtype casts (autocast's), or, for a fused q/k/v, a concatenation of the
    weights along their rows; else None."""
    name = node.name()
    if name not in ("MmBackward0", "AddmmBackward0"):
        return None
    edges = [n for n, _ in node.next_functions]
    weight_edge = edges[-1]  # (mm: self, mat2; addmm: bias, mat1, mat2)
    if weight_edge is None or to_input[weight_edge] or below[weight_edge] != mask:
        return None
    if any(e is not None and not to_input[e] and below[e] for e in edges[:-1]):
        return None
    if weight_edge.name() != "TBackward0" or len(kids[weight_edge]) != 1:
        return None
    chain = kids[weight_edge][0]
    while chain.name() == "ToCopyBackward0" and len(kids[chain]) == 1:
        chain = kids[chain][0]
    if chain.name() == "CatBackward0" and getattr(chain, "_saved_dim", None) == 0:
        params = [_leaf_through_casts(k, kids) for k in kids[chain]]
        if len(kids[chain]) != len(chain.next_functions):  # (a piece that needs no gradient)
            return None
    else:
        params = [_leaf_through_casts(chain, kids)]
    if any(p is None or p.dim() != 2 for p in params):
        return None
    saved = "_saved_mat1" if name == "AddmmBackward0" else "_saved_self"
    if getattr(node, "_raw" + saved, None) is None:  # (the raw handle: unpacking would recompute a checkpoint)
        return None
    return saved, getattr(node, "_saved_alpha", 1), params


def _one_recomputation():
    """Within: every backward call and saved-tensor read recomputes a checkpointed region at most once
    (``torch.utils.checkpoint.GraphExecGroup``; each would otherwise recompute it again). A no-op on a
    torch without it."""
    return _GraphExecGroup() if _GraphExecGroup is not None else contextlib.nullcontext()


class SplitBackward:
    """One micro-batch's backward from ``outputs`` (with ``grads``: None for a scalar loss) in two
    passes: ``inputs_pass`` (the gradients of ``inputs``, set as their ``.grad``) then
    ``weights_pass`` (added to the ``.grad`` of every other leaf of the graph: the parameters it
    reaches that require gradients, found in the graph itself, so under FSDP the gathered copies its
    forward used, whatever the module holds now)."""

    def __init__(self, outputs: list[torch.Tensor], grads: list, inputs: list[torch.Tensor]):
        self.outputs, self.grads, self.inputs = outputs, grads, inputs
        kids: dict = {}
        order = _post_order([get_gradient_edge(t).node for t in outputs], kids)  # (children first)
        ends = {get_gradient_edge(t).node for t in inputs}
        leaves = [node for node in order if hasattr(node, "variable") and node not in ends]  # (AccumulateGrad)
        # vectors (norms' weights, biases) with the inputs: their gradients are cheap reductions
        vectors = [node for node in leaves if node.variable.dim() <= 1]
        matrices = [node for node in leaves if node.variable.dim() > 1]
        self.vectors, self.params = [n.variable for n in vectors], [n.variable for n in matrices]
        self._captured: dict = {}
        # the parameters below each node (as bits of an int: the sets are cheap), and whether an input is
        bit = {node: 1 << i for i, node in enumerate(matrices)}
        starts = ends | set(vectors)
        below, to_input = {}, {}
        for node in order:
            mask, reaches = bit.get(node, 0), node in starts
            for kid in kids[node]:
                mask |= below[kid]
                reaches = reaches or to_input[kid]
            below[node], to_input[node] = mask, reaches
        # the split nodes: on the inputs' path, with children off it towards parameters; parameters
        # joined into groups by the split nodes they share
        groups: list[tuple[int, list]] = []  # (parameters' bits, split nodes)
        for node, reaches in to_input.items():
            if not reaches:
                continue
            off = 0
            for kid in kids[node]:
                if not to_input[kid]:
                    off |= below[kid]
            if off:
                joined = [g for g in groups if g[0] & off]
                mask, nodes = off, [node]
                for g in joined:
                    mask, nodes = mask | g[0], nodes + g[1]
                groups = [g for g in groups if not g[0] & off] + [(mask, nodes)]
        # a projection's product alone in its group (x @ W.T, W's only way in): its W gradient is one
        # GEMM of the kept output gradient and the saved input, run directly (no autograd call)
        self._direct = []
        for mask, nodes in list(groups):
            direct = _projection(nodes[0], kids, to_input, below, mask) if len(nodes) == 1 else None
            if direct is not None:
                self._direct.append((nodes[0], *direct))
                groups.remove((mask, nodes))
        # the weight pass asks autograd once per set of groups none of whose split nodes reaches
        # another's parameters along the path (q, k and v's, say): fewer calls, the same nodes run. A
        # group whose split node reaches one of its own parameters along the path (a weight used at
        # two depths) would count that path twice: it, and any parameter no split node reaches, from
        # the outputs instead
        calls: list[list] = []  # [parameters' bits, their split nodes' bits along the path, nodes]
        split = 0
        for mask, nodes in groups:
            along = 0
            for node in nodes:
                for kid in kids[node]:
                    if to_input[kid]:
                        along |= below[kid]
            if along & mask:
                continue
            split |= mask
            call = next((c for c in calls if not along & c[0] and not c[1] & mask), None)
            if call is None:
                calls.append([mask, along, list(nodes)])
            else:
                call[0], call[1] = call[0] | mask, call[1] | along
                call[2].extend(nodes)
        self.groups = [([p for i, p in enumerate(self.params) if mask >> i & 1], nodes) for mask, _, nodes in calls]
        for *_, params_of in self._direct:
            for param in params_of:
                split |= bit[get_gradient_edge(param).node]
        self._from_outputs = [p for i, p in enumerate(self.params) if not split >> i & 1]

    def inputs_pass(self) -> None:
        """``B``: the inputs' gradients (as their ``.grad``); the split nodes' incoming gradients kept."""
        handles = []
        for node in [n for _, nodes in self.groups for n in nodes] + [d[0] for d in self._direct]:
            def keep(grad_outputs, node=node):
                self._captured[node] = grad_outputs

            handles.append(node.register_prehook(keep))
        try:
            got = torch.autograd.grad(self.outputs, [*self.inputs, *self.vectors], self.grads, retain_graph=True,
                                      allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for t, g in zip(self.inputs, got):
            t.grad = g if g is not None else torch.zeros_like(t)
        _accumulate(self.vectors, got[len(self.inputs):])

    def weights_pass(self) -> None:
        """``W``: each group's parameter gradients from its split nodes' kept gradients (the rest's from
        the outputs), added to ``.grad``; the graph is released after."""
        work = []
        for params, nodes in self.groups:
            edges, seeds = [], []
            for node in nodes:
                for i, g in enumerate(self._captured.get(node, ())):
                    if g is not None:
                        edges.append(GradientEdge(node, i))
                        seeds.append(g)
            if edges:
                work.append((edges, seeds, params))
        # (activation checkpointing: the saved tensors this pass reads are recomputed once for all of it,
        # not once per read or call; a fallback from the outputs, which reads them again, runs after)
        with _one_recomputation():
            for node, saved_input, alpha, params in self._direct:
                dy = self._captured.get(node, (None,))[0]
                if dy is not None:  # (x @ W.T: W's gradient dy.T @ x, in W's layout; a fused q/k/v's by rows)
                    g = dy.t().mm(getattr(node, saved_input))
                    g = g * alpha if alpha != 1 else g
                    parts = g.split([p.shape[0] for p in params]) if len(params) > 1 else (g,)
                    _accumulate(params, [part.to(p.dtype) for part, p in zip(parts, params)])
            for i, (outs, seeds, params) in enumerate(work):
                keep = bool(self._from_outputs) or i < len(work) - 1
                _accumulate(params, torch.autograd.grad(outs, params, seeds, retain_graph=keep, allow_unused=True))
        if self._from_outputs:
            _accumulate(self._from_outputs, torch.autograd.grad(self.outputs, self._from_outputs, self.grads,
                                                                allow_unused=True))
        self.outputs = self.grads = self._captured = self.groups = self._direct = None
