"""The choice between vLLM and the transformers fallback: the one place that knows both engines."""

from __future__ import annotations

import logging

from rollout.config import RolloutConfig
from rollout.engine import Engine

log = logging.getLogger(__name__)


async def start_engine(cfg: RolloutConfig) -> Engine:
    """The configured engine, started. "auto" falls back to transformers when vLLM cannot start,
    and says so loudly: the fallback is correct but several times slower."""
    if cfg.backend in ("vllm", "auto"):
        from rollout.vllm_engine import VllmEngine

        engine: Engine = VllmEngine(cfg)
        try:
            await engine.start()
            return engine
        except Exception as err:
            if cfg.backend == "vllm":
                raise
            log.error(
                "vLLM could not start (%s: %s); FALLING BACK to the transformers engine, which is much slower. "
                "Set rollout.backend=vllm to make this an error.",
                type(err).__name__,
                err,
            )
    from rollout.hf_engine import TransformersEngine

    log.warning("rollout engine: transformers generate (the fallback path, not vLLM)")
    engine = TransformersEngine(cfg)
    await engine.start()
    return engine
