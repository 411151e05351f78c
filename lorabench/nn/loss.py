"""A chunked linear cross-entropy: the causal-LM loss of hidden states through the output head without ever
holding the full tokens x vocab logits.

Forward computes each chunk's logits, its log-sum-exp and the target's logit, and keeps only the per-token
log-sum-exp (fp32, 4 bytes a token). Backward recomputes each chunk's logits (one more output-head product),
turns them into softmax - one_hot in place, and writes that chunk's rows of d_hidden and adds its share of
d_weight. At most one chunk's logits are alive: (a + 4) x chunk x V bytes in a dtype of a bytes below fp32
(the product, then its fp32 copy), 4 x chunk x V in fp32. The same idea as Liger's fused linear
cross-entropy (Hsu et al. 2024, arXiv:2410.10989) and Wijmans et al. 2024 (Cut Your Losses, arXiv:2411.09009),
but gradients in backward, so nothing the size of d_hidden is held from forward on.

Loss and label handling follow transformers' ForCausalLMLoss (transformers/loss/loss_utils.py): labels
padded on the right with ignore_index and shifted by one, fp32 logits, mean over the tokens not ignored.
"""

from __future__ import annotations

import torch

from lorabench.estimator.setup import check_loss_chunk
from lorabench.nn.model import IGNORE_INDEX, shift_labels


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [c, V] of one chunk h [c, D]; the product in the weights' dtype is freed on return."""
    z = torch.mm(h, weight.t())
    return z if z.dtype == torch.float32 else z.float()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden [N, D] @ weight[V, D].T against labels [N] (already shifted), `chunk`
    tokens at a time. Saves hidden, weight, labels and the per-token log-sum-exp; d_weight is computed only
    when the weight needs a gradient (a trainable head), accumulated in the weight's dtype."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        count = valid.sum()
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # lse: [N]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            z = _chunk_logits(hidden[s:s + chunk], weight)  # z: [c, V] fp32
            y = labels[s:s + chunk]
            target = z.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
            top = z.amax(1, keepdim=True)
            lse_c = z.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))
            del z
            lse[s:s + chunk] = lse_c
            total += ((lse_c - target) * valid[s:s + chunk]).sum()
        ctx.save_for_backward(hidden, weight, labels, lse, count)
        ctx.chunk = chunk
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels, lse, count = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight) if need_w else None
        scale = grad_out.float() / count
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, y = hidden[s:s + ctx.chunk], labels[s:s + ctx.chunk]
            # softmax - one_hot, scaled by grad_out / count on the tokens not ignored: d loss / d logits
            p = _chunk_logits(h, weight).sub_(lse[s:s + ctx.chunk].unsqueeze(1)).exp_()
            p.scatter_add_(1, y.clamp(min=0).unsqueeze(1), p.new_full((p.shape[0], 1), -1.0))
            p.mul_(((y != IGNORE_INDEX) * scale).unsqueeze(1))
            g = p if p.dtype == hidden.dtype else p.to(hidden.dtype)
            del p
            if need_h:
                torch.mm(g, weight, out=d_hidden[s:s + ctx.chunk])
            if need_w:
                d_weight.addmm_(g.t(), h)
            del g
        return d_hidden, d_weight, None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk: int = 1024) -> torch.Tensor:
    """transformers' causal-LM loss of the logits hidden @ weight.T, chunk tokens at a time.

    Args:
        hidden: final hidden states [B, S, D] (after the final norm).
        weight: the output head's weight [V, D].
        labels: [B, S]; -100 is ignored; shifted here as ForCausalLMLoss shifts them.
        chunk: tokens per chunk, 1 to MAX_LOSS_CHUNK.

    Raises:
        LorabenchError: a chunk out of bounds.
    """
    check_loss_chunk(chunk)
    shifted = shift_labels(labels)  # shifted: [B, S]
    return ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, shifted.view(-1), chunk)


__all__ = ["ChunkedLinearCrossEntropy", "chunked_causal_lm_loss", "IGNORE_INDEX"]
