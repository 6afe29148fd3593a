"""Rollout configuration: sampling, engine sizing and the weight-update policy."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("vllm", "transformers", "auto")


@dataclass
class RolloutConfig:
    model_path: str = ""  # a local Hugging Face causal-LM directory (the learner's starting point)
    backend: str = "vllm"  # vllm | transformers | auto (vLLM, falling back to transformers if it cannot start)
    n: int = 8  # samples per prompt (one GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    max_new_tokens: int = 32
    max_model_len: int = 512  # prompt + response tokens; prompts longer than max_model_len - max_new_tokens are refused
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    seed: int = 0
    partial_rollout: bool = True  # on an update, pause in-flight requests and resume them under the new weights
    max_num_seqs: int = 64  # sequences one engine decodes together
    prefix_caching: bool = True  # the cache is invalidated on every weight update
    # vLLM sizing: KV cache memory in GiB on CPU, the GPU memory fraction on GPU
    kv_cache_gb: float = 1.0
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    enforce_eager: bool = True  # CUDA graphs off: faster start, slower decode; set False for long GPU runs
    # transformers fallback: tokens generated between checks for a pending weight update
    hf_chunk_tokens: int = 16
    # Ray resources of one engine actor
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Ray restarts a dead engine actor up to this many times in a run (the controller then
    # re-forms the weight group, sends current weights and requeues the prompts it held);
    # one death more stops the run with how to resume.
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"rollout.max_restarts must be >= 0, got {self.max_restarts}")
        if self.backend not in BACKENDS:
            raise ValueError(f"rollout.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.n < 1:
            raise ValueError(f"rollout.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0 (0 disables), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_model_len <= self.max_new_tokens:
            raise ValueError(
                f"rollout.max_model_len ({self.max_model_len}) must exceed max_new_tokens ({self.max_new_tokens}): "
                "prompts need room"
            )
        if self.tensor_parallel_size < 1 or self.max_num_seqs < 1 or self.hf_chunk_tokens < 1:
            raise ValueError("rollout.tensor_parallel_size, max_num_seqs and hf_chunk_tokens must be >= 1")
        if self.kv_cache_gb <= 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("rollout.kv_cache_gb must be > 0 and gpu_memory_utilization in (0, 1]")

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_model_len - self.max_new_tokens
