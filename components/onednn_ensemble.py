"""Forward and backward of a ReLU critic ensemble on oneDNN's fp32 matmul (CPU).

Why: on some of the development machines (AMD EPYC Zen 5), MKL, which serves `torch.bmm` /
`torch.mm` for float32 on CPU, runs its AVX2 code, while oneDNN's fp32 matmul, reached through
`torch.ops.mkldnn._linear_pointwise` (the op inductor emits for CPU linears), runs AVX-512 with
the same fp32 arithmetic: about twice the speed at the 256-wide critics (docs/performance.md has
the figures; on other machines and at 64-wide critics the batched matmul can be the faster).
torch exposes no batched fp32 oneDNN matmul, so the
members are multiplied one after the other here: for each layer, one oneDNN call per member,
with the bias and ReLU fused into the forward call. The backward is written out, because that
op has no autograd formula: per member, dW = h^T g and dX = g W^T as oneDNN matmuls, the ReLU
mask applied in place, and only the gradients that autograd asks for.

One difference from `torch.relu`: the fused ReLU maps a NaN pre-activation to 0 instead of NaN,
so NaN weights in a hidden layer reach Q one update later (through NaN gradients), not at once.

`EnsembleMLP.evaluate` uses this when `available_for(...)` holds (CPU, float32, ReLU, oneDNN
present) on calls of at least `EnsembleMLP.onednn_min_rows` rows, and `torch.baddbmm` otherwise
(CUDA, float64, other activations, calls of one batch of rows).
"""

from __future__ import annotations

import torch

_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch.ops, "mkldnn") else None


def available_for(rows: torch.Tensor, weights, activation: torch.nn.Module) -> bool:
    """Whether `ReluEnsembleOneDNN` can evaluate these rows and weights."""
    return (_linear is not None and torch.backends.mkldnn.is_available() and isinstance(activation, torch.nn.ReLU)
            and len(weights) >= 2  # its backward assumes a hidden layer; a linear critic takes the batched path
            and rows.device.type == "cpu" and rows.dtype == torch.float32
            and all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights))


def _matmul(x: torch.Tensor, weight_t: torch.Tensor, bias=None, attr: str = "none") -> torch.Tensor:
    """x @ weight_t.T (+ bias, then `attr`, e.g. "relu"), one oneDNN fp32 matmul."""
    return _linear(x, weight_t, bias, attr, [], "")


@torch.compiler.disable  # inductor cannot lower this op with trainable weights: under torch.compile it runs eagerly
def ensemble_q(rows: torch.Tensor, weights, biases) -> torch.Tensor:
    """Q `[E, R]` of the ensemble on rows `[R, in]`, through `ReluEnsembleOneDNN`."""
    return ReluEnsembleOneDNN.apply(rows, *weights, *biases)


class ReluEnsembleOneDNN(torch.autograd.Function):
    """Q `[E, R]` of E ReLU MLPs on shared rows `[R, in]`; weights `[E, in, out]`, biases `[E, 1, out]`.

    Called through `ensemble_q`; the last layer has out = 1.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        depth = len(params) // 2
        weights, biases = params[:depth], params[depth:]
        members = weights[0].shape[0]
        hidden = [rows] * members  # per member, the input of the current layer
        saved = []
        for w, b in zip(weights[:-1], biases[:-1]):
            hidden = [_matmul(hidden[e], w[e].t(), b[e, 0], "relu") for e in range(members)]
            saved.extend(hidden)
        q = torch.stack([torch.mv(hidden[e], weights[-1][e, :, 0]) for e in range(members)]) + biases[-1].squeeze(-1)
        ctx.save_for_backward(rows, *weights, *saved)
        ctx.depth, ctx.members = depth, members
        return q

    @staticmethod
    @torch.compiler.disable  # also when a compiled region (compiled autograd) runs the backward
    def backward(ctx, grad_q: torch.Tensor):
        depth, members = ctx.depth, ctx.members
        rows, *rest = ctx.saved_tensors
        weights, saved = rest[:depth], rest[depth:]
        # activations[l][e]: output of hidden layer l of member e; the input of layer l is activations[l - 1].
        activations = [saved[layer * members:(layer + 1) * members] for layer in range(depth - 1)]
        need_rows = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1:1 + depth]
        need_b = ctx.needs_input_grad[1 + depth:]
        grad_w = [[] for _ in range(depth)]
        grad_b = [[] for _ in range(depth)]
        grad_rows = None
        for e in range(members):
            h, dq = activations[-1][e], grad_q[e]
            if need_w[-1]:
                grad_w[-1].append(torch.mv(h.t(), dq).unsqueeze(-1))
            if need_b[-1]:
                grad_b[-1].append(dq.sum().view(1, 1))
            # d(h . w)/dh masked by ReLU' (h > 0), then scaled by dq per row.
            g = torch.ops.aten.threshold_backward(weights[-1][e, :, 0].expand_as(h), h, 0).mul_(dq.unsqueeze(-1))
            for layer in range(depth - 2, -1, -1):
                inputs = rows if layer == 0 else activations[layer - 1][e]
                if need_w[layer]:
                    grad_w[layer].append(_matmul(inputs.t(), g.t()))
                if need_b[layer]:
                    grad_b[layer].append(g.sum(0, keepdim=True))
                if layer > 0:
                    g = _matmul(g, weights[layer][e])
                    g = torch.ops.aten.threshold_backward.grad_input(g, inputs, 0, grad_input=g)
                elif need_rows:
                    d_rows = _matmul(g, weights[0][e])
                    grad_rows = d_rows if grad_rows is None else grad_rows.add_(d_rows)
        stacked_w = [torch.stack(g) if need else None for g, need in zip(grad_w, need_w)]
        stacked_b = [torch.stack(g) if need else None for g, need in zip(grad_b, need_b)]
        return grad_rows, *stacked_w, *stacked_b
