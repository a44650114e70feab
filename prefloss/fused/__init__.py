"""The fused log-prob op: per-token log-softmax at the label of the policy (and the reference and
ε-DPO's two logit mixtures), from hidden states and LM-head weights, chunk by chunk.

- `op`: the autograd Function, the public `fused_logprobs` / `sequence_logprobs`, their input checks
  and the backend choice;
- `torch_backend`, `triton_backend`: the two backends (chunked PyTorch; Triton row kernels);
- `tile_math`: the torch backend's per-tile arithmetic (compiled with ``torch.compile`` on CPU);
- `rows`: the row contract the Triton kernels implement, stated in PyTorch;
- `segments`: packed (padding-free) batches: ``cu_seqlens`` checks, packing, per-sequence sums;
- `chunks`: counted-row selection and gradient buffers shared by both backends;
- `custom_ops`: the Triton launchers of `prefloss.kernels` as ``torch.library`` custom ops.
"""

from prefloss.fused.op import SequenceLogProbs, TokenLogProbs, fused_logprobs, sequence_logprobs

__all__ = ["SequenceLogProbs", "TokenLogProbs", "fused_logprobs", "sequence_logprobs"]
