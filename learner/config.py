"""Learner configuration: one typed record, validated when built."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from configtypes import AtLeast0, AtLeast1, NonEmpty, NonNegative, Positive, section
from learner import advantages
from learner.objectives import check_objective, make_config
from runtime.cores import Cores

Beta = Annotated[float, Field(ge=0, lt=1)]  # Adam's moment decay rates
# the attention and MLP projections of Llama-like models (Qwen, Mistral, SmolLM name them alike)
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _known_advantage(name: str) -> str:
    if name not in advantages.ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {', '.join(advantages.ADVANTAGES)}")
    return name


@section("learner.lora")
class LoraConfig:
    """A low-rank adapter trained instead of the whole model (learner/lora.py); weight syncs
    carry the adapter alone, which the engines serve from memory (weightsync/adapter.py)."""

    rank: AtLeast1 = 8
    # unset: 2 x rank, so the adapter's scale alpha / rank stays 2 whatever the rank: changing
    # the rank alone then leaves the step size of the merged weights about where it was
    alpha: Positive | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # on the adapter's input, in training only
    # the base model's module names (the last part: "q_proj" matches every layer's q_proj)
    target_modules: Annotated[list[NonEmpty], Field(min_length=1)] = field(default_factory=lambda: [*LLAMA_PROJECTIONS])

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha is None else self.alpha


@section("learner")
class LearnerConfig:
    model_path: str = ""  # a local Hugging Face causal-LM directory (the run config fills it from `model`)
    world_size: AtLeast1 = 1  # DeepSpeed data-parallel processes (one Ray actor each)
    zero_stage: Literal[0, 1, 2, 3] = 0
    objective: Annotated[str, AfterValidator(check_objective)] = "vespo"
    objective_config: dict[str, Any] = field(default_factory=dict)  # options of that objective
    lr: Positive = 1e-6
    weight_decay: NonNegative = 0.0
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: Positive = 1e-8
    warmup_steps: AtLeast0 = 0  # linear warm-up from 0 to lr, then constant
    grad_clip: NonNegative = 1.0  # max global grad norm; 0 disables
    micro_batch_tokens: AtLeast1 = 8192  # token budget (rows x row length) of one forward/backward
    # several sequences per row, each attending only to itself (learner/packing.py), so no compute
    # goes to padding; False pads every row to the longest of its micro-batch
    pack_sequences: bool = True
    bf16: bool = False  # bf16 weights and activations, fp32 master weights (GPU, or CPU: docs/learner.md)
    seed: AtLeast0 = 0
    # engines on rank 0's node take weight updates from shared memory (/dev/shm; CUDA IPC on GPUs)
    # instead of the weight group's broadcast; false sends every engine the broadcast
    weight_sync_shm: bool = True
    # the temperature of the policy the learner scores, which must be the engines' (log-probs are of
    # the tempered policy); unset, the run config derives it from rollout.temperature
    temperature: Positive | None = None
    advantage: Annotated[str, AfterValidator(_known_advantage)] = "grpo"  # the estimator (learner/advantages.py)
    # MoE models: "rollout" runs every sampled token through the experts the engine routed it to
    # (gate weights still from the learner's router, so it keeps learning); docs/learner.md
    routing_replay: Literal["off", "rollout"] = "off"
    # null: every weight trains; a record ({rank, alpha, dropout, target_modules}) trains a LoRA adapter
    lora: LoraConfig | None = None
    normalize_adv_std: bool = True  # GRPO advantages divided by the group std
    num_cpus_per_worker: NonNegative = 1.0
    num_gpus_per_worker: NonNegative = 0.0
    # the cores of each rank (rank r takes cpu_cores[r]), each as many as num_cpus_per_worker;
    # empty: the run picks them (train.pin_cores) or leaves the rank unpinned
    cpu_cores: list[Cores] = field(default_factory=list)
    _derived: tuple[str, ...] = field(default=(), repr=False, compare=False)  # keys the run config filled in

    def __post_init__(self) -> None:
        make_config(self.objective, self.objective_config)  # its options are checked like the rest

    @property
    def policy_temperature(self) -> float:
        """temperature, or 1.0 (plain sampling) for a learner made without a run config."""
        return 1.0 if self.temperature is None else self.temperature
