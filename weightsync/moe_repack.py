"""Re-pack a CPU vLLM engine's Mixture-of-Experts weights after an in-place weight reload.

vLLM's CPU backend keeps each MoE layer's expert weights (`w13_weight`, `w2_weight`) in the
grouped-GEMM layout its fused-MoE kernel reads, packed once when the model first loads
(`CPUUnquantizedExperts.process_weights_after_loading`). `reload_weights` (vLLM 0.32) copies
the new weights into the same storage in the plain checkpoint layout and skips that packing
on an update (it only re-runs it on the first load), so the kernel would read plain rows as
packed ones: log-probs off by several nats even when the weights did not change. Packing the
plain tensors again, into the same storage, restores what a fresh load would hold. GPU
backends do their layout conversion inside the reload and need nothing here.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def repack_cpu_moe_experts(model: torch.nn.Module) -> int:
    """Pack every CPU fused-MoE layer's freshly reloaded expert weights; returns how many
    layers were packed. Call it once after each `reload_weights`, never twice (packing is
    not idempotent)."""
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    packed = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        # zentorch reads the plain layout; anything else (quantized experts) is not ours to touch
        if not isinstance(experts, CPUUnquantizedExperts) or experts._use_zentorch:
            continue
        for name in ("w13_weight", "w2_weight"):
            weight = getattr(module, name)
            weight.data.copy_(cpu_prepack_moe_weight(weight.data, experts.isa))
        packed += 1
    return packed
