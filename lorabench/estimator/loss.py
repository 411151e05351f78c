"""Memory of the output head's logits and the causal-LM loss: transformers' standard loss, the chunked loss
(lorabench.nn.loss) and Liger's fused linear cross-entropy. Pure Python: no torch import.
"""

from __future__ import annotations

import math
from typing import Tuple

from lorabench.methods import Method
from lorabench.estimator.setup import FLOAT_BYTES, TrainingSetup
from lorabench.models.spec import ModelSpec


def liger_chunk_tokens(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk of Liger's fused linear cross-entropy: next_pow2(ceil(BT / ceil(V / H))), at most BT
    (liger_kernel/ops/fused_linear_cross_entropy.py, chunk_mem_const 1)."""
    return min(tokens, 1 << max(0, math.ceil(math.log2(-(-tokens // -(-vocab // hidden))))))


def loss_bytes(spec: ModelSpec, method: Method, setup: TrainingSetup) -> Tuple[int, int, int, int]:
    """Bytes of the output head's logits and the loss beyond the saved activations: (held by the model
    output through backward, at the forward peak, at the start of backward, kept when forward returns)."""
    a, t, d, v = setup.act_bytes, setup.tokens, spec.hidden_size, spec.vocab_size
    up = 4 if a < 4 else 0  # bytes per logit of an fp32 copy of logits in a lower precision
    head_grad = v * d * FLOAT_BYTES.get(setup.dtype, 2) if method.base_trainable else 0
    if setup.loss == "chunked":
        # lorabench.nn.loss: per-token log-sum-exp (fp32) kept from forward; one chunk's logits at a time,
        # as the product and its fp32 copy (forward) or the fp32 softmax gradient and its cast (backward);
        # backward makes d_hidden whole and d_weight (a trainable head) before the first chunk.
        chunk = (a + up) * min(setup.loss_chunk, t) * v
        return 0, 4 * t + t + chunk, 4 * t + a * t * d + head_grad + chunk, 4 * t
    if setup.loss == "fused-linear":
        # Liger's LigerFusedLinearCrossEntropyFunction (liger_kernel/ops/fused_linear_cross_entropy.py):
        # forward allocates d_hidden (zeros_like input) and d_weight (a trainable head), loss_1d (fp32) and
        # a target mask, and runs chunks of next_pow2(ceil(BT / ceil(V / H))) tokens; the kernel writes each
        # chunk's logit gradients over its logits. fp32 weights add d_weight's product before it is added
        # in. It keeps d_hidden and d_weight for backward; the hidden states it read are not kept.
        chunk = liger_chunk_tokens(t, d, v)
        kept = a * t * d + head_grad
        temp = head_grad if method.base_trainable and a == 4 else 0
        return 0, a * t * d + kept + 4 * t + t + a * chunk * v + temp, kept, kept
    # Logits and loss as transformers computes them: logits (a V) are upcast to fp32 (4 V) and
    # cross_entropy = log_softmax (keeps its fp32 output, 4 V) + nll_loss. In backward, nll_loss's
    # gradient (4 V) and log_softmax's input gradient (4 V) are alive with the kept output. While the loss
    # is computed, transformers' causal-LM forward still holds the decoder's output (last_hidden_state,
    # stream-wide); lorabench.nn's has let go of it.
    held = a * v
    last_hidden = setup.stream_bytes * d if setup.impl == "peft" else 0
    # Gemma 2 soft-caps the logits, cap * tanh(logits / cap): tanh keeps its output (a V) until backward.
    capped = a * v if spec.final_softcap else 0
    # The plain loop keeps the model's output (its logits) until the step ends; Trainer.training_step keeps
    # only the loss: the output is gone before backward.
    kept = held if setup.loop == "plain" else 0
    return (t * kept, t * (held + up * v + 4 * v + capped + last_hidden), t * (kept + 12 * v + capped),
            t * (kept + 4 * v + capped))
