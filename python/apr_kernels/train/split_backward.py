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
  outputs instead (correct, only slower).

A custom op whose backward gives every gradient at once runs whole in each pass unless it asks
autograd which it will use (the experts' grouped GEMM does: ``ops/grouped_mm._wanted``). The
gradients are added to ``.grad`` as ``backward()`` adds them. The graph is kept from ``B`` to
``W`` (``retain_graph``), so a micro-batch's activations live until its ``W``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


def _children(node) -> list:
    return [n for n, _ in node.next_functions if n is not None]


def _reaching(graph: dict, targets: set) -> set:
    """The nodes of ``graph`` (node -> children) from which a node of ``targets`` is reachable (the
    targets included)."""
    parents = defaultdict(list)
    for node, kids in graph.items():
        for kid in kids:
            parents[kid].append(node)
    seen, stack = set(targets), list(targets)
    while stack:
        for parent in parents[stack.pop()]:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


class SplitBackward:
    """One micro-batch's backward from ``outputs`` (with ``grads``: None for a scalar loss) in two
    passes: ``inputs_pass`` (the gradients of ``inputs``, set as their ``.grad``) then
    ``weights_pass`` (added to the ``.grad`` of ``params``, those with ``requires_grad``)."""

    def __init__(self, outputs: list[torch.Tensor], grads: list, inputs: list[torch.Tensor], params):
        self.outputs, self.grads, self.inputs = outputs, grads, inputs
        self.params = [p for p in params if p.requires_grad]
        self._captured: dict = {}
        graph, stack = {}, [get_gradient_edge(t).node for t in outputs]
        while stack:
            node = stack.pop()
            if node not in graph:
                graph[node] = _children(node)
                stack.extend(graph[node])
        on_path = _reaching(graph, {get_gradient_edge(t).node for t in inputs})
        # each parameter's split nodes: on the inputs' path, with a child towards it off the path
        splits, self._from_outputs = {}, []
        for p in self.params:
            node = get_gradient_edge(p).node
            if node not in graph:
                continue  # (no part in these outputs)
            towards = _reaching(graph, {node})
            mine = [n for n in towards & on_path if any(k in towards and k not in on_path for k in graph[n])]
            if mine:
                splits[p] = mine
            else:
                self._from_outputs.append(p)
        groups = []  # ([params], {split nodes}): parameters joined by a shared split node
        for p, nodes in splits.items():
            group = ([p], set(nodes))
            for g in [g for g in groups if g[1] & group[1]]:
                group[0].extend(g[0])
                group[1].update(g[1])
            groups = [g for g in groups if not g[1] & group[1]] + [group]
        self.groups = []
        for params, nodes in groups:  # (a group's node reaching one of its parameters along the path)
            through = _reaching(graph, {get_gradient_edge(p).node for p in params})
            if any(k in on_path and k in through for n in nodes for k in graph[n]):
                self._from_outputs.extend(params)
            else:
                self.groups.append((params, list(nodes)))

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
