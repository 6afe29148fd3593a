"""Methods added to every vLLM worker (`worker_extension_cls`), called through collective_rpc.

They run in the worker process, next to the model: joining the learner's weight group and
loading what it broadcasts in place, without restarting the engine. Loading goes through
vLLM's `reload_weights`, which maps checkpoint names onto fused layers (qkv, gate_up) and
re-runs the kernel-format processing some backends (CPU among them) apply after loading.
"""

from __future__ import annotations

from learner import weight_broadcast as wb


class VespoWorkerExtension:
    """Mixed into vLLM's worker class: `self.model_runner`, `self.rank` and `self.device` are the worker's."""

    _vespo_group: wb.WeightGroup | None = None

    def vespo_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> int:
        rank = rank_offset + self.rank  # one receiver per tensor-parallel shard
        self._vespo_group = wb.open_group(host, port, rank, world_size, backend)
        return rank

    def vespo_receive_weights(self, plan_wire: list) -> int:
        """Receive one broadcast (the plan says what comes) and load it; returns bytes received."""
        if self._vespo_group is None:
            raise RuntimeError("vespo_init_weight_group must run before weights can be received")
        plan = wb.plan_from_wire(plan_wire)
        group = self._vespo_group

        def named():
            for bucket in wb.receive(group, plan, self.device):
                yield from bucket

        self.model_runner.reload_weights(weights_iterator=named())
        return sum(wb.bucket_bytes_of(b) for b in plan)

    def vespo_load_weights_file(self, path: str) -> int:
        """The object-store path: the actor wrote the weights to a node-local safetensors file
        (tensors do not survive vLLM's RPC as tensors); read one tensor at a time."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            self.model_runner.reload_weights(weights_iterator=((n, f.get_tensor(n).to(self.device)) for n in names))
        return len(names)

    def vespo_weights(self, names: list[str] | None = None) -> bytes:
        """The engine's parameters by vLLM name (fused layers stay fused), for checks; as
        safetensors bytes, which survive vLLM's RPC exactly (tensors in it become lists)."""
        from safetensors.torch import save

        params = dict(self.model_runner.model.named_parameters())
        return save({n: params[n].detach().cpu().contiguous() for n in (names or params)})
