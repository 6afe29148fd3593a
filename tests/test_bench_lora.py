"""bench/lora.py's pure parts: reading `vespo train`'s console and the LoRA / full table."""

from bench.lora import parse_train_log, ratio, report

LOG = """\
checked: model /x (LlamaForCausalLM); data: 2160 train / 240 held-out prompts
2026-12-07 09:49:11,896 vespo.orchestration.weight_publisher: weight group: rank 0 at 127.0.0.1:1
step 1/3 (1m53s elapsed, eta ?)  reward=0.0625  loss=-0.318  stale_max=0  train_tok/s=33.66
(RolloutActor pid=1) step 9/9 reward=9
step 2/3 (2m42s elapsed, eta 1m38s)  reward=0  loss=0  stale_max=1  gen_tok/s=13.84
step 3/3 (3m32s elapsed, eta 0m00s)  reward=0.125  eval_acc=0.085  loss=0.1
  sample at step 3: ...
done: 3 steps in 212s, reward 0.062 (first 1 steps) -> 0.125 (last 1)
"""


def test_parse_train_log_reads_every_step_the_evals_and_the_loop_time():
    run = parse_train_log(LOG)
    assert run == {"rewards": [0.0625, 0.0, 0.125], "steps": [1, 2, 3], "evals": {3: 0.085}, "loop_s": 212.0}


def test_report_gives_lora_over_full():
    run = lambda rewards, acc, wall: {"rewards": rewards, "after_accuracy": acc, "loop_s": 40.0, "wall_s": wall}  # noqa: E731
    results = {
        "sync": {"full": {"bytes": 538e6, "publish_s": 2.0, "learner_s": 1.0, "engine_s": 1.8, "gen_tokens_per_s": 150,
                          "publish_all_s": [2.0, 1.5, 2.5]},
                 "lora": {"bytes": 19.5e6, "publish_s": 0.5, "learner_s": 0.1, "engine_s": 0.4,
                          "gen_tokens_per_s": 45}},
        "learner": {"full": {"peak": 4e9, "step_s": 10.0, "train_s": 8.0},
                    "lora": {"peak": 3e9, "step_s": 8.0, "train_s": 6.0}},
        "runs": {"eval_prompts": 200, "before_accuracy": 0.08, "full": run([0.0, 0.1, 0.2, 0.3], 0.1, 400.0),
                 "lora": run([0.1, 0.2, 0.3, 0.5], 0.2, 300.0)},
    }  # fmt: skip
    text = report(results)
    table = [line for line in text.splitlines()[1:] if ":" not in line]
    lines = {line.rsplit(maxsplit=3)[0]: line.split()[-3:] for line in table}
    assert lines["sync MB"] == ["538.0", "19.5", "0.036"]
    assert lines["sync s (publish, until the engine loaded it)"] == ["2.000", "0.500", "0.250"]
    assert lines["learner peak GB"] == ["4.00", "3.00", "0.750"]
    assert lines["engine decode tokens/s"] == ["150.0", "45.0", "0.300"]
    assert lines["held-out accuracy after"] == ["0.100", "0.200", "2.000"]
    assert lines["reward, last 1 steps"] == ["0.300", "0.500", "1.667"]
    assert "lora reward per step: 0.1 0.2 0.3 0.5" in text
    assert "full publish s, 3 syncs: min 1.500 max 2.500" in text
    assert "accuracy standard error at 200 prompts: 0.019 (before)" in text
    assert report({"cpu": "x"}).splitlines() == ["figure".ljust(10) + "       full       LoRA  LoRA/full"]


def test_ratio_of_missing_figures_is_none():
    assert ratio(None, 1.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, 4.0) == 0.25
