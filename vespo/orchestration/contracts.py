"""What the training loop needs of an engine, the buffer and the learner, and nothing more.

The orchestration (fleet, sources, weight sync, loop) talks only to these. The real components
reach it through `vespo.orchestration.ray_components` (Ray actors: vLLM engines, the replay-buffer actor, the
DeepSpeed learner group); `tests/fakes.py` has in-process ones behind the same methods, so the
scheduling logic (admission, requeue, recovery, sync-N rounds, stop, resume) is tested in
seconds without Ray or vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from buffer.replay import Batch
    from learner.step_result import StepResult
    from rollout.records import PromptItem, RolloutResult

# a group that failed inside a live engine: (group id, reason, refused). A refused prompt (too
# long, empty) never works; another failure may on a retry.
Failure = tuple[str, str, bool]


class EngineDown(RuntimeError):
    """The engine is gone for now: Ray is restarting it, or it came back without an engine."""


class EngineLost(RuntimeError):
    """An engine died for good (out of restarts) or did not come back in time."""


class Pending(Protocol):
    """A call under way (a Ray object ref, or a finished in-process call)."""

    def result(self, timeout: float | None = None) -> Any: ...


class Done:
    """A call that finished where it was made (in-process components)."""

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value, self.error = value, error

    def result(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Engine(Protocol):
    name: str

    def start(self) -> Pending: ...  # -> {"backend", "startup_s", "receivers"}

    def restart(self, timeout_s: float) -> dict: ...  # wait until Ray has it back, start it; EngineLost

    def poll(self) -> tuple[int, list[Failure]]: ...  # groups in flight (-1: no engine), failures since

    def submit(self, items: list[PromptItem]) -> None: ...  # generate into the buffer, fire and forget

    def generate(self, items: list[PromptItem], n: int | None = None) -> RolloutResult: ...

    def set_buffer(self, buffer: Buffer) -> None: ...

    def join_weight_group(
        self, host: str, port: int, offset: int, world: int, backend: str, secret: str
    ) -> Pending: ...

    def receive_weights(self, plan: list, version: int) -> Pending: ...

    def stats(self) -> Any: ...  # tokens, generate_s (rollout.actor.RolloutStats)

    def drain(self) -> None: ...

    def shutdown(self) -> None: ...


class Buffer(Protocol):
    def admit(self, current_version: int, wanted: int) -> int: ...  # how many of `wanted` may start

    def abandon(self, n_groups: int) -> None: ...

    def get_batch(
        self, n_groups: int, current_version: int, timeout: float | None = 0.0, at_least: int | None = None
    ) -> Batch | None: ...

    def seen_groups(self, group_ids: list[str]) -> list[str]: ...

    def snapshot_seen_groups(self, directory: str | Path) -> list[str]: ...

    def metrics(self) -> dict[str, float]: ...

    def set_staleness_cap(self, cap: int | None) -> None: ...  # within max_staleness; None: that alone

    def shutdown(self) -> None: ...


class Learner(Protocol):
    def train(self, batch: Batch, pad_id: int, recompute_old_logprobs: bool = False) -> StepResult: ...

    def open_weight_sync(self, num_receivers: int, bucket_bytes: int) -> tuple[str, int, str]: ...

    def connect_weight_sync(self) -> Pending: ...

    def weight_plan(self) -> list: ...

    def broadcast_weights(self, plan: list) -> Pending: ...

    def refused(self) -> tuple[int, list[str]]: ...

    def save_checkpoint(self, root: Path, step: int, version: int, extra: dict, keep: int) -> Path: ...

    def load_checkpoint(self, path: Path) -> Any: ...  # -> a record with .step

    def rebuild(self, cfg: Any) -> None: ...  # start over from the model (LearnerConfig)

    def shutdown(self) -> None: ...
