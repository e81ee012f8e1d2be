"""Build a Hugging Face MistralForCausalLM / MixtralForCausalLM from Mistral-native weights (for tests).

    model = build_hf_model(params, state_dict)   # eval mode, float32, eager attention
    model(torch.tensor([tokens])).logits[0]       # [T, vocab]

`params` is the params.json dict, `state_dict` uses the Mistral-native names of docs/DESIGN.md.
Mistral's rotary is interleaved-pair, Hugging Face's is rotate-half, so wq / wk rows are permuted per
head. Mixtral experts: transformers 5 fuses them into 3D `mlp.experts.gate_up_proj` [E, 2*hidden, dim]
(w1 rows then w3 rows) and `mlp.experts.down_proj` [E, dim, hidden]; transformers 4 keeps
`block_sparse_moe.experts.{e}.w1|w2|w3.weight`. Both are handled.
"""

from __future__ import annotations

import torch
from torch import Tensor


def permute_for_rotate_half(w: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """Reorder each head's rows from interleaved pairs (0,1),(2,3).. to halves (0..D/2-1 | D/2..D-1)."""
    dim = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def build_hf_model(params: dict, state_dict: dict[str, Tensor]) -> torch.nn.Module:
    import transformers

    n_heads, n_kv_heads = params["n_heads"], params["n_kv_heads"]
    head_dim = params.get("head_dim") or params["dim"] // n_heads
    window = params.get("sliding_window")
    theta = params.get("rope_theta") or (10000.0 if window is not None else 1e6)
    moe = params.get("moe")
    kwargs: dict = dict(
        hidden_size=params["dim"], intermediate_size=params["hidden_dim"],
        num_hidden_layers=params["n_layers"], num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=head_dim, rms_norm_eps=params["norm_eps"], vocab_size=params["vocab_size"],
        sliding_window=window, tie_word_embeddings=False, attn_implementation="eager",
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        kwargs["rope_theta"] = theta
    model: torch.nn.Module
    if moe:
        config = transformers.MixtralConfig(num_local_experts=moe["num_experts"],
                                            num_experts_per_tok=moe["num_experts_per_tok"], **kwargs)
        model = transformers.MixtralForCausalLM(config)
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kwargs))
    hf_keys = set(model.state_dict())

    sd = {k: v.float() for k, v in state_dict.items()}
    out: dict[str, Tensor] = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(params["n_layers"]):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "self_attn.q_proj.weight"] = permute_for_rotate_half(
            sd[src + "attention.wq.weight"], n_heads, head_dim)
        out[dst + "self_attn.k_proj.weight"] = permute_for_rotate_half(
            sd[src + "attention.wk.weight"], n_kv_heads, head_dim)
        out[dst + "self_attn.v_proj.weight"] = sd[src + "attention.wv.weight"]
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attention.wo.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
        ff = src + "feed_forward."
        if not moe:
            out[dst + "mlp.gate_proj.weight"] = sd[ff + "w1.weight"]
            out[dst + "mlp.up_proj.weight"] = sd[ff + "w3.weight"]
            out[dst + "mlp.down_proj.weight"] = sd[ff + "w2.weight"]
            continue
        experts = range(moe["num_experts"])
        if dst + "mlp.experts.gate_up_proj" in hf_keys:  # transformers 5: fused 3D expert tensors
            out[dst + "mlp.gate.weight"] = sd[ff + "gate.weight"]
            ex = [f"{ff}experts.{e}." for e in experts]
            out[dst + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([sd[x + "w1.weight"], sd[x + "w3.weight"]]) for x in ex])  # [E, 2*hid, dim]
            out[dst + "mlp.experts.down_proj"] = torch.stack([sd[x + "w2.weight"] for x in ex])  # [E,dim,hid]
        else:  # transformers 4: block_sparse_moe with one module per expert, Mistral's w1/w2/w3 names
            out[dst + "block_sparse_moe.gate.weight"] = sd[ff + "gate.weight"]
            for e in experts:
                for w in ("w1", "w2", "w3"):
                    out[f"{dst}block_sparse_moe.experts.{e}.{w}.weight"] = sd[f"{ff}experts.{e}.{w}.weight"]
    model.load_state_dict(out, strict=True)
    return model.float().eval()


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy generate, exactly n new tokens per prompt (no EOS stop), one prompt at a time."""
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,  # type: ignore[operator]
                                 eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out
