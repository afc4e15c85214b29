"""A/B prefill and decode speed of two artifacts with KV-cache step functions, alternating in one
process.

    TVM_NUM_THREADS=1 python scripts/ab_decode.py A.so B.so [--new-tokens 128] [--rounds 6] [--forward]

Each round prefills the same 128-token prompt (the Wikipedia text) into both artifacts and decodes
greedily, in alternating order; prints the median and every round's prefill and decode tokens/s,
and whether the two artifacts produced the same tokens. ``--forward`` also times one full ``main``
pass (``seq_len`` tokens of the same text) per round. For changes that should not move the numbers
(a schedule, a prefetch), where a separate `bench model` run's machine noise is larger than the
effect.
"""

import argparse
import statistics
import time

import numpy as np

from shiftadd_tvm import runtime
from shiftadd_tvm.bench_model import time_generate
from shiftadd_tvm.models import load_model
from shiftadd_tvm.text import token_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs=2, help="two .so files compiled with decode steps")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per round")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds (median)")
    ap.add_argument("--forward", action="store_true", help="also time one full main pass a round")
    args = ap.parse_args()
    rts = [runtime.load(p) for p in args.artifacts]
    _, tok = load_model(rts[0].manifest.get("tokenizer") or rts[0].manifest["model"])
    prompt = np.asarray(token_ids(tok, "wiki", 0, 128))

    window = np.asarray(token_ids(tok, "wiki", 0, rts[0].seq_len))[None]

    def run(rt, new):
        prefill_s, decode_s, out = time_generate(rt, prompt, new)
        speeds = (len(prompt) / prefill_s, (new - 1) / decode_s)
        if args.forward:
            t0 = time.perf_counter()
            rt(window)
            speeds += (window.size / (time.perf_counter() - t0),)
        return speeds, out.tolist()

    for rt in rts:  # warm-up
        run(rt, 8)
    speeds: list[list[tuple[float, ...]]] = [[], []]
    tokens = [None, None]
    for r in range(args.rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            tps, tokens[i] = run(rts[i], args.new_tokens)
            speeds[i].append(tps)
    for path, s in zip(args.artifacts, speeds, strict=True):
        for j, what in enumerate(("prefill", "decode", "main forward")[: len(s[0])]):
            vals = [v[j] for v in s]
            rounds = " ".join(f"{v:.1f}" for v in vals)
            print(f"{path}: {what} {statistics.median(vals):.1f} tok/s (rounds: {rounds})")
    print(f"same tokens: {tokens[0] == tokens[1]}")


if __name__ == "__main__":
    main()
