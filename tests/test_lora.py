"""LoRA adapters (model/formats/lora.py) merged at load, against PEFT's own model in transformers.

The reference is independent code: PEFT wraps the transformers model built from the same random
weights (tests/hf_reference.py) and runs the adapter unmerged (x W^T + s x A^T B^T), in HF's
rotate-half q/k layout; the engine merges W + s B A per stage in its interleaved layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from common import BASE, CONFIGS, REPO, prompts, random_state, write_model
from hf_reference import build_hf_model
from safetensors.torch import load_file, save_file

from distributed.pipeline import GenerationParams, Pipeline
from model.args import ConfigError, ModelArgs
from model.checkpoint import expected_shapes, load_stage
from model.formats.files import TensorFile
from model.formats.hf import unpermute_rotate_half
from model.formats.lora import LoraAdapter
from model.transformer import Transformer

R, ALPHA = 8, 16
TOKENS = 24
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARGS = ModelArgs.from_dict(CONFIGS["dense"])

# name -> (config, LoraConfig arguments besides r and lora_alpha)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "q_v_gate_down": ("dense", dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
    "all_with_k_o": ("dense", dict(target_modules=ALL)),
    "rslora": ("dense", dict(target_modules=ALL, use_rslora=True)),
    "layers_1_3": ("dense", dict(target_modules=ALL, layers_to_transform=[1, 3])),
    "rank_alpha_patterns": ("dense", dict(target_modules=ALL, rank_pattern={"v_proj": 2, "layers.2.mlp.down_proj": 3},
                                          alpha_pattern={"q_proj": 4})),
    "regex_targets": ("dense", dict(target_modules=r".*\.(k_proj|o_proj|up_proj)")),
    "moe_attention": ("moe", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
}


def make_peft(params: dict[str, Any], out: Path, seed: int = 0, **cfg: Any) -> Any:
    """PEFT's model on the transformers twin of `params`' random weights, with a random non-zero
    B (PEFT starts B at zero, which would make any merge look right); saved to `out`."""
    from peft import LoraConfig, get_peft_model

    cfg = {"r": R, "lora_alpha": ALPHA, **cfg}
    torch.manual_seed(seed)  # PEFT draws A from the global generator: the same adapter whatever ran before
    model = get_peft_model(build_hf_model(params, random_state(params)), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return model.eval()


def peft_tokens(model: Any, ps: list[list[int]], n: int = TOKENS) -> list[list[int]]:
    out = []
    for p in ps:
        with torch.no_grad():
            ids = model.generate(input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def engine_tokens(stage: Transformer, ps: list[list[int]], n: int = TOKENS) -> list[list[int]]:
    return Pipeline(stage, 0, 1, torch.device("cpu"), None).generate(ps, GenerationParams(max_tokens=n, eos_ids=()))


def full_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    w = model.args.sliding_window
    cache = model.make_cache(1, len(tokens) if w is None else min(w, len(tokens)))
    with torch.inference_mode():
        return model(torch.tensor([tokens]), torch.arange(len(tokens))[None], cache)[0]


def load_with(model_dir: Path, adapter: Path, params: dict[str, Any], scale: float = 2.0, **kw: Any) -> Transformer:
    return load_stage(model_dir, lora=LoraAdapter.load(adapter, ModelArgs.from_dict(params), scale=scale), **kw)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_model(root / name, CONFIGS[name]) for name in ("dense", "moe")}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """One PEFT adapter (q, v, gate, down) and its model, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("good") / "adapter"
    return make_peft(CONFIGS["dense"], out, **VARIANTS["q_v_gate_down"][1]), out


# -- PEFT adapters ------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_matches_peft_model(variant: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    config, cfg = VARIANTS[variant]
    params = CONFIGS[config]
    peft = make_peft(params, tmp_path / "adapter", **cfg)
    stage = load_with(model_dirs[config], tmp_path / "adapter", params)
    ps = prompts()
    for p in ps:
        with torch.no_grad():
            ref = peft(input_ids=torch.tensor([p])).logits[0]
        assert (full_logits(stage, p) - ref).abs().max().item() <= 1e-4
    got = engine_tokens(stage, ps)
    assert got == peft_tokens(peft, ps)
    assert all(len(set(t)) > 3 for t in got)  # non-trivial continuations
    # The adapter matters: without it the tokens differ (so a merge that did nothing would fail).
    assert engine_tokens(load_stage(model_dirs[config]), ps) != got


