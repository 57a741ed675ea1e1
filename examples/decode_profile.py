"""Where the host time of one greedy decode step goes, eager vs fastllm-patched (GPU diagnostic).

    python examples/decode_profile.py [--shape 1b] [--tokens 8]

Builds the bench's random QLoRA model, generates ``--tokens`` tokens per provider under the torch profiler
and prints the ops with the most host (CPU) time, their call counts and the decode latency per token.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


def main() -> None:
    from fastllm import PatchConfig, patch, unpatch
    from fastllm.bench.compile import build_qlora, measure_train

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1b")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--rows", type=int, default=35)
    p.add_argument("--train-first", action="store_true", help="two training steps before (as bench compile does)")
    p.add_argument("--providers", default="eager,fastllm", help="from eager, fastllm, fastllm+compile")
    args = p.parse_args()
    model = build_qlora(args.shape, torch.device("cuda"))
    x = torch.randint(0, model.config.vocab_size, (1, 64), device="cuda")
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, use_cache=True)
    for provider in args.providers.split(","):
        unpatch(model)
        if provider != "eager":
            patch(model, PatchConfig(compile=provider == "fastllm+compile", gradient_checkpointing=True))
        torch._dynamo.reset()
        if args.train_first:
            measure_train(model, batch=2, seq=1024, steps=1)
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.generate(input_ids=x, **gen)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(input_ids=x, **gen)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                model.generate(input_ids=x, **gen)
                torch.cuda.synchronize()
        print(f"\n=== {provider}: generate {args.tokens} tokens {dt * 1e3:.1f} ms "
              f"({dt * 1e3 / args.tokens:.2f} ms a token incl. prefill of 64)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            stats = cProfile.Profile()
            stats.runcall(model.generate, input_ids=x, **gen)
        pstats.Stats(stats).sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
