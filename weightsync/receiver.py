"""The engines' side of the weight sync: methods added to every vLLM worker (`worker_extension_cls`),
called through collective_rpc.

They run in the worker process, next to the model: joining the learner's weight group and
loading what it broadcasts in place, without restarting the engine. The learner sends its
transformers names; those vLLM's loader does not take as they are (Mixture-of-Experts
families whose checkpoint names differ from transformers' fused ones, e.g. Mixtral) are
converted to the checkpoint's on the way in (weightsync.vllm_names). Loading goes through
vLLM's `reload_weights`, which maps checkpoint names onto fused layers (qkv, gate_up) and
re-runs the kernel-format processing some backends (CPU among them) apply after loading;
the CPU packing it leaves stale (tied output layers, MoE experts) is redone here. Under LoRA
an update is the adapter alone, loaded into vLLM's LoRA slot in memory (weightsync.adapter).
"""

from __future__ import annotations

import torch

from weightsync import transport as wb
from weightsync.adapter import is_adapter, load_into_vllm
from weightsync.moe_repack import repack_cpu_moe_experts
from weightsync.vllm_names import LearnerNames


class VespoWorkerExtension:
    """Mixed into vLLM's worker class: `self.model_runner`, `self.rank` and `self.device` are the worker's."""

    _vespo_group: wb.WeightGroup | None = None
    _vespo_names: LearnerNames | None = None

    def vespo_init_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, secret: str, bind: str
    ) -> int:
        """Join as one receiver per tensor-parallel shard, proving the group's secret (hex)."""
        rank = rank_offset + self.rank
        if self._vespo_group is not None:
            self._vespo_group.close()  # a new group replaces the old one (and its shared region)
        self._vespo_group = wb.open_group(host, port, rank, world_size, backend, secret, bind=bind)
        return rank

    def vespo_receive_weights(self, plan_wire: list) -> int:
        """Receive one update (the plan says what comes) and load it; returns bytes received. On
        the learner's node the tensors are views of its shared region: `reload_weights` copies
        them into the model's own parameters (and repacks them), so nothing keeps the views."""
        if self._vespo_group is None:
            raise RuntimeError("vespo_init_weight_group must run before weights can be received")
        plan = wb.plan_from_wire(plan_wire)
        group = self._vespo_group

        def named():
            for bucket in wb.receive(group, plan, self.device):
                yield from bucket

        self._vespo_load(named(), [spec.name for bucket in plan for spec in bucket])
        return sum(wb.bucket_bytes_of(b) for b in plan)

    def vespo_load_weights_file(self, path: str) -> int:
        """The object-store path: the actor wrote the weights to a node-local safetensors file
        (tensors do not survive vLLM's RPC as tensors); read one tensor at a time."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            self._vespo_load(((n, f.get_tensor(n).to(self.device)) for n in names), names)
        return len(names)

    def _vespo_load(self, named, names: list[str]) -> None:
        """An adapter (learner.lora) goes into vLLM's LoRA slot; full weights replace the model's."""
        if is_adapter(names):
            load_into_vllm(self.model_runner, named)
            return
        self.model_runner.reload_weights(weights_iterator=self._vespo_learner_names().to_vllm(named, names))
        self._vespo_repack()

    def _vespo_learner_names(self) -> LearnerNames:
        """How this worker's model takes the learner's names; built on the first update (a
        meta-device transformers model of the config: no weights) and kept."""
        if self._vespo_names is None:
            self._vespo_names = LearnerNames(self.model_runner.get_model(), self.model_runner.model_config.hf_config)
        return self._vespo_names

    def vespo_converted_names(self, names: list[str]) -> list[str]:
        """Which of these learner names this worker converts to checkpoint names before loading
        (sorted), for checks: none for dense models and Qwen3-MoE."""
        return sorted(self._vespo_learner_names().converted(names))

    def _vespo_repack(self) -> None:
        """Redo the CPU backend's kernel-format packing that `reload_weights` leaves stale."""
        if self.device.type != "cpu":
            return  # CUDA kernels read the reloaded parameters as they are
        self._vespo_repack_tied_output()
        repack_cpu_moe_experts(self.model_runner.model)

    def _vespo_repack_tied_output(self) -> None:
        """vLLM's CPU backend packs every GEMM weight into a oneDNN handle when it loads. With tied
        embeddings the output layer (lm_head) shares the embedding's matrix but is not loaded by
        name (checkpoints carry the matrix once), so `reload_weights` updates the shared matrix and
        leaves the output layer's packed copy of the old one: logits would come from the old
        weights. Repack from the current matrix every layer that keeps its weight beside a packed
        handle (embeddings used as output layers; linear layers drop theirs and are repacked on load)."""
        if self.device.type != "cpu":
            return  # CUDA reads the shared parameter itself
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for module in self.model_runner.model.modules():
            weight = getattr(module, "weight", None)
            keeps_weight = isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel() > 0
            if hasattr(module, "cpu_linear") and keeps_weight:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)

    def vespo_weights(self, names: list[str] | None = None) -> bytes:
        """The engine's parameters by vLLM name (fused layers stay fused), for checks; as
        safetensors bytes, which survive vLLM's RPC exactly (tensors in it become lists)."""
        from safetensors.torch import save

        params = dict(self.model_runner.model.named_parameters())
        return save({n: params[n].detach().cpu().contiguous() for n in (names or params)})
