"""lorabench.nn.loss: the chunked linear cross-entropy against transformers' ForCausalLMLoss on full logits."""

import pytest
import torch

from lorabench.errors import LorabenchError
from lorabench.estimator.setup import MAX_LOSS_CHUNK
from lorabench.nn.loss import chunked_causal_lm_loss

ForCausalLMLoss = pytest.importorskip("transformers.loss.loss_utils").ForCausalLMLoss


def _case(dtype, head_trainable, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 13, 24, generator=g).to(dtype).requires_grad_()  # [B, S, D]
    weight = (0.3 * torch.randn(50, 24, generator=g)).to(dtype).requires_grad_(head_trainable)  # [V, D]
    labels = torch.randint(0, 50, (2, 13), generator=g)
    labels[0, 3:6] = -100
    return hidden, weight, labels


def _grads(loss, hidden, weight):
    inputs = [hidden] + ([weight] if weight.requires_grad else [])
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_trainable", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 26, 1000])
def test_chunked_matches_transformers_loss(dtype, tol, head_trainable, chunk):
    hidden, weight, labels = _case(dtype, head_trainable)
    expected = ForCausalLMLoss(hidden @ weight.t(), labels, vocab_size=50)
    got = chunked_causal_lm_loss(hidden, weight, labels, chunk)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    for g, e in zip(_grads(got, hidden, weight), _grads(expected, hidden, weight)):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


def test_frozen_head_gets_no_gradient_and_scaled_upstream_gradient():
    hidden, weight, labels = _case(torch.float32, False)
    (3.0 * chunked_causal_lm_loss(hidden, weight, labels, 7)).backward()
    got = hidden.grad.clone()
    hidden.grad = None
    (3.0 * ForCausalLMLoss(hidden @ weight.t(), labels, vocab_size=50)).backward()
    torch.testing.assert_close(got, hidden.grad, rtol=1e-6, atol=1e-6)
    assert weight.grad is None


@pytest.mark.parametrize("chunk", [0, -1, MAX_LOSS_CHUNK + 1, 2.0, True])
def test_chunk_is_bounded(chunk):
    hidden, weight, labels = _case(torch.float32, False)
    with pytest.raises(LorabenchError, match="loss chunk must be an integer from 1"):
        chunked_causal_lm_loss(hidden, weight, labels, chunk)
