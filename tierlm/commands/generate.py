"""``tierlm generate``: complete prompts (from --prompt, or one from stdin), batched, and report speed."""

from __future__ import annotations

import argparse
import sys
import time

from tierlm.cli import engine_config, sampling


def run(args: argparse.Namespace) -> int:
    params = sampling(args)  # invalid values fail before the model loads
    texts = args.prompt or [sys.stdin.read()]
    num_seqs = max(1, len(texts)) if args.max_num_seqs is None else args.max_num_seqs
    config = engine_config(args, max_num_seqs=num_seqs)
    from tierlm.api import LLM

    llm = LLM.from_config(config)
    prompts = [llm.chat_token_ids([{"role": "user", "content": t}]) if args.chat else t for t in texts]
    if args.chat:  # a plain transcript template (base models) must stop where the next turn would begin
        from tierlm.commands.chat import with_template_stops

        params = with_template_stops(llm, params)
    t0 = time.perf_counter()
    if args.stream:
        outputs = []
        for prompt in prompts:
            for out in llm.stream(prompt, params):
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            outputs.append(out)
            print_logprobs(llm, out)
    else:
        outputs = llm.generate(prompts, params)
        for i, out in enumerate(outputs):
            if i:
                print()
            print(out.text)
            print_logprobs(llm, out)
    elapsed = time.perf_counter() - t0
    num_tokens = sum(len(o.token_ids) for o in outputs)
    ttfts = [o.metrics.ttft for o in outputs if o.metrics is not None and o.metrics.ttft is not None]
    ttft = f", TTFT {1000 * sum(ttfts) / len(ttfts):.0f} ms" if ttfts else ""
    reasons = ",".join(sorted({str(o.finish_reason) for o in outputs}))
    print(f"[{num_tokens} tokens in {elapsed:.2f} s, {num_tokens / elapsed:.1f} tok/s{ttft}, finish: {reasons}]",
          file=sys.stderr)
    return 0


def print_logprobs(llm, out) -> None:
    if not out.logprobs:
        return
    for lp in out.logprobs:
        top = "  ".join(f"{llm.tokenizer.decode([t], skip_special_tokens=False)!r}={v:.3f}" for t, v in lp.top)
        piece = llm.tokenizer.decode([lp.token_id], skip_special_tokens=False)
        print(f"  {lp.token_id:>7} {piece!r:<16} {lp.logprob:9.4f}" + (f"   top: {top}" if top else ""))
