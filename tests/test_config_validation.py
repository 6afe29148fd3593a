"""Every config field has a range or a set of choices, and a bad value is reported with its dotted key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from buffer.config import BufferConfig
from configtypes import ConfigError, build, keys_of, to_dict
from learner.config import LearnerConfig, LoraConfig
from learner.objectives import CONFIGS, make_config
from rollout.config import RolloutConfig
from rollout.tasks.base import TaskConfig
from vespo.config import run_config
from vespo.config.run_config import RunConfig, TrainConfig, WandbConfig

# (override, the message it must give): one bad value for every field with a range or choices
BAD = [
    ("model=''", "model must not be empty"),
    # train
    ("train.mode=fast", "train.mode must be 'async' or 'sync', got 'fast'"),
    ("train.pin_cores=sometimes", "train.pin_cores: expected true or false, got 'sometimes'"),
    ("train.staleness_ratio=0", "train.staleness_ratio must be >= 1, got 0"),
    ("train.steps=0", "train.steps must be >= 1, got 0"),
    ("train.groups_per_step=0", "train.groups_per_step must be >= 1, got 0"),
    ("train.sync_every=0", "train.sync_every must be >= 1, got 0"),
    ("train.num_engines=0", "train.num_engines must be >= 1, got 0"),
    ("train.max_inflight_groups=0", "train.max_inflight_groups must be >= 1, got 0"),
    ("train.weight_bucket_mb=0", "train.weight_bucket_mb must be >= 1, got 0"),
    ("train.recompute_old_logprobs=maybe", "train.recompute_old_logprobs: expected true or false, got 'maybe'"),
    ("train.eval_every=-1", "train.eval_every must be >= 0, got -1"),
    ("train.eval_prompts=0", "train.eval_prompts must be >= 1, got 0"),
    ("train.eval_log_samples=-1", "train.eval_log_samples must be >= 0, got -1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0, got -1"),
    ("train.output_dir=''", "train.output_dir must not be empty"),
    ("train.batch_timeout_s=-1", "train.batch_timeout_s must be > 0, got -1"),
    ("train.engine_restart_timeout_s=0", "train.engine_restart_timeout_s must be > 0, got 0"),
    ("train.group_retries=-1", "train.group_retries must be >= 0, got -1"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0, got -1"),
    ("train.ray_address=''", "train.ray_address must not be empty"),
    # task
    ("task.name=chess", "task.name: unknown task 'chess'; choose one of arithmetic, math"),
    ("task.path=''", "task.path must not be empty"),
    ("task.prompt_key=''", "task.prompt_key must not be empty"),
    ("task.answer_key=''", "task.answer_key must not be empty"),
    ("task.eval_fraction=1", "task.eval_fraction must be in [0, 1), got 1"),
    ("task.train_size=0", "task.train_size must be >= 1, got 0"),
    ("task.eval_size=0", "task.eval_size must be >= 1, got 0"),
    ("task.max_digits=0", "task.max_digits must be >= 1, got 0"),
    ("task.seed=-1", "task.seed must be >= 0, got -1"),
    ("task.reward_fn=mymodule", "task.reward_fn: must be 'module:function', got 'mymodule'"),
    ("task.reward_timeout_s=0", "task.reward_timeout_s must be > 0, got 0"),
    ("task.reward_workers=0", "task.reward_workers must be >= 1, got 0"),
    ("task.env=products", "task.env: must be 'kind:name'"),
    ("task.env_args=[1]", "task.env_args: expected a mapping, got [1]"),
    ("task.tools=[abacus]", "task.tools: unknown tool 'abacus'"),
    ("task.max_turns=0", "task.max_turns must be >= 1, got 0"),
    ("task.step_timeout_s=0", "task.step_timeout_s must be > 0, got 0"),
    ("task.episode_timeout_s=0", "task.episode_timeout_s must be > 0, got 0"),
    # rollout
    ("rollout.backend=tpu", "rollout.backend must be 'vllm', 'transformers' or 'auto', got 'tpu'"),
    ("rollout.n=0", "rollout.n must be >= 1, got 0"),
    ("rollout.temperature=-0.5", "rollout.temperature must be >= 0, got -0.5"),
    ("rollout.top_p=0", "rollout.top_p must be in (0, 1], got 0"),
    ("rollout.top_k=-1", "rollout.top_k must be >= 0, got -1"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens must be >= 1, got 0"),
    ("rollout.max_model_len=0", "rollout.max_model_len must be >= 1, got 0"),
    ("rollout.dtype=float99", "rollout.dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got 'float99'"),
    ("rollout.seed=-1", "rollout.seed must be >= 0, got -1"),
    ("rollout.partial_rollout=2", "rollout.partial_rollout: expected true or false, got 2"),
    ("rollout.update_kv=reuse", "rollout.update_kv must be 'keep' or 'recompute', got 'reuse'"),
    ("rollout.max_num_seqs=0", "rollout.max_num_seqs must be >= 1, got 0"),
    ("rollout.prefix_caching=maybe", "rollout.prefix_caching: expected true or false, got 'maybe'"),
    ("rollout.kv_cache_gb=0", "rollout.kv_cache_gb must be > 0, got 0"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization must be in (0, 1], got 1.5"),
    ("rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size must be >= 1, got 0"),
    ("rollout.lora_rank=-1", "rollout.lora_rank must be >= 0, got -1"),
    ("rollout.enforce_eager=maybe", "rollout.enforce_eager: expected true or false, got 'maybe'"),
    ("rollout.preload_libs=always", "rollout.preload_libs must be 'auto' or 'off', got 'always'"),
    ("rollout.hf_chunk_tokens=0", "rollout.hf_chunk_tokens must be >= 1, got 0"),
    ("rollout.num_cpus=-1", "rollout.num_cpus must be >= 0, got -1"),
    ("rollout.num_gpus=-1", "rollout.num_gpus must be >= 0, got -1"),
    ("rollout.max_restarts=-1", "rollout.max_restarts must be >= 0, got -1"),
    ("rollout.cpu_cores=[[-1]]", "rollout.cpu_cores[0][0] must be >= 0, got -1"),
    ("rollout.imposed_median_tokens=-1", "rollout.imposed_median_tokens must be >= 0, got -1"),
    ("rollout.imposed_length_sigma=0", "rollout.imposed_length_sigma must be > 0, got 0"),
    # learner
    ("learner.world_size=0", "learner.world_size must be >= 1, got 0"),
    ("learner.zero_stage=4", "learner.zero_stage must be 0, 1, 2 or 3, got 4"),
    ("learner.objective=ppo", "learner.objective: unknown objective 'ppo'; choose one of vespo, grpo"),
    ("learner.objective_config=[1]", "learner.objective_config: expected a mapping, got [1]"),
    ("learner.lr=0", "learner.lr must be > 0, got 0"),
    ("learner.weight_decay=-3", "learner.weight_decay must be >= 0, got -3"),
    ("learner.betas=[2, -1]", "learner.betas[0] must be in [0, 1), got 2; learner.betas[1] must be in [0, 1), got -1"),
    ("learner.eps=-1", "learner.eps must be > 0, got -1"),
    ("learner.warmup_steps=-1", "learner.warmup_steps must be >= 0, got -1"),
    ("learner.grad_clip=-1", "learner.grad_clip must be >= 0, got -1"),
    ("learner.micro_batch_tokens=0", "learner.micro_batch_tokens must be >= 1, got 0"),
    ("learner.bf16=maybe", "learner.bf16: expected true or false, got 'maybe'"),
    ("learner.seed=-1", "learner.seed must be >= 0, got -1"),
    ("learner.temperature=0", "learner.temperature must be > 0, got 0"),
    ("learner.advantage=ppo", "learner.advantage: unknown advantage estimator 'ppo'; choose one of grpo"),
    ("learner.normalize_adv_std=maybe", "learner.normalize_adv_std: expected true or false, got 'maybe'"),
    ("learner.pack_sequences=maybe", "learner.pack_sequences: expected true or false, got 'maybe'"),
    ("learner.weight_sync_shm=sometimes", "learner.weight_sync_shm: expected true or false, got 'sometimes'"),
    ("learner.routing_replay=always", "learner.routing_replay must be 'off' or 'rollout', got 'always'"),
    ("learner.cpu_cores=[[]]", "learner.cpu_cores[0] must hold at least 1 item(s), got 0"),
    ("learner.num_cpus_per_worker=-1", "learner.num_cpus_per_worker must be >= 0, got -1"),
    ("learner.num_gpus_per_worker=-1", "learner.num_gpus_per_worker must be >= 0, got -1"),
    ("learner.lora=8", "learner.lora: expected a mapping, got 8"),
    ("learner.lora.rank=0", "learner.lora.rank must be >= 1, got 0"),
    ("learner.lora.alpha=0", "learner.lora.alpha must be > 0, got 0"),
    ("learner.lora.dropout=1", "learner.lora.dropout must be in [0, 1), got 1"),
    ("learner.lora.target_modules=[]", "learner.lora.target_modules must hold at least 1 item(s), got 0"),
    # buffer
    ("buffer.capacity=0", "buffer.capacity must be >= 1, got 0"),
    ("buffer.max_staleness=-1", "buffer.max_staleness must be >= 0, got -1"),
    ("buffer.stale_policy=keep", "buffer.stale_policy must be 'drop' or 'downweight', got 'keep'"),
    ("buffer.downweight_decay=0", "buffer.downweight_decay must be in (0, 1], got 0"),
    ("buffer.groups_per_step=0", "buffer.groups_per_step must be >= 1, got 0"),
    ("buffer.divergence_budget=0", "buffer.divergence_budget must be > 0, got 0"),
    # wandb
    ("wandb.mode=cloud", "wandb.mode must be 'online', 'offline' or 'disabled', got 'cloud'"),
    ("wandb.project=a/b", "wandb.project: must not contain any of / \\ # ? % :, got 'a/b'"),
    ("wandb.entity=''", "wandb.entity must not be empty"),
    ("wandb.run_name=''", "wandb.run_name must not be empty"),
    ("wandb.dir=''", "wandb.dir must not be empty"),
]

# each objective's options: one bad value each (the objective is chosen by the key's prefix)
BAD_OPTIONS = [
    ("vespo", "k_pos", -1, "must be >= 0, got -1"),
    ("vespo", "lambda_pos", -1, "must be >= 0, got -1"),
    ("vespo", "k_neg", -0.5, "must be >= 0, got -0.5"),
    ("vespo", "lambda_neg", -1, "must be >= 0, got -1"),
    ("vespo", "agg", "mean", ": unknown loss aggregation 'mean'; choose one of token-mean"),
    ("vespo", "fused", "maybe", ": expected true or false, got 'maybe'"),
    ("vespo", "neg_w_noise_threshold", 0, "must be > 0, got 0"),
    ("vespo", "target_ess", 1.5, "must be in (0, 1], got 1.5"),
    ("vespo", "length_norm", "maybe", ": expected true or false, got 'maybe'"),
    ("grpo", "eps_low", 1, "must be in [0, 1), got 1"),
    ("grpo", "eps_high", -0.1, "must be >= 0, got -0.1"),
    ("grpo", "dual_clip", 1, "must be > 1, got 1"),
    ("grpo", "agg", "mean", ": unknown loss aggregation 'mean'"),
    ("gspo", "eps_low", -0.1, "must be in [0, 1), got -0.1"),
    ("gspo", "eps_high", -1, "must be >= 0, got -1"),
    ("gspo", "agg", "sum", ": unknown loss aggregation 'sum'"),
    ("sapo", "tau_pos", 0, "must be > 0, got 0"),
    ("sapo", "tau_neg", -1, "must be > 0, got -1"),
    ("sapo", "agg", "mean", ": unknown loss aggregation 'mean'"),
    ("cispo", "eps_low", 1.5, "must be in [0, 1], got 1.5"),
    ("cispo", "eps_high", -1, "must be >= 0, got -1"),
    ("cispo", "agg", "mean", ": unknown loss aggregation 'mean'"),
]

# fields whose every value of their type is valid (paths filled by the run config, free text)
FREE = {"rollout.model_path", "learner.model_path", "task.system_prompt"}
SECTIONS = {
    "": RunConfig, "train": TrainConfig, "task": TaskConfig, "rollout": RolloutConfig,
    "learner": LearnerConfig, "buffer": BufferConfig, "wandb": WandbConfig,
}  # fmt: skip
NESTED = {"learner.lora": LoraConfig}  # optional records inside a section (null by default)


def error_of(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        run_config.load(None, overrides)
    return str(err.value)


@pytest.mark.parametrize(("override", "message"), BAD, ids=[o for o, _ in BAD])
def test_a_bad_value_names_its_key(override, message):
    assert message in error_of([override])


@pytest.mark.parametrize(
    ("objective", "option", "value", "message"), BAD_OPTIONS, ids=[f"{o}.{k}" for o, k, *_ in BAD_OPTIONS]
)
def test_a_bad_objective_option_names_its_key(objective, option, value, message):
    overrides = [f"learner.objective={objective}", f"learner.objective_config.{option}={value!r}"]
    assert f"learner.objective_config.{option}{' ' if message[0] != ':' else ''}{message}" in error_of(overrides)
    with pytest.raises(ConfigError, match="learner.objective_config." + option):
        make_config(objective, {option: value})  # the same check without a run config


def test_every_field_has_a_case():
    """A new field needs its range (and a line in BAD): this lists the ones that have none."""
    covered = {o.partition("=")[0] for o, _ in BAD} | FREE
    keys = {f"{path}.{k}" if path else k for path, cls in {**SECTIONS, **NESTED}.items() for k in keys_of(cls)}
    keys -= {"train", "task", "rollout", "learner", "buffer", "wandb"}
    assert sorted(keys - covered) == []
    options = {(o, k) for o, k, *_ in BAD_OPTIONS}
    assert sorted({(o, k) for o, cls in CONFIGS.items() for k in keys_of(cls)} - options) == []


def test_the_reported_examples():
    assert "learner.eps must be > 0, got -1" in error_of(["learner.eps=-1"])
    assert "learner.betas[0] must be in [0, 1), got 2" in error_of(["learner.betas=[2, -1]"])
    assert "learner.betas[1] must be in [0, 1), got -1" in error_of(["learner.betas=[0.9, -1]"])
    assert "learner.betas: expected 2 values, got 1" in error_of(["learner.betas=[0.9]"])
    assert "learner.weight_decay must be >= 0, got -3" in error_of(["learner.weight_decay=-3"])
    assert "train.batch_timeout_s must be > 0, got -1" in error_of(["train.batch_timeout_s=-1"])
    assert "rollout.dtype must be 'auto', 'float32', 'float16' or 'bfloat16'" in error_of(["rollout.dtype=float99"])


def test_types_nan_and_several_errors_at_once():
    assert error_of(["train.steps=abc"]) == "train.steps: expected an integer, got 'abc'"
    assert error_of(["learner.lr=.nan"]) == "learner.lr must be a finite number, got nan"
    both = "train.steps must be >= 1, got 0; rollout.n must be >= 1, got 0"
    assert error_of(["train.steps=0", "rollout.n=0"]) == both
    assert run_config.load(None, ["learner.lr=5e-5"]).learner.lr == 5e-5  # YAML 1.1 reads 5e-5 as a string
    assert run_config.load(None, ["wandb.run_name=2024"]).wandb.run_name == "2024"


def test_unknown_keys_suggest_the_closest():
    assert error_of(["learner.lrr=1"]) == "unknown key 'learner.lrr'; did you mean 'lr'?"
    assert error_of(["trian.steps=1"]) == "unknown key 'trian'; did you mean 'train'?"
    assert error_of(["learner._derived=[]"]).startswith("unknown key 'learner._derived'")  # bookkeeping, not a key
    assert error_of(["learner.objective_config.kpos=1"]) == (
        "learner.objective_config: unknown vespo option(s) ['kpos']; did you mean 'k_pos'?"
    )
    with pytest.raises(ConfigError, match=r"unknown key 'buffer.capcity'; did you mean 'capacity'\?"):
        BufferConfig(capcity=10)


def test_rules_across_fields_name_their_keys():
    assert error_of(["rollout.max_new_tokens=64", "rollout.max_model_len=64"]) == (
        "rollout.max_model_len (64) must exceed rollout.max_new_tokens (64): prompts need room"
    )
    assert "train.sync_every applies to async mode" in error_of(["train.mode=sync", "train.sync_every=2"])
    assert "train.staleness_ratio 8 trains on data up to 7 versions old, but buffer.max_staleness is 4" in error_of(
        ["train.mode=sync", "train.staleness_ratio=8"]
    )
    assert "train.staleness_ratio is for sync mode" in error_of(["train.staleness_ratio=2"])
    assert "train.sync_every 9 makes data at least 8 versions old" in error_of(["train.sync_every=9"])
    assert "buffer.capacity 16 is below one step's 256 trajectories" in error_of(["buffer.capacity=16"])
    assert "the math task needs task.path" in error_of(["task.name=math"])


def test_a_section_built_in_code_is_checked_the_same_way():
    with pytest.raises(ConfigError, match=r"^learner.eps must be > 0, got -1.0$"):
        LearnerConfig(eps=-1.0)
    with pytest.raises(ConfigError, match=r"^learner.objective_config.k_pos must be >= 0, got -1$"):
        LearnerConfig(objective_config={"k_pos": -1})
    with pytest.raises(ConfigError, match=r"rollout.top_p must be in \(0, 1\], got 2"):
        dataclasses.replace(RolloutConfig(), top_p=2)  # replace re-runs the checks
    with pytest.raises(ConfigError, match=r"^train.steps must be >= 1, got 0$"):
        RunConfig(train={"steps": 0})


# --- derived keys -------------------------------------------------------------------------------


def test_unset_derived_keys_follow_their_source():
    cfg = run_config.load(None, ["rollout.temperature=0.7", "train.groups_per_step=4"])
    assert cfg.learner.temperature == cfg.learner.policy_temperature == 0.7
    assert cfg.buffer.groups_per_step == cfg.buffer.admission_groups_per_step == 4
    plain = to_dict(cfg)
    assert plain["learner"]["temperature"] is None and plain["buffer"]["groups_per_step"] is None  # written unset
    assert build(RunConfig, plain) == cfg


def test_a_copy_with_another_source_derives_again():
    cfg = run_config.load(None, [])
    train = dataclasses.replace(cfg.train, groups_per_step=2)
    rollout = dataclasses.replace(cfg.rollout, temperature=0.5)
    again = dataclasses.replace(cfg, train=train, rollout=rollout, buffer=dataclasses.replace(cfg.buffer, capacity=64))
    assert (again.buffer.groups_per_step, again.learner.temperature) == (2, 0.5)
    assert (cfg.buffer.groups_per_step, cfg.learner.temperature) == (32, 1.0)  # the original is untouched


def test_a_set_value_equal_to_the_derived_one_is_kept():
    cfg = run_config.load(None, ["learner.temperature=1.0", "buffer.groups_per_step=32"])
    assert (cfg.learner.temperature, cfg.buffer.groups_per_step) == (1.0, 32)
    assert to_dict(cfg)["learner"]["temperature"] == 1.0 and to_dict(cfg)["buffer"]["groups_per_step"] == 32
    with pytest.raises(ConfigError, match=r"learner.temperature \(1.0\) must equal rollout.temperature \(0.5\)"):
        dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, temperature=0.5))


def test_a_conflicting_derived_key_names_both():
    assert error_of(["learner.temperature=0.7"]) == (
        "learner.temperature (0.7) must equal rollout.temperature (1.0): the learner scores the engines' policy; "
        "leave it unset"
    )
    assert error_of(["buffer.groups_per_step=8"]) == (
        "buffer.groups_per_step (8) must equal train.groups_per_step (32): admission counts the groups the learner "
        "takes per step; leave it unset"
    )
    assert error_of(["rollout.lora_rank=8", "learner.lora.rank=16"]) == (
        "rollout.lora_rank (8) must equal learner.lora.rank (16): the engines serve the learner's adapter; "
        "leave it unset"
    )
    assert run_config.load(None, ["learner.lora.rank=16"]).rollout.lora_rank == 16


def test_greedy_rollouts_derive_no_learner_temperature():
    cfg = run_config.load(None, ["rollout.temperature=0"])  # `vespo eval` at temperature 0
    assert cfg.learner.temperature is None


def test_sections_made_alone_have_working_defaults():
    assert LearnerConfig().policy_temperature == 1.0 and LearnerConfig(temperature=0.6).policy_temperature == 0.6
    assert BufferConfig().admission_groups_per_step == 1
    assert BufferConfig(groups_per_step=8).admission_groups_per_step == 8


def test_a_section_given_in_part_keeps_the_embedded_runs_other_values():
    """`rollout.n=4` changes n only: the run's rollout stays at 8 new tokens in 64, its learner at
    lr 5e-4, instead of falling back to the sections' own class defaults (32 in 512, 1e-6)."""
    cfg = run_config.load(None, ["rollout.n=4", "learner.eps=1e-6"])
    assert (cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.rollout.max_model_len) == (4, 8, 64)
    assert (cfg.learner.eps, cfg.learner.lr, cfg.learner.warmup_steps) == (1e-6, 5e-4, 2)


