"""The human-readable bench report (--json prints the same numbers as one object)."""

from __future__ import annotations

from typing import Any

from launch.bench.measure import GB


def _fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / GB:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_report(r: dict[str, Any]) -> None:
    print(
        f"model {r['model']}, {r['dtype']} on {r['device']}, P={r['num_pipeline_ranks']} "
        f"M={r['num_microbatches']} (decode {r.get('decode_microbatches', r['num_microbatches'])}) "
        f"chunk={r['chunk_size']} threads/rank={r['threads_per_rank']}"
    )
    print(
        f"batch {r['batch_size']} x prompt {r['prompt_len']} tokens, {r['new_tokens']} new tokens each "
        f"(median of {r['repeat']} run(s) after {r['warmup']} warm-up)"
    )
    print(f"  time to first token   {r['ttft_s'] * 1000:10.1f} ms")
    print(f"  prefill               {r['prefill_tok_s']:10.1f} tokens/s  ({r['prefill_s'] * 1000:.1f} ms)")
    print(
        f"  decode                {_fmt(r['decode_tok_s'], '10.1f')} tokens/s  "
        f"({_fmt(r['decode_ms_per_token'], '.1f')} ms per token per sequence)"
    )
    if "decode_floor_ms_per_token" in r:
        print(
            f"  decode floor          {r['decode_floor_ms_per_token']:10.1f} ms per token (bandwidth), "
            f"engine at {_fmt(r.get('decode_vs_floor'), '.2f')}x"
        )
    print(f"  KV cache              {_fmt_bytes(r['kv_bytes'])} in all")
    compile_s = [rk.get("compile_s") or 0.0 for rk in r["ranks"]]
    if any(compile_s):
        print(f"  torch.compile         {', '.join(f'{c:.1f}' for c in compile_s)} s per rank (once, in the warm-ups)")
    util = ", ".join(_fmt(u, ".0%") for u in r["utilization"])
    print(f"  stage utilisation     {util} (time in the stage's compute / request time, per rank)")
    for rk in r["ranks"]:
        bw = rk.get("bandwidth")
        print(
            f"  rank {rk['rank']}: layers {rk['layers'][0]}-{rk['layers'][1]}, weights {_fmt_bytes(rk['weight_bytes'])}"
            f", KV {_fmt_bytes(rk['kv_bytes'])}, peak RSS {_fmt_bytes(rk['peak_rss_bytes'])}"
            f" (budget {_fmt_bytes(rk['rss_budget_bytes'])})"
            + (f", in huge pages {_fmt_bytes(rk['huge_page_bytes'])}" if rk.get("huge_page_bytes") is not None else "")
            + (f", GPU peak {_fmt_bytes(rk['gpu_peak_bytes'])}" if rk["gpu_peak_bytes"] is not None else "")
            + (f", copy {bw['copy_gbs']:.1f} GB/s" if bw else "")
        )
    for name, p in r["peers"].items():
        v = p["vs_engine"]
        print(
            f"  peer {name:12s} ttft {p['ttft_s'] * 1000:.1f} ms, prefill {p['prefill_tok_s']:.1f} tokens/s, "
            f"decode {_fmt(p['decode_tok_s'], '.1f')} tokens/s; vs engine: decode x{_fmt(v['decode_tok_s'], '.2f')}"
            f", prefill x{_fmt(v['prefill_tok_s'], '.2f')}"
        )
