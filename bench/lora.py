"""LoRA (learner.lora, rank 16, default targets) against full fine-tuning on smollm2-135m.

Three measurements, each LoRA / full within one invocation:

1. Weight sync and engine speed: a LearnerGroup (one rank) broadcasts to one real vLLM engine
   through the real weight group (shared memory on this node, as a run on one machine does),
   learner and engine built from CONFIG (+ `learner.lora.rank=16`). Per sync: the bytes sent,
   the wall time of the whole publish as the training loop pays it (from asking the engine to
   receive until it has loaded them: vLLM's weight reload for full weights, its LoRA slot for
   the adapter), and the learner's own `sync/seconds` (packing into the shared region until
   the receivers took the buckets). Median (and range) of --syncs after one warm-up. Then the
   engine's decode rate with what it received (the adapter makes every request a LoRA one):
   --gen-prompts held-out prompts x 4 samples.
2. Learner peak memory and step time (pi_old + one training step) of one in-process rank on the
   same batch, by bench.learner_memory's method and code (a process for the peak with glibc
   returning freed memory, one for times with the default allocator).
3. Training: `vespo train` of CONFIG on the word problems, full FT at lr --lr-full and LoRA at
   --lr-lora, everything else identical; reward per step from the run's console log. Held-out
   accuracy on --eval-prompts prompts by `vespo eval` (one vLLM engine, temperature 1): before,
   of the base model (where both runs start: LoRA's B starts at zero), and after, of each run's
   final checkpoint (the LoRA one merged). A run does not evaluate itself (train.eval_every=0):
   it has no eval at step 0, and the LoRA engine decodes so much slower that an in-run eval of
   200 prompts alone took 3.4 minutes.
   Learning rates: full 1e-5 (CONFIG's, the recorded run of docs/real_model.md); LoRA 1e-4, the
   10x that "LoRA Without Regret" (Thinking Machines, 2025) found best against full FT with
   alpha 32 at 1/rank scaling: scale 2 at rank 16, which learner.lora's default alpha (2 x rank) is.

1 and 2 hold /tmp/vespo-bench.lock (no other benchmark times meanwhile); the runs do not.
Run: .venv/bin/python -m bench.lora [--steps 12] [--skip-runs]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("full", "lora")
CONFIG = "deploy/configs/smollm2_word_problems.yaml"
RANK = 16
LOCK = "/tmp/vespo-bench.lock"
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*?\breward=(\S+)(?:.*?\beval_acc=(\S+))?")
DONE_LINE = re.compile(r"^(?:done|stopped by \S+): (\d+) steps in (\d+)s")


def variant_keys(variant: str) -> list[str]:
    return [f"learner.lora.rank={RANK}"] if variant == "lora" else []


def parse_train_log(text: str) -> dict:
    """Per-step training reward, the evals ({step: accuracy}) and the loop's wall seconds, from
    `vespo train`'s console (it prints every step of a run of up to 50 steps)."""
    rewards: dict[int, float] = {}
    evals: dict[int, float] = {}
    loop_s = None
    for line in text.splitlines():
        if m := STEP_LINE.match(line):
            rewards[int(m[1])] = float(m[2])
            if m[3] is not None:
                evals[int(m[1])] = float(m[3])
        elif m := DONE_LINE.match(line):
            loop_s = float(m[2])
    return {"rewards": [rewards[s] for s in sorted(rewards)], "steps": sorted(rewards), "evals": evals,
            "loop_s": loop_s}  # fmt: skip