def test_an_optional_record_takes_dotted_keys_when_null(tmp_path):
    """learner.lora is null unless set; one of its keys alone turns it on with the other defaults."""
    config = tmp_path / "run.yaml"
    config.write_text("learner:\n  lora: null\n")
    assert run_config.load(config).learner.lora is None
    lora = run_config.load(config, ["learner.lora.rank=16"]).learner.lora
    assert (lora.rank, lora.scale, lora.target_modules) == (16, 2.0, LoraConfig().target_modules)
    assert run_config.load(None, ["learner.lora={rank: 4, alpha: 8}"]).learner.lora.scale == 2.0
    assert run_config.load(None, ["learner.lora.rank=4", "learner.lora=null"]).learner.lora is None


def test_a_boolean_is_not_a_count():
    assert error_of(["train.steps=true"]) == "train.steps: expected a number, got True"


def test_each_key_has_one_default_declared_by_its_section():
    """A run config built in code takes each section class's own defaults (no second default per
    key), and the embedded run is its YAML file, which deploy/configs/tiny.yaml spells out."""
    cfg = RunConfig()
    for name, cls in SECTIONS.items():
        if name:
            assert to_dict(getattr(cfg, name)) == to_dict(cls()), name
    embedded = run_config.load()
    assert embedded.learner.lr == 5e-4 != LearnerConfig().lr  # the embedded run's own setting, from its YAML
    tiny = Path(__file__).resolve().parents[1] / "deploy" / "configs" / "tiny.yaml"
    assert to_dict(run_config.load(tiny)) == to_dict(embedded)


def test_a_key_a_file_leaves_out_takes_its_section_default(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rollout:\n  n: 4\n")
    cfg = run_config.load(config)
    assert cfg.rollout.n == 4 and cfg.rollout.max_new_tokens == RolloutConfig().max_new_tokens
    assert cfg.learner.lr == LearnerConfig().lr and cfg.buffer.max_staleness == BufferConfig().max_staleness
