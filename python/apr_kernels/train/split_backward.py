"""A backward in two passes, for zero-bubble pipeline schedules (Qi et al., 2024, "Zero Bubble
Pipeline Parallelism"): first the gradients of a stage's inputs (``B``: what the previous stage waits
for), later those of its parameters (``W``: what nobody waits for, run where the pipeline would idle).

How, on any autograd graph (the model's own kernels, LoRA, experts, tensor-parallel collectives):

* ``B`` asks autograd for the inputs' gradients only (``torch.autograd.grad(..., inputs=inputs,
  retain_graph=True)``). Autograd then runs only the nodes on a path to an input, and each of them
  computes only the gradients that path needs: a projection's ``x @ W.T`` node gives ``dX`` and skips
  ``dW``. Before it runs, each node of that path with an edge towards a parameter off the path (the
  "split" nodes: the projection's node, a norm's multiply, a bias's add) has its incoming gradients
  recorded by a hook.
* ``W`` runs each split node again from its recorded gradients, asking only for its parameters
  (``torch.autograd.grad`` from ``GradientEdge``s): the ``dW`` half of the work, once. Parameters are
  grouped by the split nodes they share (a fused q/k/v projection's three weights), so that no group's
  node reaches another of its parameters through the inputs' path, which would count it twice; a
  group where that could happen, or a parameter no split node reaches, takes its gradient from the
  outputs instead (correct, only slower). Groups none of whose nodes reach another's parameters
  along the path (a layer's q, k and v) share one call: about six calls a decoder layer.

A custom op whose backward gives every gradient at once runs whole in each pass unless it asks
autograd which it will use (the experts' grouped GEMM does: ``ops/grouped_mm._wanted``). The
gradients are added to ``.grad`` as ``backward()`` adds them. The graph is kept from ``B`` to
``W`` (``retain_graph``), so a micro-batch's activations live until its ``W``. The cost on the host:
the graph walk (6 ms for 12 Qwen2-0.5B layers on this project's CPU) and each weight-pass call's
(about 0.3 ms), which a GPU's kernels hide only when a micro-batch's backward takes longer.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


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


class SplitBackward:
    """One micro-batch's backward from ``outputs`` (with ``grads``: None for a scalar loss) in two
    passes: ``inputs_pass`` (the gradients of ``inputs``, set as their ``.grad``) then
    ``weights_pass`` (added to the ``.grad`` of ``params``, those with ``requires_grad``)."""

    def __init__(self, outputs: list[torch.Tensor], grads: list, inputs: list[torch.Tensor], params):
        self.outputs, self.grads, self.inputs = outputs, grads, inputs
        self.params = [p for p in params if p.requires_grad]
        self._captured: dict = {}
        # one pass over the graph, children first (parameters as bits of an int: the sets are cheap):
        # the parameters below each node, and whether an input is
        bit = {get_gradient_edge(p).node: 1 << i for i, p in enumerate(self.params)}
        starts = {get_gradient_edge(t).node for t in inputs}
        kids: dict = {}
        below, to_input = {}, {}
        for node in _post_order([get_gradient_edge(t).node for t in outputs], kids):
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
        # a group whose split node reaches one of its parameters along the path (a weight used at two
        # depths) would count that path twice: it, and any parameter no split node reaches, from the
        # outputs instead
        # the weight pass asks autograd once per set of groups none of whose split nodes reaches
        # another's parameters along the path (q, k and v's, say): fewer calls, the same nodes run
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
        present = {n for n in bit if n in below}
        self._from_outputs = [p for i, p in enumerate(self.params)
                              if not split >> i & 1 and get_gradient_edge(p).node in present]

    def inputs_pass(self) -> None:
        """``B``: the inputs' gradients (as their ``.grad``); the split nodes' incoming gradients kept."""
        handles = []
        for _, nodes in self.groups:
            for node in nodes:
                def keep(grad_outputs, node=node):
                    self._captured[node] = grad_outputs

                handles.append(node.register_prehook(keep))
        try:
            got = torch.autograd.grad(self.outputs, self.inputs, self.grads, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for t, g in zip(self.inputs, got):
            t.grad = g if g is not None else torch.zeros_like(t)

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
        if self._from_outputs:
            work.append((self.outputs, self.grads, self._from_outputs))
        for i, (outs, seeds, params) in enumerate(work):
            got = torch.autograd.grad(outs, params, seeds, retain_graph=i < len(work) - 1, allow_unused=True)
            for p, g in zip(params, got):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        self.outputs = self.grads = self._captured = self.groups = None
