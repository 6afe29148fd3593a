"""Routing replay for Mixture-of-Experts models: the learner runs every sampled token through
the experts the rollout engine chose for it.

Why: an MoE router's top-k is a discontinuous function of its logits, so the rounding
differences between the engine's kernels and the learner's flip some tokens' expert choices.
The learner then scores those tokens with a different sub-network than the one that sampled
them, and the importance ratios measure routing noise rather than policy change. Replaying the
engine's choice (`learner.routing_replay: rollout`) removes that source. The gate weights still
come from the learner's own router, computed over the replayed experts exactly as the router
computes them over its own choice (softmax over all experts' logits, gathered at the chosen
ids, renormalised over the top-k where the router does), so the router keeps its gradient.

Mechanism: a forward hook on every router module rewrites the router's output (its logits
stay, its top-k ids and weights are replaced). A hook rather than reading the router's weight
here keeps ZeRO-3 working: the weight is whole only while its module runs, and the logits the
hook uses carry DeepSpeed's pre-backward wrapping, which gathers the weight again for the
backward pass. One mechanism serves every family whose router keeps the contract below; any
other router is refused with a one-line error naming the model and router classes.

Router contract (duck-typed): integer attributes `top_k` and `num_experts`, a 2-D parameter
`weight` of shape (num_experts, hidden), and a forward over (tokens, hidden) returning
(logits, top-k weights, top-k ids) or (top-k ids, top-k weights, logits) (Granite's order),
whose weights are softmax(logits) gathered at the ids, renormalised if its `norm_topk_prob`
(absent: renormalised). That last point is checked against the router's own output the first
time a router class replays, so a router with another gate (DeepSeek-V3's sigmoid scores with
a scaling factor, Phi-MoE's sparsemixer) is refused rather than trained with wrong gates.

Alignment: `routed` is (batch, seq, moe_layers, top_k), aligned with the input_ids of the
forwards run inside the context; a router sees its hidden states flattened row-major to
(batch * seq, hidden), so layer l reads routed[:, :, l].reshape(-1, top_k). Several forwards
may run inside one context only if they all take that same input (the same batch, e.g. a
no-grad scoring pass and a training pass). Under activation checkpointing the backward
recomputes the forward, so the backward must run inside the context too; recomputations replay
the same routing and are not counted again in the stats. Without it the backward may run after
the context: the replayed ids only steer the forward, whose graph keeps them. (The learner enables no activation
checkpointing over decoder layers: learner/logprobs.py checkpoints only the output layer.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

# integer attributes that MoE configs use for the number of routed experts
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# router classes (with their norm flag) whose gates were checked to be softmax-gathered
_VERIFIED: set[tuple[type, bool]] = set()


class RoutingReplayError(ValueError):
    """A model or routing that replay cannot handle; the message is one line."""


@dataclass
class RoutingStats:
    """What the forwards inside one or more replay contexts observed, for the dashboard. Each
    context adds to it on exit, so one instance can gather a whole step's micro-batches; only
    (token, layer) pairs with a replayed row (no -1) are counted, in every field.

    agree: pairs whose learner top-k set (its own router's choice, ignoring order) equals the
        replayed set. agree / total is the fraction of routing decisions the two sides share.
    total: pairs with a replayed row.
    learner_load: (layers, num_experts) float, CPU: how many of those tokens the learner's own
        router sent to each expert; each layer sums to (its counted tokens) * top_k.
    rollout_load: the same for the replayed ids.
    """

    agree: int = 0
    total: int = 0
    learner_load: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    rollout_load: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))

    @classmethod
    def empty(cls, shape: tuple[int, int, int]) -> RoutingStats:
        """Zero stats for a model of routing_shape `shape` (layers, top_k, num_experts)."""
        layers, _, experts = shape
        return cls(learner_load=torch.zeros(layers, experts), rollout_load=torch.zeros(layers, experts))

    def metrics(self) -> dict[str, float]:
        """Dashboard scalars; {} when nothing was counted. routing/agreement: agree / total.
        routing/load_tv: the total-variation distance between the learner's and the engine's
        expert-load distributions, averaged over layers (0: the same loads). routing/*_imbalance:
        the busiest expert's load over the mean load, worst layer (1: perfectly balanced).
        routing/load_{learner,rollout}/eNNN: each expert's share of the routed tokens, mean over layers."""
        if self.total == 0:
            return {}
        learner, rollout = (
            load / load.sum(-1, keepdim=True).clamp(min=1) for load in (self.learner_load, self.rollout_load)
        )
        experts = learner.shape[-1]
        out = {
            "routing/agreement": self.agree / self.total,
            "routing/pairs": float(self.total),
            "routing/load_tv": float(0.5 * (learner - rollout).abs().sum(-1).mean()),
            "routing/learner_imbalance": float(learner.max() * experts),
            "routing/rollout_imbalance": float(rollout.max() * experts),
        }
        for side, load in (("learner", learner), ("rollout", rollout)):  # each expert's share, mean over layers
            out.update({f"routing/load_{side}/e{e:03d}": float(v) for e, v in enumerate(load.mean(0).tolist())})
        return out


def _model_name(model: torch.nn.Module) -> str:
    """The model's class, seen through a DeepSpeed engine (which keeps it as `.module`)."""
    return type(getattr(model, "module", model)).__name__


def _router_like(module: torch.nn.Module) -> bool:
    return all(type(getattr(module, key, None)) is int for key in ("top_k", "num_experts"))


def _keeps_contract(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        return False
    shape = tuple(getattr(weight, "ds_shape", weight.shape))  # ZeRO-3 partitions keep the whole shape here
    return len(shape) == 2 and shape[0] == module.num_experts


def _declared_experts(model: torch.nn.Module) -> int:
    config = getattr(getattr(model, "module", model), "config", None)
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    counts = [getattr(c, key, None) for c in configs for key in _EXPERT_COUNT_KEYS]
    return max([c for c in counts if type(c) is int], default=0)


def moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router modules in layer order (module registration order); [] for a dense model.
    Raises RoutingReplayError for a router-like module (a `top_k` and a `num_experts`) that
    does not keep the contract and holds no router that does (an MoE block carrying the same
    attributes around its router is fine), and for a model whose config declares several
    experts but which has no router at all: better refused than trained as if dense."""
    named = [(name, m) for name, m in model.named_modules() if _router_like(m)]
    kept = [name for name, m in named if _keeps_contract(m)]
    for name, module in named:
        holds_router = any(k.startswith(f"{name}.") for k in kept) if name else bool(kept)
        if name in kept or holds_router:
            continue
        raise RoutingReplayError(
            f"{_model_name(model)}: router {type(module).__name__} ({name}) has no (num_experts, hidden) `weight` "
            "parameter; routing replay supports routers returning (logits, top-k weights, top-k ids) from one"
        )
    routers = [m for name, m in named if name in kept]
    if not routers and _declared_experts(model) > 1:
        raise RoutingReplayError(
            f"{_model_name(model)}: the config declares {_declared_experts(model)} experts but no router module "
            "with `top_k`, `num_experts` and a (num_experts, hidden) `weight` was found; routing replay cannot serve it"
        )
    return routers


def _shape_of(model: torch.nn.Module, routers: list[torch.nn.Module]) -> tuple[int, int, int] | None:
    if not routers:
        return None
    kinds = {(r.top_k, r.num_experts) for r in routers}
    if len(kinds) > 1:
        raise RoutingReplayError(f"{_model_name(model)}: routers differ in (top_k, num_experts): {sorted(kinds)}")
    top_k, num_experts = kinds.pop()
    return len(routers), top_k, num_experts


def routing_shape(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """(num_moe_layers, top_k, num_experts) of the model's routers, or None for a dense model:
    the last two dimensions of the routing the engine must return for replay."""
    return _shape_of(model, moe_layers(model))


def _layout(model_name: str, router: torch.nn.Module, output: object) -> tuple[int, int]:
    """(position of the logits, position of the ids) in the router's output tuple."""
    if isinstance(output, tuple) and len(output) == 3 and all(isinstance(t, torch.Tensor) for t in output):
        ints = [not (t.is_floating_point() or t.is_complex()) for t in output]
        if ints == [False, False, True]:
            return 0, 2
        if ints == [True, False, False]:
            return 2, 0
    raise RoutingReplayError(
        f"{model_name}: router {type(router).__name__} does not return (logits, top-k weights, top-k ids); "
        "routing replay cannot serve it"
    )


def _gather_gates(router: torch.nn.Module, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    gates = probs.gather(-1, ids)
    if getattr(router, "norm_topk_prob", True):
        # floored: replayed experts the learner's router gives no mass (underflow) must not make NaN
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).tiny)
    return gates


def _verify_gates(model_name: str, router: torch.nn.Module, probs: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> None:  # fmt: skip
    """Once per router class: the gate rule applied to the router's own choice must give back
    its own weights, or replayed ids would be weighted by a rule the model does not use."""
    norm = bool(getattr(router, "norm_topk_prob", True))
    if (type(router), norm) in _VERIFIED or ids.numel() == 0:
        return
    tol = 1e-5 if weights.dtype in (torch.float32, torch.float64) else 2e-2
    with torch.no_grad():
        rebuilt = _gather_gates(router, probs, ids)
        same = torch.allclose(rebuilt, weights.float(), rtol=tol, atol=tol)
    if not same:
        rule = "softmax(logits) at its top-k" + (", renormalised" if norm else "")
        raise RoutingReplayError(
            f"{model_name}: router {type(router).__name__} does not weight its experts by {rule}; "
            "routing replay cannot reproduce its gates"
        )
    _VERIFIED.add((type(router), norm))


def _not_recomputing() -> bool:
    """False while the autograd engine runs a backward pass, where a forward can only be an
    activation-checkpointing recomputation: the forward it repeats was already counted."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is None or task_id() == -1


class _Replay:
    """The state one context shares across its routers' hooks."""

    def __init__(self, model_name: str, routed: torch.Tensor, replay: bool, shape: tuple[int, int, int],
                 observe: bool):  # fmt: skip
        self.model_name, self.routed, self.replay, self.observe = model_name, routed, replay, observe
        self.layers, self.top_k, self.num_experts = shape
        self._on: dict[torch.device, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None  # (agree, total)
        self.loads: torch.Tensor | None = None  # (2, layers, num_experts): learner's, then replayed

    def rows(self, layer: int, tokens: int, device: torch.device) -> torch.Tensor:
        """The replayed (tokens, top_k) ids of one layer, moved to the router's device once."""
        if device not in self._on:
            self._on[device] = self.routed.to(device=device, dtype=torch.long)
        rows = self._on[device][:, :, layer].reshape(-1, self.top_k)
        if rows.shape[0] != tokens:
            raise RoutingReplayError(
                f"{self.model_name}: the routing covers {rows.shape[0]} tokens (batch x seq) but the router of MoE "
                f"layer {layer} saw {tokens}; routed must be aligned with the input_ids of every forward in the context"
            )
        return rows

    def hook(self, layer: int) -> Callable:
        def rewrite(router: torch.nn.Module, args: tuple, output: tuple) -> tuple | None:
            logits_at, ids_at = _layout(self.model_name, router, output)
            logits, weights, own = output[logits_at], output[1], output[ids_at]
            replayed = self.rows(layer, own.shape[0], own.device)
            valid = (replayed >= 0).all(dim=-1)
            if self.observe and _not_recomputing():
                self._count(layer, own, replayed, valid)
            if not self.replay:
                return None
            probs = torch.softmax(logits.reshape(own.shape[0], -1), dim=-1, dtype=torch.float32)
            _verify_gates(self.model_name, router, probs, own, weights)
            ids = torch.where(valid[:, None], replayed, own)
            out = list(output)
            out[ids_at] = ids
            out[1] = torch.where(valid[:, None], _gather_gates(router, probs, ids).to(weights.dtype), weights)
            return tuple(out)

        return rewrite

    @torch.no_grad()
    def _count(self, layer: int, own: torch.Tensor, replayed: torch.Tensor, valid: torch.Tensor) -> None:
        if self.counts is None:
            self.counts = torch.zeros(2, dtype=torch.long, device=own.device)
            self.loads = torch.zeros(2, self.layers, self.num_experts, device=own.device)
        own, replayed = own[valid], replayed[valid]
        same = (own.sort(dim=-1).values == replayed.sort(dim=-1).values).all(dim=-1)
        self.counts += torch.stack([same.sum(), valid.sum()])
        for side, ids in enumerate((own, replayed)):
            self.loads[side, layer] += torch.bincount(ids.flatten(), minlength=self.num_experts).float()

    def add_to(self, stats: RoutingStats) -> None:
        if self.counts is None:
            return
        agree, total = self.counts.tolist()
        stats.agree += agree
        stats.total += total
        learner, rollout = self.loads.cpu()
        stats.learner_load = learner if stats.learner_load.numel() == 0 else stats.learner_load + learner
        stats.rollout_load = rollout if stats.rollout_load.numel() == 0 else stats.rollout_load + rollout


def _checked(model_name: str, routed: torch.Tensor, shape: tuple[int, int, int]) -> None:
    layers, top_k, num_experts = shape
    if routed.dim() != 4 or routed.is_floating_point() or routed.dtype == torch.bool:
        raise RoutingReplayError(
            f"{model_name}: routed must be an integer (batch, seq, layers, top_k) tensor, "
            f"got {routed.dtype} of shape {tuple(routed.shape)}"
        )
    if tuple(routed.shape[2:]) != (layers, top_k):
        raise RoutingReplayError(
            f"{model_name}: routed has (layers, top_k) = {tuple(routed.shape[2:])}, "
            f"the model's routers {(layers, top_k)}"
        )
    if routed.numel() and (int(routed.min()) < -1 or int(routed.max()) >= num_experts):
        raise RoutingReplayError(f"{model_name}: routed ids must lie in [-1, {num_experts}) (-1: the learner's choice)")


@contextlib.contextmanager
def replay_routing(
    model: torch.nn.Module, routed: torch.Tensor | None, replay: bool, stats: RoutingStats | None = None
) -> Iterator[None]:
    """Run the forwards (and backwards) inside the context with the engine's routing.

    routed: (batch, seq, layers, top_k) integer tensor aligned with the input_ids of the
    forward(s) run inside the context; a row holding any -1 uses the learner's own choice for
    that token and layer. replay False: only observe (stats) with the learner's own routing.
    routed None: nothing to replay or observe, the context does nothing. `model` may be the
    model or its DeepSpeed engine. `stats`, when given, is added to on a normal exit (see
    RoutingStats). See the module docstring for the alignment and checkpointing rules.
    """
    if routed is None:
        yield
        return
    name = _model_name(model)
    routers = moe_layers(model)
    shape = _shape_of(model, routers)
    if shape is None:
        raise RoutingReplayError(f"{name}: a routing was given but the model has no MoE router")
    _checked(name, routed, shape)
    state = _Replay(name, routed, replay, shape, observe=stats is not None)
    handles = [router.register_forward_hook(state.hook(layer)) for layer, router in enumerate(routers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if stats is not None:
        state.add_to(stats)