@pytest.mark.timeout(120)
def test_layers_to_transform_leaves_other_layers_alone(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    make_peft(CONFIGS["dense"], tmp_path / "adapter", target_modules=ALL, layers_to_transform=[1, 3])
    base = load_stage(model_dirs["dense"]).state_dict()
    merged = load_with(model_dirs["dense"], tmp_path / "adapter", CONFIGS["dense"]).state_dict()
    changed = {n for n in base if not torch.equal(base[n], merged[n])}
    assert changed and all(n.startswith(("layers.1.", "layers.3.")) for n in changed)
    assert len(changed) == 2 * len(ALL)


@pytest.mark.timeout(60)
def test_key_spellings_and_bin_weights_load_the_same(good: tuple[Any, Path], model_dirs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """`.lora_A.default.weight` (an adapter name kept), `.lora_A` (no suffix) and adapter_model.bin."""
    adapter = good[1]
    expected = load_with(model_dirs["dense"], adapter, CONFIGS["dense"]).state_dict()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for name, rename in (("default", lambda k: k.replace(".weight", ".default.weight")),
                         ("bare", lambda k: k.removesuffix(".weight")), ("bin", lambda k: k)):
        out = _copy(adapter, tmp_path / name, "adapter_config.json")
        renamed = {rename(k): v for k, v in tensors.items()}
        if name == "bin":
            torch.save(renamed, out / "adapter_model.bin")
        else:
            save_file(renamed, str(out / "adapter_model.safetensors"))
        got = load_with(model_dirs["dense"], out, CONFIGS["dense"]).state_dict()
        assert all(torch.equal(got[n], expected[n]) for n in expected), name


# -- Mistral's lora.safetensors ------------------------------------------------------------------

HF_TO_NATIVE = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
                "mlp.down_proj": "feed_forward.w2"}


def to_mistral_format(adapter: Path, out: Path, params: dict[str, Any]) -> Path:
    """The PEFT adapter's tensors under native names, q/k B rows in the engine's interleaved layout."""
    heads = {"self_attn.q_proj": params["n_heads"], "self_attn.k_proj": params["n_kv_heads"]}
    native = {}
    for key, t in load_file(str(adapter / "adapter_model.safetensors")).items():
        module, ab = key.removeprefix("base_model.model.model.").split(".lora_")
        i, rest = module.removeprefix("layers.").split(".", 1)
        if ab.startswith("B") and rest in heads:
            t = unpermute_rotate_half(t, heads[rest], params["head_dim"])
        native[f"layers.{i}.{HF_TO_NATIVE[rest]}.lora_{ab}"] = t.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(native, str(out / "lora.safetensors"))
    return out / "lora.safetensors"


@pytest.mark.timeout(120)
def test_mistral_lora_safetensors_matches_peft_model(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    params = CONFIGS["dense"]
    peft = make_peft(params, tmp_path / "adapter", target_modules=ALL)
    file = to_mistral_format(tmp_path / "adapter", tmp_path / "mistral", params)
    ps = prompts()
    expected = peft_tokens(peft, ps)
    for path in (file, file.parent):  # the file itself, or the directory holding it
        stage = load_with(model_dirs["dense"], path, params, scale=ALPHA / R)
        assert engine_tokens(stage, ps) == expected


@pytest.mark.timeout(60)
def test_mistral_format_moe_experts_and_router(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Native names reach MoE experts and the router: each merged weight is W + scale * B A."""
    g = torch.Generator().manual_seed(3)
    names = ["layers.1.feed_forward.experts.2.w1", "layers.1.feed_forward.experts.0.w2", "layers.0.feed_forward.gate"]
    shapes = expected_shapes(ModelArgs.from_dict(CONFIGS["moe"]))
    lora = {}
    for n in names:
        out, inp = shapes[n + ".weight"]
        lora[n + ".lora_A.weight"] = torch.randn(R, inp, generator=g)
        lora[n + ".lora_B.weight"] = torch.randn(out, R, generator=g)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    base = load_stage(model_dirs["moe"]).state_dict()
    merged = load_with(model_dirs["moe"], tmp_path / "lora.safetensors", CONFIGS["moe"], scale=0.5).state_dict()
    for n in merged:
        stem = n.removesuffix(".weight")
        want = base[n] + 0.5 * lora[stem + ".lora_B.weight"] @ lora[stem + ".lora_A.weight"] if stem in names \
            else base[n]
        assert torch.allclose(merged[n], want, atol=1e-6), n


# -- per-stage reading ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_stage_reads_only_its_own_layers(model_dirs: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    make_peft(CONFIGS["dense"], tmp_path / "adapter", target_modules=ALL)
    reads: list[str] = []
    real_get = TensorFile.get

    def spy(self: TensorFile, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        if self.path.parent.name == "adapter":
            reads.append(name)
        return real_get(self, name, dtype)

    monkeypatch.setattr(TensorFile, "get", spy)
    adapter = LoraAdapter.load(tmp_path / "adapter", ARGS, scale=2.0)
    assert reads == []  # load reads the header only
    stage = load_stage(model_dirs["dense"], layers=[2, 3], first=False, last=True, lora=adapter)
    assert len(reads) == 2 * 2 * len(ALL)  # A and B of every target in layers 2 and 3, once each
    assert all(".layers.2." in n or ".layers.3." in n for n in reads)
    monkeypatch.undo()
    whole = load_with(model_dirs["dense"], tmp_path / "adapter", CONFIGS["dense"]).state_dict()
    for n, t in stage.state_dict().items():
        assert torch.equal(t, whole[n])


# -- bad adapters --------------------------------------------------------------------------------


def _copy(good: Path, dst: Path, *names: str) -> Path:
    dst.mkdir()
    for n in names:
        shutil.copy(good / n, dst / n)
    return dst


def _edit_config(good: Path, dst: Path, **changes: Any) -> Path:
    _copy(good, dst, "adapter_model.safetensors")
    cfg = json.loads((good / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def _peft_adapter(tmp: Path, params: dict[str, Any] | None = None, **cfg: Any) -> Path:
    make_peft(params or CONFIGS["dense"], tmp / "bad", **cfg)
    return tmp / "bad"


def _fc1(good: Path, tmp: Path) -> Path:
    """A crafted adapter for another architecture (an MLP with fc1/fc2)."""
    out = _edit_config(good, tmp / "fc1", target_modules=["fc1"])
    save_file({"base_model.model.model.layers.0.mlp.fc1.lora_A.weight": torch.ones(R, 64),
               "base_model.model.model.layers.0.mlp.fc1.lora_B.weight": torch.ones(160, R)},
              str(out / "adapter_model.safetensors"))
    return out


def _experts_on_dense(good: Path, tmp: Path) -> Path:
    (tmp / "experts").mkdir()
    save_file({"layers.0.feed_forward.experts.0.w1.lora_A.weight": torch.ones(R, 64),
               "layers.0.feed_forward.experts.0.w1.lora_B.weight": torch.ones(160, R)},
              str(tmp / "experts" / "lora.safetensors"))
    return tmp / "experts"


def _not_json(good: Path, tmp: Path) -> Path:
    out = _copy(good, tmp / "nj", "adapter_model.safetensors")
    (out / "adapter_config.json").write_text("{")
    return out


def _truncated(good: Path, tmp: Path) -> Path:
    out = _copy(good, tmp / "cut", "adapter_config.json", "adapter_model.safetensors")
    data = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return out


BAD: dict[str, tuple[Any, str]] = {
    "missing_path": (lambda g, t: t / "nope", "does not exist"),
    "empty_dir": (lambda g, t: _copy(g, t / "empty"), "is not a LoRA adapter"),
    "no_config": (lambda g, t: _copy(g, t / "nc", "adapter_model.safetensors"), "no adapter_config.json"),
    "no_weights": (lambda g, t: _copy(g, t / "nw", "adapter_config.json"), "no adapter_model.safetensors"),
    "config_not_json": (_not_json, "not valid JSON"),
    "truncated_weights": (_truncated, "corrupt or truncated"),
    "peft_file_not_dir": (lambda g, t: g / "adapter_model.safetensors", "give its directory"),
    "other_base_hidden_size": (lambda g, t: _peft_adapter(t, dict(BASE, dim=96, sliding_window=8), target_modules=ALL),
                               "another base model"),
    "lm_head_only": (lambda g, t: _peft_adapter(t, target_modules=["lm_head"]), "lm_head"),
    "embed_tokens": (lambda g, t: _peft_adapter(t, target_modules=["embed_tokens"]), "embed_tokens"),
    "fc1": (_fc1, "fc1"),
    "experts_on_dense": (_experts_on_dense, "does not have"),
    "dora": (lambda g, t: _peft_adapter(t, target_modules=["q_proj"], use_dora=True), "use_dora"),
    "bias": (lambda g, t: _edit_config(g, t / "b", bias="all"), "bias"),
    "modules_to_save": (lambda g, t: _edit_config(g, t / "m", modules_to_save=["lm_head"]), "modules_to_save"),
    "rank_mismatch": (lambda g, t: _edit_config(g, t / "r", r=4), "r=4"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_one_line_config_error(case: str, good: tuple[Any, Path], tmp_path: Path) -> None:
    build, expect = BAD[case]
    path = build(good[1], tmp_path)
    with pytest.raises(ConfigError) as e:
        LoraAdapter.load(path, ARGS, scale=2.0).check(ARGS, list(expected_shapes(ARGS)))
    msg = str(e.value)
    assert "\n" not in msg and expect in msg, msg


# -- the command line ----------------------------------------------------------------------------


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    from test_cli import clean_env

    return subprocess.run([sys.executable, "-m", "launch", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=clean_env(), timeout=240)


@pytest.mark.timeout(300)
def test_cli_generate_with_lora(good: tuple[Any, Path], model_dirs: dict[str, Path],
                                tmp_path: Path) -> None:
    peft, adapter = good
    ps = prompts()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"tokens": p}) + "\n" for p in ps))
    r = cli("generate", model_dirs["dense"], "--lora", adapter, "--input", inp, "--output", out,
            "--max_tokens", TOKENS)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line)["tokens"] for line in out.read_text().splitlines()]
    eos = 2  # the tiny tokenizer's; the CLI stops there and leaves it out
    assert got == [t[: t.index(eos)] if eos in t else t for t in peft_tokens(peft, ps)]

    # An adapter for another base model: exit 2, one error line, no output file.
    bad = _peft_adapter(tmp_path, dict(BASE, dim=96, sliding_window=8), target_modules=ALL)
    out2 = tmp_path / "out2.jsonl"
    r = cli("generate", model_dirs["dense"], "--lora", bad, "--input", inp, "--output", out2)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another base model" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert not out2.exists() and not out2.with_name(out2.name + ".partial").exists()


@pytest.mark.timeout(180)
def test_peft_adapter_on_hf_directory(tmp_path: Path) -> None:
    """The usual deployment: a PEFT adapter on the Hugging Face base it was trained on."""
    params = CONFIGS["dense"]
    base = tmp_path / "base"
    build_hf_model(params, random_state(params)).save_pretrained(base, max_shard_size="100KB")
    peft = make_peft(params, tmp_path / "adapter", **VARIANTS["all_with_k_o"][1])
    stage = load_stage(base, lora=LoraAdapter.load(tmp_path / "adapter", ModelArgs.from_dict(params), scale=2.0))
    ps = prompts()
    assert engine_tokens(stage, ps) == peft_tokens(peft, ps)