def ratio(lora: float | None, full: float | None) -> float | None:
    if lora is None or full is None or full == 0:
        return None
    return lora / full


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(results: dict) -> str:
    """The table of figures and ratios (LoRA / full) from whatever parts were measured."""
    rows: list[tuple[str, float | None, float | None, str]] = []  # (figure, full, lora, format)
    sync, learner, runs = results.get("sync"), results.get("learner"), results.get("runs")
    if sync:
        pair = lambda key, scale=1.0: (sync["full"][key] / scale, sync["lora"][key] / scale)  # noqa: E731
        rows += [("sync MB", *pair("bytes", 1e6), ".1f"),
                 ("sync s (publish, until the engine loaded it)", *pair("publish_s"), ".3f"),
                 ("sync s (learner sync/seconds)", *pair("learner_s"), ".3f"),
                 ("sync s (engine receive + load)", *pair("engine_s"), ".3f"),
                 ("engine decode tokens/s", *pair("gen_tokens_per_s"), ".1f")]  # fmt: skip
    if learner:
        rows += [("learner peak GB", learner["full"]["peak"] / 1e9, learner["lora"]["peak"] / 1e9, ".2f"),
                 ("learner step s (pi_old + train)", learner["full"]["step_s"], learner["lora"]["step_s"], ".2f"),
                 ("learner train step s", learner["full"]["train_s"], learner["lora"]["train_s"], ".2f")]  # fmt: skip
    if runs:
        f, lo = runs["full"], runs["lora"]
        before = runs.get("before_accuracy")
        quarter = max(1, min(len(f["rewards"]), len(lo["rewards"])) // 4)
        rows += [("run wall s (process)", f["wall_s"], lo["wall_s"], ".0f"),
                 ("run loop s per step", _per_step(f), _per_step(lo), ".1f"),
                 ("held-out accuracy before", before, before, ".3f"),
                 ("held-out accuracy after", f.get("after_accuracy"), lo.get("after_accuracy"), ".3f"),
                 (f"reward, first {quarter} steps", mean(f["rewards"][:quarter]), mean(lo["rewards"][:quarter]), ".3f"),
                 (f"reward, last {quarter} steps", mean(f["rewards"][-quarter:]), mean(lo["rewards"][-quarter:]),
                  ".3f")]  # fmt: skip
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"{'figure':<{width}} {'full':>10} {'LoRA':>10} {'LoRA/full':>10}"]
    for name, full, lora, spec in rows:
        r = ratio(lora, full)
        lines.append(f"{name:<{width}} {_fmt(full, spec):>10} {_fmt(lora, spec):>10} {_fmt(r, '.3f'):>10}")
    if sync:
        for v in VARIANTS:
            times = sync[v].get("publish_all_s") or []
            if times:
                lines.append(f"{v} publish s, {len(times)} syncs: min {min(times):.3f} max {max(times):.3f}")
    if runs:
        n = runs.get("eval_prompts")
        if n and before is not None:
            lines.append(f"accuracy standard error at {n} prompts: {(before * (1 - before) / n) ** 0.5:.3f} (before)")
        for v in VARIANTS:
            lines.append(f"{v} reward per step: " + " ".join(f"{x:.3g}" for x in runs[v]["rewards"]))
    return "\n".join(lines)


def _per_step(run: dict) -> float | None:
    return run["loop_s"] / len(run["rewards"]) if run.get("loop_s") and run["rewards"] else None


