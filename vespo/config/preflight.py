"""Checks made before Ray, vLLM and DeepSpeed start: a bad model or data file is one line, in seconds.

Starting the stack takes a minute or more and its errors surface as tracebacks from inside an
actor. Everything that can be checked from the driver alone is checked here first: the model
directory (config, tokenizer, chat template where the data is chat), the data (file, schema,
row counts, one prompt rendered through the template and tokenized, prompts that cannot fit)
and the reward (importable, of a known signature).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rollout.tasks.registry import make_reward, make_task, render_prompt
from vespo.config.run_config import RunConfig
from vespo.models import resolve_model

PROMPTS_CHECKED = 2000  # prompts measured against the length limit (all of them, up to this many)


class PreflightError(ValueError):
    """The run cannot start; the message names what to fix."""


@dataclass
class Checked:
    model_path: str
    architecture: str
    train_prompts: int
    eval_prompts: int
    first_prompt: str
    first_prompt_tokens: int
    too_long: int  # of the prompts measured, those over rollout.max_model_len - max_new_tokens
    measured: int

    def summary(self) -> str:
        long = f", {self.too_long} of {self.measured} measured too long (refused)" if self.too_long else ""
        data = f"{self.train_prompts} train / {self.eval_prompts} held-out prompts"
        return (f"checked: model {self.model_path} ({self.architecture}); data: {data}, "
                f"the first renders to {self.first_prompt_tokens} tokens{long}")  # fmt: skip


def check(cfg: RunConfig, need_eval: bool | None = None, training: bool = True) -> Checked:
    """Everything the driver can verify alone; raises PreflightError with a one-line reason.
    `training=False`: for `vespo eval`, which may decode greedily."""
    if training and cfg.rollout.temperature == 0:
        raise PreflightError(
            "rollout.temperature is 0 (greedy decoding): training needs sampled responses and their log-probs; "
            "set it > 0 (only vespo eval may use 0)"
        )
    try:
        model_path = resolve_model(cfg.model)
    except (ValueError, OSError) as err:
        raise PreflightError(f"model: {err}") from err
    architecture = _architecture(model_path)
    tokenizer = _tokenizer(model_path)
    if cfg.learner.routing_replay == "rollout":
        _check_routing_replay(cfg, model_path)
    if cfg.learner.lora is not None:
        _check_lora(cfg, model_path, architecture)
    try:
        task = make_task(cfg.task)
        train, held_out = task.samples("train"), task.samples("eval")
    except (ValueError, OSError) as err:
        raise PreflightError(f"task: {err}") from err
    if not train:
        raise PreflightError(f"task: no training prompts (task.name {cfg.task.name}, task.path {cfg.task.path})")
    need_eval = cfg.train.eval_every > 0 if need_eval is None else need_eval
    if need_eval and not held_out:
        raise PreflightError(
            f"task: no held-out prompts (task.eval_fraction {cfg.task.eval_fraction} of {len(train)} rows); "
            "raise task.eval_fraction or set train.eval_every=0"
        )
    try:
        make_reward(cfg.task)
    except (ValueError, ImportError) as err:
        raise PreflightError(f"task.reward_fn: {err}") from err
    if cfg.task.name == "env":
        _check_episodes(cfg, tokenizer)
    chat = [s for s in train if s.messages is not None]
    if chat and not getattr(tokenizer, "chat_template", None):
        raise PreflightError(
            f"model {cfg.model}: the data holds chat messages (sample {chat[0].id!r}) but the tokenizer has no "
            "chat template to render them"
        )
    if tokenizer.eos_token_id is None:
        raise PreflightError(f"model {cfg.model}: the tokenizer has no eos token, so no response could end")
    limit = cfg.rollout.max_prompt_tokens
    lengths, first = [], ""
    for sample in (train + held_out)[:PROMPTS_CHECKED]:
        try:
            text = render_prompt(sample, tokenizer, cfg.task.system_prompt)
        except Exception as err:  # a template that fails on this sample's messages
            raise PreflightError(f"task: sample {sample.id!r} cannot be rendered: {type(err).__name__}: {err}") from err
        first = first or text  # train[0] comes first
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    too_long = sum(n > limit for n in lengths)
    if too_long == len(lengths):
        raise PreflightError(
            f"task: every prompt measured is longer than {limit} tokens (the first has {lengths[0]}); raise "
            "rollout.max_model_len or lower rollout.max_new_tokens"
        )
    return Checked(model_path, architecture, len(train), len(held_out), first, lengths[0], too_long, len(lengths))


def _check_episodes(cfg: RunConfig, tokenizer) -> None:
    from rollout.tools.registry import check_tool_specs

    if not getattr(tokenizer, "chat_template", None):
        raise PreflightError(f"model {cfg.model}: task.name env needs a chat template to render the episode's turns")
    try:
        check_tool_specs(cfg.task.tools)
    except ValueError as err:
        raise PreflightError(f"task.tools: {err}") from err


def _check_routing_replay(cfg: RunConfig, model_path: str) -> None:
    from rollout.engine import moe_experts

    key = "learner.routing_replay rollout"
    if not moe_experts(model_path):
        raise PreflightError(f"{key} needs a Mixture-of-Experts model; {cfg.model} has no experts")
    if cfg.rollout.backend != "vllm":
        raise PreflightError(f"{key} needs rollout.backend vllm (the engine that returns its routing)")
    if cfg.task.name == "env":
        raise PreflightError(f"{key}: multi-turn episodes (task.name env) carry no engine routing")


# Run in a process of its own: importing vLLM here would put it in the driver's sys.modules
# (the training loop never imports it) and may initialise CUDA. Prints, for each architecture
# named, what preflight needs to know of its vLLM model class, or no class where vLLM has none of
# its own for it (it then serves the model with its Transformers backend, which takes LoRA).
_VLLM_LORA_PROBE = """
import json, sys, typing
from vllm.config.lora import MaxLoRARanks
from vllm.model_executor.models.interfaces import supports_lora
from vllm.model_executor.models.registry import ModelRegistry
ranks = list(typing.get_args(MaxLoRARanks))
for arch in sys.argv[1:]:
    out = {"ranks": ranks}
    model = ModelRegistry.models.get(arch)
    if model is not None:
        cls = model.load_model_cls()
        out.update(cls=cls.__name__, lora=bool(supports_lora(cls)),
                   embedding=sorted(getattr(cls, "embedding_modules", None) or {}))
    print("vespo-probe " + json.dumps([arch, out]))
