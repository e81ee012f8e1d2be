"""Hugging Face directories (config.json + sharded safetensors), written by transformers'
save_pretrained: greedy fp32 tokens identical to transformers for P = 1, 2, 3."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from common import prompts
from hf_reference import hf_greedy
from launchers import torchrun

from distributed.pipeline import GenerationParams, Pipeline
from model.args import ConfigError
from model.checkpoint import load_stage
from model.formats import open_source
from model.formats.hf import HFSource

MAX_TOKENS = 20
PROMPTS = prompts(lengths=(5, 19, 33), vocab=256)
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-5, attn_implementation="eager")
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral_window": ("MistralForCausalLM", dict(SMALL, sliding_window=8)),
    "mixtral": ("MixtralForCausalLM", dict(SMALL, sliding_window=8, num_local_experts=4, num_experts_per_tok=2)),
    "llama_tied": ("LlamaForCausalLM", dict(SMALL, tie_word_embeddings=True, head_dim=24)),
}


def hf_model(arch: str, kwargs: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A transformers model with random weights at unit activation scale (peaked logits)."""
    import transformers

    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**kwargs)
    model = getattr(transformers, arch)(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    arch, kwargs = MODELS[request.param]
    model = hf_model(arch, kwargs)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="100KB")  # several shards and an index
    assert (path / "model.safetensors.index.json").is_file()
    return path, hf_greedy(model, PROMPTS, MAX_TOKENS)


@pytest.mark.timeout(120)
def test_one_process_matches_transformers(saved: tuple[Path, list[list[int]]]) -> None:
    path, expected = saved
    pipe = Pipeline(load_stage(path), 0, 1, torch.device("cpu"), None)
    assert pipe.generate(PROMPTS, GenerationParams(max_tokens=MAX_TOKENS, eos_ids=())) == expected
    chunked = pipe.generate(PROMPTS, GenerationParams(max_tokens=MAX_TOKENS, eos_ids=(), chunk_size=3,
                                                      num_microbatches=2))
    assert chunked == expected


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_matches_transformers(saved: tuple[Path, list[list[int]]], stages: int, tmp_path: Path) -> None:
    path, expected = saved
    out = tmp_path / "out.json"
    proc = torchrun(stages, ["tests/pipeline_worker.py", str(path), "--out", str(out), "--prompts",
                             json.dumps(PROMPTS), "--max_tokens", str(MAX_TOKENS), "--microbatches", "1,2",
                             "--chunks", "0,3"])
    _, err = proc.communicate(timeout=200)
    assert proc.returncode == 0, err[-3000:]
    for key, tokens in json.loads(out.read_text()).items():
        if key.startswith("greedy"):
            assert tokens == expected, key


@pytest.mark.timeout(60)
def test_each_stage_opens_only_its_shards(saved: tuple[Path, list[list[int]]]) -> None:
    path, _ = saved
    src = HFSource(path)
    load_stage(src, layers=[3], first=False, last=True)
    opened = {p.name for p in src._files}
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for name, f in index.items()
              if name.startswith("model.layers.3.") or name in ("model.norm.weight", "lm_head.weight")
              or (name == "model.embed_tokens.weight" and src.tied)}
    assert opened == needed
    assert len(opened) < len(set(index.values()))


def _config_edit(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change, words", [
    (dict(architectures=["GPT2LMHeadModel"]), ["GPT2LMHeadModel", "not supported"]),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), ["rope_type", "llama3"]),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), ["rope_scaling", "linear"]),
    (dict(attention_bias=True), ["attention_bias"]),
    (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
])
def test_refused_configs(tmp_path: Path, change: dict[str, Any], words: list[str]) -> None:
    arch, kwargs = MODELS["mistral_window"]
    hf_model(arch, dict(kwargs, num_hidden_layers=1)).save_pretrained(tmp_path)
    _config_edit(tmp_path, **change)
    with pytest.raises(ConfigError) as e:
        open_source(tmp_path)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


@pytest.mark.timeout(60)
def test_missing_and_misnamed_shards(tmp_path: Path) -> None:
    arch, kwargs = MODELS["mistral_window"]
    hf_model(arch, kwargs).save_pretrained(tmp_path, max_shard_size="100KB")
    index = tmp_path / "model.safetensors.index.json"
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(ConfigError, match=f"names shard {shards[1].name}, which is missing"):
        open_source(tmp_path)
    raw = json.loads(index.read_text())
    wm = raw["weight_map"]
    raw["weight_map"] = {k: ("elsewhere.safetensors" if v == shards[1].name else v) for k, v in wm.items()}
    index.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="names shard elsewhere.safetensors"):
        open_source(tmp_path)


@pytest.mark.timeout(60)
def test_config_dtype_is_the_default_run_dtype(tmp_path: Path) -> None:
    arch, kwargs = MODELS["mistral_window"]
    hf_model(arch, dict(kwargs, num_hidden_layers=1)).save_pretrained(tmp_path)  # fp32 tensors
    assert open_source(tmp_path).default_dtype == torch.float32
    _config_edit(tmp_path, dtype="bfloat16")
    assert open_source(tmp_path).default_dtype == torch.bfloat16
    _config_edit(tmp_path, dtype=None, torch_dtype="float16")  # the older key
    assert open_source(tmp_path).default_dtype == torch.float16