@contextlib.contextmanager
def bench_lock():
    """flock(1)'s lock: no other benchmark on this machine times while this one does."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- 1. weight sync ------------------------------------------------------------------------


def run_config_of(variant: str, args):
    from vespo.config import run_config
    from vespo.models import resolve_model

    cfg = run_config.load(args.config, [f"task.path={args.data}", *variant_keys(variant)])
    cfg.learner.model_path = cfg.rollout.model_path = resolve_model(cfg.model)
    return cfg


def measure_sync(args) -> dict:
    import ray

    from learner.group import LearnerGroup
    from rollout.actor import rollout_actor

    out = {}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="bench_lora")
    try:
        for variant in VARIANTS:
            cfg = run_config_of(variant, args)
            learner = engine = None
            try:
                learner = LearnerGroup(cfg.learner)
                engine = rollout_actor(cfg.rollout, cfg.task, f"bench-lora-{variant}")
                ray.get(engine.start.remote())
                host, port, secret = learner.open_weight_sync(1, cfg.train.weight_bucket_mb << 20)
                ray.get([learner.connect_weight_sync(),
                         engine.init_weight_group.remote(host, port, 1, 2, "gloo", secret)])  # fmt: skip
                plan = learner.weight_plan()
                rounds = []
                for version in range(1, args.syncs + 2):  # the first: warm-up, not measured
                    start = time.perf_counter()
                    receiving = engine.receive_weights.remote(plan, version)
                    sent = ray.get(learner.broadcast_weights(plan))[0]
                    got = ray.get(receiving)
                    rounds.append((time.perf_counter() - start, sent["sync/seconds"], got["seconds"],
                                   sent["sync/bytes"], got["bytes"]))  # fmt: skip
                rounds = rounds[1:]
                out[variant] = {
                    "bytes": rounds[0][3], "engine_bytes": rounds[0][4],
                    "publish_s": statistics.median(r[0] for r in rounds),
                    "learner_s": statistics.median(r[1] for r in rounds),
                    "engine_s": statistics.median(r[2] for r in rounds),
                    "publish_all_s": [round(r[0], 4) for r in rounds],
                    **decode_rate(engine, cfg, args.gen_prompts),
                }  # fmt: skip
                print(f"sync {variant}: {json.dumps(out[variant])}", file=sys.stderr, flush=True)
            finally:
                if engine is not None:
                    ray.get(engine.shutdown.remote())
                    ray.kill(engine)
                if learner is not None:
                    learner.shutdown()
    finally:
        ray.shutdown()
    return out


def decode_rate(engine, cfg, prompts: int) -> dict:
    """The engine's tokens/s on the first held-out prompts, 4 samples each (after a 2-prompt warm-up)."""
    import ray
    from transformers import AutoTokenizer

    from rollout.tasks.registry import make_task
    from vespo.orchestration.prompts import prompt_item

    tokenizer = AutoTokenizer.from_pretrained(cfg.rollout.model_path)
    samples = make_task(cfg.task).samples("eval")
    items = [prompt_item(f"gen-{s.id}", s, tokenizer, cfg.task.system_prompt) for s in samples[: prompts + 2]]
    ray.get(engine.generate.remote(items[:2], 4))
    start = time.perf_counter()
    result = ray.get(engine.generate.remote(items[2:], 4))
    seconds = time.perf_counter() - start
    tokens = sum(len(t.response_ids) for t in result.trajectories)
    return {"gen_tokens": tokens, "gen_s": seconds, "gen_tokens_per_s": tokens / seconds}


# -- 2. learner memory and step time (bench.learner_memory's method) ------------------------


def learner_child(model_dir: str, variant: str, rows: int, prompt: int, response: int, steps: int) -> dict:
    """bench.learner_memory's measured step (its `chunked` variant: the learner as it runs), the
    rank built with learner.lora under `lora`."""
    import dataclasses

    import learner.worker
    from bench import learner_memory
    from learner.config import LoraConfig

    if variant == "lora":
        plain = learner.worker.LearnerWorker

        class LoraWorker(plain):
            def __init__(self, cfg, *a, **kw):
                super().__init__(dataclasses.replace(cfg, lora=LoraConfig(rank=RANK)), *a, **kw)

        learner.worker.LearnerWorker = LoraWorker
    return {**learner_memory.child(model_dir, "chunked", rows, prompt, response, steps), "variant": variant}


