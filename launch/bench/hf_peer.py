"""The transformers peer of `python -m launch bench`: Hugging Face's MistralForCausalLM /
MixtralForCausalLM sharing the engine's weight tensors, timed on the same prompts."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from model.args import ConfigError
from model.cpu_kernels import unpack_linears
from model.layers import unfuse_projections
from model.transformer import Transformer

if TYPE_CHECKING:
    from launch.bench.measure import Progress, Timing


def _permute_for_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Mistral's interleaved-pair rotary rows -> Hugging Face's rotate-half rows, per head."""
    dim = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def hf_model_from(model: Transformer) -> torch.nn.Module:
    """A transformers MistralForCausalLM / MixtralForCausalLM sharing this (whole) model's tensors."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "--compare_hf needs Hugging Face transformers, an optional extra: pip install 'transformers>=4.45' "
            "(or pip install -e '.[test]')"
        ) from None
    if not (model.is_first and model.is_last):
        raise ConfigError("--compare_hf needs the whole model in one process: run it with P = 1")
    a = model.args
    kwargs: dict[str, Any] = dict(
        hidden_size=a.dim,
        intermediate_size=a.hidden_dim,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim,
        rms_norm_eps=a.norm_eps,
        vocab_size=a.vocab_size,
        sliding_window=a.sliding_window,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": a.theta}
    else:
        kwargs["rope_theta"] = a.theta
    config: Any
    if a.moe is not None:
        config = transformers.MixtralConfig(
            num_local_experts=a.moe.num_experts, num_experts_per_tok=a.moe.num_experts_per_tok, **kwargs
        )
        cls: Any = transformers.MixtralForCausalLM
    else:
        config = transformers.MistralConfig(**kwargs)
        cls = transformers.MistralForCausalLM
    unpack_linears(model)  # the engine is done with it; transformers needs plain weights
    unfuse_projections(model)  # and the checkpoint's separate q/k/v and w1/w3
    sd = dict(model.state_dict())
    dtype, device = sd["output.weight"].dtype, sd["output.weight"].device
    with torch.device("meta"):
        hf = cls(config).to(dtype)
    keys = set(hf.state_dict())
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(a.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "self_attn.q_proj.weight"] = _permute_for_rotate_half(
            sd[src + "attention.wq.weight"], a.n_heads, a.head_dim
        )
        out[dst + "self_attn.k_proj.weight"] = _permute_for_rotate_half(
            sd[src + "attention.wk.weight"], a.n_kv_heads, a.head_dim
        )
        out[dst + "self_attn.v_proj.weight"] = sd[src + "attention.wv.weight"]
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attention.wo.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
        ff = src + "feed_forward."
        if a.moe is None:
            out[dst + "mlp.gate_proj.weight"] = sd[ff + "w1.weight"]
            out[dst + "mlp.up_proj.weight"] = sd[ff + "w3.weight"]
            out[dst + "mlp.down_proj.weight"] = sd[ff + "w2.weight"]
        elif dst + "mlp.experts.gate_up_proj" in keys:  # transformers 5: fused 3D expert tensors
            ex = [f"{ff}experts.{e}." for e in range(a.moe.num_experts)]
            out[dst + "mlp.gate.weight"] = sd[ff + "gate.weight"]
            out[dst + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([sd[x + "w1.weight"], sd[x + "w3.weight"]]) for x in ex]
            )
            out[dst + "mlp.experts.down_proj"] = torch.stack([sd[x + "w2.weight"] for x in ex])
        else:  # transformers 4: one module per expert
            out[dst + "block_sparse_moe.gate.weight"] = sd[ff + "gate.weight"]
            for e in range(a.moe.num_experts):
                for w in ("w1", "w2", "w3"):
                    out[f"{dst}block_sparse_moe.experts.{e}.{w}.weight"] = sd[f"{ff}experts.{e}.{w}.weight"]
    hf.load_state_dict(out, strict=True, assign=True)
    # Buffers that are computed, not loaded (rotary inv_freq), are still on the meta device: rebuild
    # their modules for real.
    for name, m in list(hf.named_modules()):
        if any(b.is_meta for b in m.buffers(recurse=False)):
            parent_name, _, child = name.rpartition(".")
            with torch.device(device):
                fresh = type(m)(config=hf.config)
            setattr(hf.get_submodule(parent_name) if parent_name else hf, child, fresh)
    left = [n for n, t in (*hf.named_parameters(), *hf.named_buffers()) if t.is_meta]
    if left:
        raise ConfigError(f"--compare_hf: could not materialise {left[0]} for transformers {transformers.__version__}")
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like the engine here
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def time_hf(
    hf: torch.nn.Module, prompts: list[list[int]], new_tokens: int, progress: Progress, label: str
) -> tuple[Timing, list[list[int]]]:
    from transformers.generation.streamers import BaseStreamer

    device = next(hf.parameters()).device
    batch = len(prompts)
    stamps: list[float] = []

    class Stamps(BaseStreamer):  # type: ignore[misc]
        calls = 0

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1
            if self.calls == 1:  # generate() first pushes the prompt
                return
            now = time.perf_counter()
            stamps.extend([now] * batch)
            progress(
                f"{label}: decode {len(stamps)}/{batch * new_tokens} tokens, {len(stamps) / (now - t0):.1f} tokens/s"
            )

        def end(self) -> None:
            return None

    ids = torch.tensor(prompts, device=device)
    progress(f"{label}: prefill", force=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=Stamps(),
            pad_token_id=0,
        )
    t_end = time.perf_counter()
    first = {b: stamps[0] for b in range(batch)}
    from launch.bench.measure import summarize  # the engine's timing rules, applied to the peer alike

    return summarize(t0, first, stamps, t_end, batch, len(prompts[0])), out[:, ids.shape[1] :].tolist()
