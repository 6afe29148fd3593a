"""Rollout configuration: sampling, engine sizing and the weight-update policy."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field

from configtypes import AtLeast0, AtLeast1, ConfigError, NonNegative, Positive, section
from rollout.preload import PreloadLibs
from runtime.cores import Cores

Backend = Literal["vllm", "transformers", "auto"]
# what rollout.engine.resolve_dtype turns into a torch dtype
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


@section("rollout")
class RolloutConfig:
    model_path: str = ""  # a local Hugging Face causal-LM directory (the learner's starting point)
    backend: Backend = "vllm"  # vllm | transformers | auto (vLLM, falling back to transformers if it cannot start)
    n: AtLeast1 = 8  # samples per prompt (one GRPO group)
    temperature: NonNegative = 1.0  # 0 is greedy: for `vespo eval`, not for training
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: AtLeast0 = 0  # 0 disables
    max_new_tokens: AtLeast1 = 32
    # prompt + response tokens; prompts longer than max_model_len - max_new_tokens are refused
    max_model_len: AtLeast1 = 512
    # auto: bfloat16 on GPU and on CPUs with native bf16 (avx512_bf16 or AMX), else float32
    # (rollout.engine.resolve_dtype; bench/dtype.py has the speed and mismatch figures)
    dtype: Dtype = "auto"
    seed: AtLeast0 = 0
    partial_rollout: bool = True  # on an update, pause in-flight requests and resume them under the new weights
    # vLLM, on an update: paused requests resume on the keys and values cached so far ("keep"), or
    # are preempted and their KV recomputed under the new weights ("recompute"); docs/rollout.md
    update_kv: Literal["keep", "recompute"] = "keep"
    max_num_seqs: AtLeast1 = 64  # sequences one engine decodes together
    prefix_caching: bool = True  # a new request never reuses KV cached under earlier weights
    # vLLM sizing: KV cache memory in GiB on CPU, the GPU memory fraction on GPU
    kv_cache_gb: Positive = 1.0
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.85
    tensor_parallel_size: AtLeast1 = 1
    # the learner's adapter rank: engines serve its adapter from a LoRA slot; 0: updates are full
    # weights. Unset, the run config derives it from learner.lora
    lora_rank: AtLeast0 | None = None
    # CPU vLLM: LD_PRELOAD libiomp5 and tcmalloc, where found, into the engine process (rollout.preload;
    # docs/benchmarks.md has the gain); off leaves vLLM to preload torch's libgomp itself
    preload_libs: PreloadLibs = "auto"
    enforce_eager: bool = True  # CUDA graphs off: faster start, slower decode; set False for long GPU runs
    # transformers fallback: tokens generated between checks for a pending weight update
    hf_chunk_tokens: AtLeast1 = 16
    # Ray resources of one engine actor
    num_cpus: NonNegative = 1.0
    num_gpus: NonNegative = 0.0
    # the cores of each engine (engine i takes cpu_cores[i]), each as many as num_cpus; empty: the
    # run picks disjoint ones on a one-machine CPU cluster (train.pin_cores), else not pinned
    cpu_cores: list[Cores] = field(default_factory=list)
    # Ray restarts a dead engine actor up to this many times in a run (the controller then
    # re-forms the weight group, sends current weights and requeues the prompts it held);
    # one death more stops the run with how to resume.
    max_restarts: AtLeast0 = 3
    # throughput benchmarks only: every response's length is drawn from a log-normal law of this
    # median (tokens) and log-space spread, clipped at max_new_tokens, and imposed on vLLM with
    # min_tokens = max_tokens; 0 leaves lengths to the model (end-of-sequence), as training wants
    imposed_median_tokens: AtLeast0 = 0
    imposed_length_sigma: Positive = 1.0
    _derived: tuple[str, ...] = field(default=(), repr=False, compare=False)  # keys the run config filled in

    def __post_init__(self) -> None:
        if self.imposed_median_tokens and self.backend == "transformers":
            raise ConfigError("rollout.imposed_median_tokens needs rollout.backend vllm (it sets vLLM's min_tokens)")
        if self.max_model_len <= self.max_new_tokens:
            raise ConfigError(
                f"rollout.max_model_len ({self.max_model_len}) must exceed rollout.max_new_tokens "
                f"({self.max_new_tokens}): prompts need room"
            )

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_model_len - self.max_new_tokens
