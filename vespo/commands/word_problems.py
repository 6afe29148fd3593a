"""Write the word-problem dataset as veRL-schema Parquet, or measure a model's base rate on it.

vespo word-problems data/word_problems.parquet --rows 2400 --seed 0
vespo word-problems --base-rate 40 --model smollm2-135m
"""

from __future__ import annotations

import argparse

from rollout.tasks.word_problems import reward, rows, write_parquet


def base_rate(model_path: str, count: int = 40, seed: int = 1, max_new_tokens: int = 64, temperature: float = 0.0):
    """The fraction of `count` problems a model answers right (transformers generate, one
    sample each; temperature 0 is greedy). Returns (rate, [(question, answer, response), ...])."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    for row in rows(count, seed):
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id, **sampling)
        text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        out.append((row["extra_info"]["question"], row["reward_model"]["ground_truth"], text))
    rate = sum(reward(text, answer) for _, answer, text in out) / max(len(out), 1)
    return rate, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vespo word-problems", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="the Parquet file to write")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--system", default=None, help="an optional system turn before every problem")
    parser.add_argument(
        "--base-rate", type=int, default=0, metavar="N",
        help="instead of writing, generate for N problems with --model and print the fraction answered right",
    )  # fmt: skip
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.base_rate:
        from vespo.models import resolve_model

        rate, out = base_rate(resolve_model(args.model), args.base_rate, args.seed, temperature=args.temperature)
        for question, answer, text in out:
            mark = "ok " if reward(text, answer) else "   "
            print(f"{mark} [{answer}] {question!r} -> {text[:100]!r}")
        print(f"base rate: {rate:.1%} of {len(out)} ({args.model}, temperature {args.temperature})")
        return
    if not args.out:
        parser.error("give the output Parquet path (or --base-rate N)")
    path = write_parquet(args.out, args.rows, args.seed, args.split, args.system)
    print(f"wrote {args.rows} rows to {path}")


if __name__ == "__main__":
    main()
