"""`vespo eval`: score a model or a training checkpoint on the task's held-out split.

It uses the run config's task and rollout settings and one rollout engine (vLLM, or the
configured fallback), so the numbers are those `eval/*` shows during training, and a base
model and any checkpoint can be compared on equal terms:

    vespo eval                                           # the embedded run's starting model
    vespo eval --checkpoint runs/vespo/checkpoints       # its latest checkpoint (LoRA: adapter merged in)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

import configtypes
from learner import checkpoint
from vespo.config import run_config


@dataclass
class EvalResult:
    model: str
    prompts: int
    samples_per_prompt: int
    temperature: float
    mean_reward: float
    accuracy: float  # share of samples with reward >= 1
    pass_at_k: float  # share of prompts with at least one sample at reward >= 1
    mean_response_tokens: float
    failed_prompts: int
    reward_errors: int = 0  # samples whose reward failed (scored 0, counted here)
    first_reward_error: str | None = None
    examples: list[dict] = field(default_factory=list)  # a few (prompt, response, reward) to read
    episodes: dict[str, float] = field(default_factory=dict)  # multi-turn tasks: turns, tool use (episode/...)


def checkpoint_model(path: str | Path) -> str:
    """The Hugging Face model inside a checkpoint: a step directory (with model/) or a
    checkpoints root (the step its `latest` names). The checkpoint is verified first (every
    file against its manifest), so a half-written step_N.tmp or a truncated one is refused
    with CheckpointError rather than evaluated. A LoRA checkpoint (adapter/, no base weights)
    is merged into its base model, written to a temporary directory removed at exit."""
    from learner.checkpoint.reader import ADAPTER_CONFIG, ADAPTER_DIR, MODEL_DIR

    found = checkpoint.latest(path)
    if (found / MODEL_DIR / "config.json").is_file():
        return str(found / MODEL_DIR)
    if not (found / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        raise checkpoint.CheckpointError(
            f"checkpoint {found} has no exported model ({MODEL_DIR}/config.json) and no LoRA adapter ({ADAPTER_DIR}/)"
        )
    import atexit
    import shutil
    import tempfile

    from learner.checkpoint.adapter import merge_into_base

    merged = tempfile.mkdtemp(prefix=f"vespo-eval-{found.name}-merged-")
    atexit.register(shutil.rmtree, merged, ignore_errors=True)
    merge_into_base(found / ADAPTER_DIR, merged)
    _MERGED[merged] = f"{found} (LoRA adapter merged into its base model)"
    return merged


_MERGED: dict[str, str] = {}  # checkpoint_model's merged directories -> what to call them


def evaluate(
    cfg: run_config.RunConfig, model: str | None = None, prompts: int | None = None, samples: int = 1,
    show: int = 3,
) -> EvalResult:  # fmt: skip
    """Generate `samples` responses for the first `prompts` held-out problems and score them;
    `show` of them are kept, decoded, in the result."""
    import ray

    from rollout.actor import rollout_actor
    from rollout.tasks.registry import make_task
    from vespo.models import resolve_model
    from vespo.orchestration.prompts import prompt_item
    from vespo.orchestration.ray_start import init_ray
    from vespo.reporting.eval_score import score
    from vespo.reporting.examples import examples

    model_path = resolve_model(model or cfg.model)
    cfg.rollout.model_path = model_path
    task = make_task(cfg.task)
    held_out = task.samples("eval")[: prompts or cfg.train.eval_prompts]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    items = [prompt_item(f"eval-{s.id}", s, tokenizer, cfg.task.system_prompt) for s in held_out]
    was_up = ray.is_initialized()
    init_ray(cfg)
    actor = rollout_actor(cfg.rollout, cfg.task, "eval-engine")
    try:
        ray.get(actor.start.remote())
        result = ray.get(actor.generate.remote(items, samples))
    finally:
        ray.get(actor.shutdown.remote())
        ray.kill(actor)
        if not was_up:
            ray.shutdown()
    scored = score(result.trajectories)
    return EvalResult(
        model=model_path,
        prompts=scored.prompts,
        samples_per_prompt=samples,
        temperature=cfg.rollout.temperature,
        mean_reward=scored.mean_reward,
        accuracy=scored.accuracy,
        pass_at_k=scored.pass_at_k,
        mean_response_tokens=scored.mean_response_tokens,
        failed_prompts=len(result.errors),
        reward_errors=len(scored.reward_errors),
        first_reward_error=scored.reward_errors[0] if scored.reward_errors else None,
        examples=[asdict(e) for e in examples(result.trajectories[::samples], tokenizer, show)],
        episodes=scored.episodes,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vespo eval", description=__doc__.split("\n\n")[0])
    run_config.add_config_arguments(parser, "YAML run config (default: the embedded tiny run)", "rollout.temperature=0")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="a checkpoint step directory, or a checkpoints root (its newest step)")
    which.add_argument("--model", help="a local Hugging Face model directory (default: the config's model)")
    parser.add_argument("--prompts", type=int, help="held-out prompts to score (default: train.eval_prompts)")
    parser.add_argument("--samples", type=int, default=1, help="responses per prompt (pass@k uses all of them)")
    parser.add_argument("--examples", type=int, default=3, help="sampled responses to print with their rewards")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = run_config.parse_config_arguments(parser, argv)
    console = Console()
    try:
        cfg = run_config.load(args.config, args.overrides)
        model = checkpoint_model(args.checkpoint) if args.checkpoint else args.model
        if args.samples < 1 or (args.prompts is not None and args.prompts < 1) or args.examples < 0:
            raise ValueError("--samples and --prompts must be >= 1, --examples >= 0")
        from vespo.config import preflight

        preflight.check(dataclasses.replace(cfg, model=model or cfg.model), need_eval=True, training=False)
    except (configtypes.ConfigError, ValueError, OSError, checkpoint.CheckpointError) as err:  # PreflightError too
        Console(stderr=True).print(f"[red]eval error:[/] {err}", soft_wrap=True, highlight=False)
        sys.exit(2)
    r = evaluate(cfg, model, args.prompts, args.samples, args.examples)
    r.model = _MERGED.get(r.model, r.model)
    console.print(
        f"[bold]eval[/] {r.model}: {r.prompts} held-out prompts x {r.samples_per_prompt} sample(s) at temperature "
        f"{r.temperature:g}\n  mean reward {r.mean_reward:.4f}  accuracy {r.accuracy:.4f}  "
        f"pass@{r.samples_per_prompt} {r.pass_at_k:.4f}  mean response {r.mean_response_tokens:.1f} tokens"
        + (f"  ({r.failed_prompts} prompt(s) refused)" if r.failed_prompts else ""),
        soft_wrap=True,
        highlight=False,
    )
    if r.episodes:
        e = r.episodes
        line = (f"  episodes: {e['episode/turns_mean']:.2f} turns, {e['episode/used_tools_frac']:.1%} used a tool, "
                f"{e['episode/tool_errors_mean']:.2f} tool errors, {e['episode/latency_s_mean']:.2f}s each "
                f"({e['episode/env_time_frac']:.0%} in the environment)")  # fmt: skip
        console.print(line, soft_wrap=True, highlight=False)
    if r.reward_errors:
        console.print(f"  {r.reward_errors} sample(s) failed their reward (scored 0), e.g. {r.first_reward_error}",
                      soft_wrap=True, highlight=False, markup=False)  # fmt: skip
    from vespo.reporting.examples import Example, one_line

    for e in r.examples:
        console.print(f"  example: {one_line(Example(**e))}", soft_wrap=True, highlight=False, markup=False)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(r), indent=2))


if __name__ == "__main__":
    main()
