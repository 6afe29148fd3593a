"""The experts an MoE engine routes every token to, recorded inside vLLM's worker.

vLLM can return routed experts itself (`enable_return_routed_experts`), but only on its V2
model runner, which needs Triton: not on the CPU build. vLLM's routers all call a capture hook
with the top-k expert ids of every token they route (`BaseRouter.set_capture_fn`, what its own
capture binds to), so the worker binds that hook itself: each forward's ids are laid out like the
forward's tokens (requests in the input batch's order, each its scheduled tokens), and are
filed per request at the positions those tokens hold in its sequence. A token computed again
(a preemption, `update_kv: recompute`) overwrites its row: the row is the routing of the KV the
request goes on with. The engine takes a request's rows once it has finished.

Prompt tokens served from the prefix cache are not computed, so they have no row: the engine
turns prefix caching off where it records routing this way.
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import torch


class RoutingCapture:
    """Mixed into vLLM's worker: `self.model_runner` is the worker's."""

    _vespo_routes: dict[str, np.ndarray] | None = None

    def vespo_capture_routing(self, bind: bool = True) -> list[int]:
        """The MoE layers' indices among the model's layers, in order; with `bind`, first bind
        the hook on every MoE layer's router and wrap the forward that files the ids."""
        from vllm.model_executor.layers.fused_moe.layer import MoERunner

        runners = sorted((m for m in self.model_runner.model.modules() if isinstance(m, MoERunner)),
                         key=lambda m: m.layer_id)  # fmt: skip
        if bind and self._vespo_routes is None:
            self._vespo_routes, self._vespo_forward = {}, {}
            for k, runner in enumerate(runners):
                runner.router.set_capture_fn(partial(self._vespo_capture, k))
            self._vespo_layers, self._vespo_top_k = len(runners), runners[0].router.top_k if runners else 0
            execute = self.model_runner.execute_model

            def execute_and_file(scheduler_output, *args, **kwargs):
                self._vespo_forward = {}
                out = execute(scheduler_output, *args, **kwargs)
                self._vespo_file(scheduler_output)
                return out

            self.model_runner.execute_model = execute_and_file
        return [m.layer_id for m in runners]

    def _vespo_capture(self, layer: int, topk_ids: torch.Tensor) -> None:
        self._vespo_forward[layer] = topk_ids.to("cpu", torch.uint8, non_blocking=False).numpy()

    def _vespo_file(self, scheduler_output) -> None:
        """Give each scheduled request its tokens' rows: the forward laid the requests out in the
        input batch's order, each with its scheduled tokens, from its computed-token count on."""
        if len(self._vespo_forward) != self._vespo_layers:
            return  # no forward ran (nothing scheduled), or not every MoE layer routed
        rows = np.stack([self._vespo_forward[k] for k in range(self._vespo_layers)], axis=1)  # (tokens, L, K)
        batch, at = self.model_runner.input_batch, 0
        for i, rid in enumerate(batch.req_ids):
            count = scheduler_output.num_scheduled_tokens.get(rid, 0)
            start = int(batch.num_computed_tokens_cpu[i])
            routes = self._vespo_routes.setdefault(rid, _Routes(np.zeros((0, *rows.shape[1:]), np.uint8)))
            routes.put(start, rows[at : at + count])
            at += count

    def vespo_take_routing(self, request_id: str) -> dict[int, tuple[bytes, int]]:
        """The rows of request_id's samples (vLLM names sample i of a request "i_<id>-<suffix>"),
        by sample index, as (uint8 bytes, tokens); forgotten once taken."""
        own = re.compile(rf"^(?:(\d+)_)?{re.escape(request_id)}(?:-[0-9a-f]+)?$")
        out = {}
        for rid in [r for r in self._vespo_routes or {} if own.match(r)]:
            routes = self._vespo_routes.pop(rid)
            out[int(own.match(rid).group(1) or 0)] = (routes.rows[: routes.tokens].tobytes(), routes.tokens)
        return out


class _Routes:
    """One request's rows, grown as its tokens are computed; `tokens`: how many are filed."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.tokens = rows, 0

    def put(self, start: int, rows: np.ndarray) -> None:
        end = start + len(rows)
        if end > len(self.rows):
            grown = np.zeros((max(end, 2 * len(self.rows)), *self.rows.shape[1:]), np.uint8)
            grown[: len(self.rows)] = self.rows
            self.rows = grown
        self.rows[start:end] = rows
        self.tokens = max(self.tokens, end)