"""
_PROBED = "vespo-probe "
_vllm_lora: dict[str, dict] = {}  # architecture -> the probe's answer, asked once a process


def vllm_lora_support(*architectures: str) -> dict[str, dict]:
    """vLLM's word on each architecture (_VLLM_LORA_PROBE): those not yet asked in one process,
    seconds for vLLM's import however many."""
    ask = [a for a in dict.fromkeys(architectures) if a not in _vllm_lora]
    if ask:
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
        what = f"whether it serves {', '.join(ask)} with LoRA"
        try:
            done = subprocess.run([sys.executable, "-c", _VLLM_LORA_PROBE, *ask], capture_output=True, text=True,
                                  timeout=300, env=env)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise PreflightError(f"learner.lora: vLLM took over {err.timeout:.0f} s to say {what}") from err
        answers = dict(json.loads(line[len(_PROBED) :]) for line in done.stdout.splitlines()
                       if line.startswith(_PROBED))  # fmt: skip
        if done.returncode or set(answers) != set(ask):
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise PreflightError(f"learner.lora: cannot ask vLLM {what}: {last}")
        _vllm_lora.update(answers)
    return {a: _vllm_lora[a] for a in architectures}


def _check_lora(cfg: RunConfig, model_path: str, architecture: str) -> None:
    """What would otherwise fail inside the learner's or an engine's actor. PEFT refuses a target
    the model lacks; under rollout.backend vllm the engines load each update's adapter into
    vLLM's LoRA, which needs a model class of vLLM's that takes LoRA (SupportsLoRA), a rank up to
    its largest max_lora_rank, and targets it has LoRA layers for: linear layers (lora_A and
    lora_B, what a sync carries), the output layer only where the class lists it among its
    embedding modules. The transformers backend merges the adapter on its side: no vLLM check."""
    lora = cfg.learner.lora
    vllm = vllm_lora_support(architecture)[architecture] if cfg.rollout.backend == "vllm" else None
    if vllm is not None and vllm.get("lora") is False:
        raise PreflightError(
            f"learner.lora: vLLM cannot serve model {cfg.model} with a LoRA adapter (its {vllm['cls']} for "
            f"{architecture} does not support LoRA); set learner.lora: null (full fine-tuning) or rollout.backend "
            "transformers"
        )
    if vllm is not None and lora.rank > max(vllm["ranks"]):
        raise PreflightError(
            f"learner.lora.rank {lora.rank} is over the largest LoRA rank vLLM serves ({max(vllm['ranks'])})"
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # the modules are known from config.json alone (the model built on the meta device: no weights read)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    modules = dict(model.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)})
    output = model.get_output_embeddings()
    for target in lora.target_modules:  # PEFT's rule: the whole name or its last parts
        matched = [m for n, m in modules.items() if n == target or n.endswith(f".{target}")]
        if not matched:
            raise PreflightError(
                f"learner.lora.target_modules: model {cfg.model} has no module {target!r}; "
                f"its linear layers: {', '.join(linear)}"
            )
        if vllm is None:
            continue
        kinds = sorted({type(m).__name__ for m in matched if not isinstance(m, torch.nn.Linear)})
        if kinds:
            raise PreflightError(
                f"learner.lora.target_modules: {target!r} of model {cfg.model} is a {', '.join(kinds)}, not a linear "
                f"layer: vLLM's LoRA takes linear layers here; its linear layers: {', '.join(linear)}"
            )
        if "cls" in vllm and any(m is output for m in matched) and target.rsplit(".", 1)[-1] not in vllm["embedding"]:
            raise PreflightError(
                f"learner.lora.target_modules: vLLM's {vllm['cls']} takes no LoRA on its output layer {target!r}"
            )


def _architecture(model_path: str) -> str:
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PreflightError(f"model {model_path}: config.json is not readable JSON: {err}") from err
    architectures = config.get("architectures") or []
    if not architectures:
        raise PreflightError(f"model {model_path}: config.json names no architectures (a causal LM is needed)")
    return architectures[0]


def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as err:  # transformers raises many kinds here; all mean "no usable tokenizer"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PreflightError(f"model {model_path}: cannot load its tokenizer: {first}") from err
