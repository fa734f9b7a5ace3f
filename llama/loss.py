"""Cross-entropy of the output projection, three ways with one result (the summed fp32 CE of the counted rows):

    plain_linear_cross_entropy_sum         F.linear + F.cross_entropy over all rows at once: the reference. Its fp32
                                           logits (rows x vocab, plus their softmax and gradient) are the largest
                                           tensors of a step: ~8 GB at 20 x 1024 tokens x vocab 32k.
    linear_cross_entropy_sum               fused: a custom autograd Function walks the rows in chunks and turns each
                                           chunk's logits straight into the gradients for `hidden` and `weight`
                                           during the forward; backward only scales them. No recomputation.
    checkpointed_linear_cross_entropy_sum  the plain loss on one row chunk at a time, each chunk recomputed in
                                           backward (non-reentrant torch.utils.checkpoint). Ordinary ops only, so
                                           wrappers that act through hooks on ops (gemini's parameter gathering) see
                                           `weight` used; memory stays near the fused path's at the cost of one
                                           more projection matmul.
`LOSS_PATHS` names them for Llama.loss_path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# fp32 logits held at once; larger chunks only buy fewer, bigger matmuls.
CHUNK_BYTES = 64 * 2**20


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # hidden (n, dim), weight (vocab, dim), targets (n,)
        n, vocab = hidden.shape[0], weight.shape[0]
        device_type = hidden.device.type
        # Under autocast, do the matmuls in the autocast dtype by hand: autocast does not cover out= / in-place ops.
        compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else weight.dtype)
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            h_all = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            grad_hidden = torch.empty_like(h_all) if want_hidden_grad else None
            # Accumulated over chunks in fp32 when the weight is half precision.
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if want_weight_grad else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            rows = max(1, CHUNK_BYTES // (4 * vocab))
            for start in range(0, n, rows):
                h = h_all[start:start + rows]  # (rows, dim)
                t = targets[start:start + rows]  # (rows,)
                logits = (h @ w.t()).float()  # (rows, vocab) fp32
                lse = torch.logsumexp(logits, dim=-1)  # (rows,)
                loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (want_hidden_grad or want_weight_grad):
                    continue
                # d(sum CE)/d logits = softmax - one_hot(target), built in place in the logits buffer.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad_logits = grad_logits.to(compute_dtype)
                if want_hidden_grad:
                    torch.mm(grad_logits, w, out=grad_hidden[start:start + rows])  # (rows, dim)
                if want_weight_grad:
                    if compute_dtype == torch.float32:
                        grad_weight.addmm_(grad_logits.t(), h)  # (vocab, dim)
                    else:
                        grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = (grad_hidden * grad_loss).to(ctx.hidden_dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed fp32 CE of F.linear(hidden, weight) against targets; hidden (n, dim), weight (vocab, dim)."""
    if not torch.is_grad_enabled():
        # Detached inputs tell the Function no backward will come, so it skips the gradient matmuls.
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropySum.apply(hidden, weight, targets)


def plain_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same through ordinary autograd ops, all rows at once: the reference, and one chunk of the checkpointed
    path."""
    logits = F.linear(hidden, weight).float()  # (n, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


def checkpointed_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor,
                                          targets: torch.Tensor) -> torch.Tensor:
    """The plain loss summed over row chunks of CHUNK_BYTES of fp32 logits, each chunk recomputed in backward."""
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # split(): one backward node joins the chunks' hidden gradients, instead of a full-size zero tensor per slice.
    for h, t in zip(hidden.split(rows), targets.split(rows)):  # (rows, dim), (rows,)
        # Non-reentrant: the recomputation replays F.linear on `weight` itself, so hooks that gather a sharded
        # parameter around each op use (ColoParamOpHookManager, colossalai/tensor/param_op_hook.py) fire again in
        # backward. No RNG in a cross-entropy: nothing to stash and restore.
        loss = loss + checkpoint(plain_linear_cross_entropy_sum, h, weight, t, use_reentrant=False,
                                 preserve_rng_state=False)
    return loss


LOSS_PATHS = {
    "fused": linear_cross_entropy_sum,
    "checkpointed": checkpointed_linear_cross_entropy_sum,
    "plain": plain_linear_cross_entropy_sum,
}