def _learner_process(model_dir: str, variant: str, args, steps: int, extra_env: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(extra_env, BENCH_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "bench.lora", "--child", model_dir, variant, "--rows", str(args.rows),
           "--prompt", str(args.prompt), "--response", str(args.response), "--learner-steps", str(steps)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"learner {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_learner(args) -> dict:
    from vespo.models import resolve_model

    model_dir = resolve_model(args.model)
    out = {}
    for variant in VARIANTS:
        memory = _learner_process(model_dir, variant, args, 1, {"MALLOC_MMAP_THRESHOLD_": "65536"})
        timing = _learner_process(model_dir, variant, args, args.learner_steps, {})
        out[variant] = {**memory, "step_s": timing["step_s"], "train_s": timing["train_s"]}
        print(f"learner {variant}: {json.dumps(out[variant])}", file=sys.stderr, flush=True)
    return out


# -- 3. training runs ------------------------------------------------------------------------


def train_keys(variant: str, args, out: Path) -> list[str]:
    lr = args.lr_lora if variant == "lora" else args.lr_full
    return [f"task.path={args.data}", f"train.steps={args.steps}", "train.eval_every=0",
            "train.checkpoint_every=0", f"learner.lr={lr}",
            f"learner.warmup_steps={args.warmup}", f"train.output_dir={out / variant}", "wandb.mode=disabled",
            *variant_keys(variant)]  # fmt: skip


def vespo(*argv: str) -> list[str]:
    return [sys.executable, "-m", "vespo", *argv]


def measure_runs(args, out: Path) -> dict:
    if not Path(args.data).is_file():
        subprocess.run(vespo("word-problems", args.data, "--rows", "2400", "--seed", "0"), check=True)
    before = evaluate(args, out, "before")
    results = {"eval_prompts": args.eval_prompts, "before_accuracy": before["accuracy"], "before": before}
    for variant in VARIANTS:
        cmd = vespo("train", args.config, *train_keys(variant, args, out), "--overwrite")
        print("run: " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
        start = time.perf_counter()
        text = _logged(cmd, out / f"{variant}.log")
        results[variant] = {**parse_train_log(text), "wall_s": time.perf_counter() - start}
        after = evaluate(args, out, f"after-{variant}", out / variant / "checkpoints")
        results[variant].update(after_accuracy=after["accuracy"], after=after)
        print(f"{variant}: {json.dumps(results[variant])}", file=sys.stderr, flush=True)
    return results


def evaluate(args, out: Path, name: str, checkpoint: Path | None = None) -> dict:
    """`vespo eval` on the first --eval-prompts held-out prompts: accuracy, mean response tokens, seconds."""
    where = ["--checkpoint", str(checkpoint)] if checkpoint is not None else []
    cmd = vespo("eval", args.config, f"task.path={args.data}", *where, "--prompts", str(args.eval_prompts),
                "--json", str(out / f"{name}.json"))  # fmt: skip
    print("eval: " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    start = time.perf_counter()
    _logged(cmd, out / f"{name}.log")
    got = json.loads((out / f"{name}.json").read_text())
    return {"accuracy": got["accuracy"], "prompts": got["prompts"], "response_tokens": got["mean_response_tokens"],
            "seconds": time.perf_counter() - start}  # fmt: skip


def _logged(cmd: list[str], log: Path) -> str:
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, check=False)
    text = log.read_text()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}), log {log}:\n{text[-4000:]}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--model", default="smollm2-135m", help="the learner part's model (the runs: CONFIG's)")
    parser.add_argument("--data", default="/tmp/vespo-bench-lora/word_problems.parquet",
                        help="word problems (absent: `vespo word-problems --rows 2400 --seed 0`)")  # fmt: skip
    parser.add_argument("--out", default="/tmp/vespo-bench-lora", help="logs and results.json")
    parser.add_argument("--syncs", type=int, default=9)
    parser.add_argument("--gen-prompts", type=int, default=16, help="held-out prompts (x 4 samples) for decode speed")
    # one run step's batch: 2 prompts x 8 samples, prompts ~62 tokens, responses up to 64
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--learner-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="learner steps of each training run")
    parser.add_argument("--warmup", type=int, default=2, help="learner.warmup_steps of both runs")
    parser.add_argument("--lr-full", type=float, default=1e-5)
    parser.add_argument("--lr-lora", type=float, default=1e-4)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--skip-learner", action="store_true")
    parser.add_argument("--skip-runs", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "VARIANT"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(learner_child(*args.child, args.rows, args.prompt, args.response, args.learner_steps)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.data).parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results: dict = {"cpu": _cpu(), "commit": commit, "args": vars(args)}
    save = lambda: (out / "results.json").write_text(json.dumps(results, indent=1))  # noqa: E731 - after each part
    with bench_lock():
        if not args.skip_sync:
            results["sync"] = measure_sync(args)
            save()
        if not args.skip_learner:
            results["learner"] = measure_learner(args)
            save()
    if not args.skip_runs:
        results["runs"] = measure_runs(args, out)
        save()
    print(f"{results['cpu']}; LoRA rank {RANK}, default targets; full lr {args.lr_full}, LoRA lr {args.lr_lora}; "
          f"learner batch {args.rows} rows x {args.prompt + args.response} tokens, {args.threads} threads; "
          f"runs: {args.steps} steps, {args.eval_prompts} held-out prompts")  # fmt: skip
    print(report(results))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
