"""Shared pieces of the rollout tests: the tiny model, reference log-probs, a test-side weight sender."""

from __future__ import annotations

import ray
import torch

from learner.logprobs import token_logprobs
from vespo.models.tiny import tiny_model
from weightsync.sender import WeightBroadcaster
from weightsync.transport import plan_to_wire


def model_dir() -> str:
    return str(tiny_model())


def load_model(path: str, state_dict: dict[str, torch.Tensor] | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def random_weights(path: str, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Fresh random weights of the tiny model's shape: near-uniform next-token distributions,
    so responses rarely stop early (long generations, for partial-rollout tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    return {k: v.detach().clone() * (scale if k == "lm_head.weight" else 1.0) for k, v in model.state_dict().items()}


@torch.no_grad()
def reference_logprobs(model, prompt_ids, response_ids, temperature: float = 1.0) -> torch.Tensor:
    """log p(response token | prefix) from a transformers forward pass over the same tokens."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    if temperature != 1.0:
        raise NotImplementedError
    lp = token_logprobs(model, ids, torch.ones_like(ids))[0]
    return lp[len(prompt_ids) - 1 :]


class Sender:
    """The learner's end of the weight group, driven from the test process."""

    def __init__(self, actors: list, receivers_each: int = 1):
        self.actors = actors
        self.bc = WeightBroadcaster(len(actors) * receivers_each, bucket_bytes=256 << 10, device=torch.device("cpu"))
        joins = [
            a.init_weight_group.remote(
                self.bc.host, self.bc.port, 1 + i * receivers_each, self.bc.world_size, "gloo", self.bc.secret
            )
            for i, a in enumerate(actors)
        ]
        self.bc.connect()
        ray.get(joins)

    def send(self, state_dict: dict[str, torch.Tensor], version: int) -> list[dict]:
        plan = self.bc.plan(state_dict.items())
        refs = [a.receive_weights.remote(plan_to_wire(plan), version) for a in self.actors]
        self.stats = self.bc.broadcast(state_dict.items(), plan)
        return ray.get(refs)
