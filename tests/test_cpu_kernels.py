"""The engine's bf16 linear kernel (model/csrc/cpu_linear.cpp, --cpu_linear blocked; the AVX512-BF16
build, or the AVX2 one on CPUs without AVX-512) against float64 matrix products and against torch's
own bf16 kernel (oneDNN's where it can pack bf16), alone and inside the model and the engine; and the
int8 and int4 kernels of the AVX-512 build. Skipped, with the reason, where a kernel cannot be built
(no AVX2, no AVX512-VNNI for the int kernels, no compiler or ninja)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common import CONFIGS, chunked_logits, prompts, random_model, write_model
from launchers import REPO, base_env, torchrun

from distributed.pipeline import GenerationParams, Pipeline
from model.cpu_kernels import (
    ISA_NAMES,
    BlockedLinear,
    PackedLinear,
    blocked_kernels,
    blocked_kernels_error,
    packing_error,
    prepare_cpu_linears,
    unpack_linears,
)
from model.layers import fuse_projections


@pytest.fixture(scope="module")
def kernels():  # noqa: ANN201 - the compiled extension module
    k = blocked_kernels(log=True)
    if k is None:
        pytest.skip(f"the engine's kernels are unavailable here: {blocked_kernels_error()}")
    return k


@pytest.fixture(scope="module")
def int_kernels(kernels):  # noqa: ANN001, ANN201 - the extension module, with its int8 and int4 kernels
    if not hasattr(kernels, "int8_linear"):
        pytest.skip(f"the int8 and int4 kernels need AVX512-VNNI; this CPU's build is {kernels.ISA}")
    return kernels


def ulp_bound(ref: torch.Tensor, k: int) -> torch.Tensor:
    """What a correct bf16 result may differ from the exact one by: half a bf16 ulp of the result
    (the final rounding) plus fp32 accumulation over k terms."""
    return ref.abs() * 2.0**-8 + 1e-6 * k


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("n", "k"), [(8, 32), (64, 96), (200, 544), (1024, 4096)])
def test_kernel_matches_float64_and_is_batch_invariant(kernels, n: int, k: int) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)
    wb = kernels.block_weight(w)
    assert wb.shape == w.shape and torch.equal(kernels.unblock_weight(wb), w)
    x = torch.randn(9, k, generator=g).to(torch.bfloat16)
    y = kernels.blocked_linear(x, wb)
    assert y.dtype == torch.bfloat16 and y.shape == (9, n)
    exact = x.double() @ w.double().T  # the independent reference
    assert ((y.double() - exact).abs() <= ulp_bound(exact, k)).all()
    onednn = torch.nn.functional.linear(x, w).double()  # no less accurate than torch's own bf16 product
    assert (y.double() - exact).abs().max() <= (onednn - exact).abs().max() * 1.05 + 1e-6 * k
    # Every row gives the same bits whatever it is batched with (1, 2, 3, ... rows per call).
    for m in range(1, 9):
        assert torch.equal(kernels.blocked_linear(x[:m], wb), y[:m])
    assert torch.equal(torch.cat([kernels.blocked_linear(x[i : i + 1], wb) for i in range(9)]), y)
    # [..., in] inputs and an empty batch keep their leading shape.
    assert torch.equal(kernels.blocked_linear(x.view(3, 3, k), wb), y.view(3, 3, n))
    assert kernels.blocked_linear(x[:0], wb).shape == (0, n)


@pytest.mark.timeout(60)
def test_kernel_rejects_what_it_cannot_take(kernels) -> None:  # noqa: ANN001
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernels.block_weight(torch.zeros(12, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bf16 weight"):
        kernels.blocked_linear(torch.zeros(1, 64, dtype=torch.bfloat16), kernels.block_weight(torch.zeros(8, 64)))
    wb = kernels.block_weight(torch.zeros(8, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="in features"):
        kernels.blocked_linear(torch.zeros(1, 32, dtype=torch.bfloat16), wb)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("h", "hkv", "d", "keys"), [(4, 4, 16, 1), (8, 2, 16, 13), (12, 4, 32, 37), (32, 8, 128, 300),
                                                     (16, 2, 64, 64), (10, 2, 32, 5), (12, 2, 96, 20)])  # fmt: skip
def test_decode_attention_matches_float64(kernels, h: int, hkv: int, d: int, keys: int) -> None:  # noqa: ANN001
    """The one-query bf16 attention kernel (decode) against float64 softmax attention, on what the engine
    passes it: slices of a larger cache (strided over rows and keys), holes in the mask, grouped query
    heads, and a row that may attend no key (zeros)."""
    g = torch.Generator().manual_seed(h * keys + d)
    b = 3
    ck, cv = (torch.randn(b + 1, keys + 5, hkv, d, generator=g).to(torch.bfloat16) for _ in range(2))
    k, v = ck[1:, :keys], cv[1:, :keys]
    q = torch.randn(b, h, d, generator=g).to(torch.bfloat16)
    mask = torch.rand(b, keys, generator=g) > 0.3
    mask[:2, 0] = True
    mask[1, 64:128] = False  # the kernel splits the keys in chunks of 64: one with no key to attend
    mask[2] = False
    out = kernels.decode_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and out.shape == (b, h, d)
    rep = h // hkv  # query head j uses kv head j // rep
    kd, vd = (t.double().repeat_interleave(rep, dim=2) for t in (k, v))  # [b, keys, h, d]
    s = torch.einsum("bhd,bkhd->bhk", q.double(), kd) / d**0.5
    p = torch.softmax(s.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)
    ref = torch.einsum("bhk,bkhd->bhd", p[:2], vd[:2])
    # half a bf16 ulp (the final rounding) plus fp32 arithmetic
    assert ((out[:2].double() - ref).abs() <= ref.abs() * 2.0**-8 + 1e-5).all()
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.timeout(60)
def test_int8_kernel_rejects_what_it_cannot_take(int_kernels) -> None:  # noqa: ANN001
    kernels = int_kernels
    with pytest.raises(RuntimeError, match="int8 weight"):
        kernels.int8_linear(torch.zeros(1, 64), torch.zeros(16, 64), torch.ones(16), 0, 16)
    with pytest.raises(RuntimeError, match="padded to 16"):
        kernels.int8_linear(torch.zeros(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), 0, 8)
    with pytest.raises(RuntimeError, match="group of 32n"):
        kernels.int8_linear(torch.zeros(1, 64), torch.zeros(16, 64, dtype=torch.int8), torch.ones(16, 4).half(), 16, 16)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_blocked_model_is_as_close_to_fp32_as_onednn_and_unpacks_exactly(kernels, name: str) -> None:  # noqa: ANN001
    ref, onednn, blocked = random_model(name), random_model(name, torch.bfloat16), random_model(name, torch.bfloat16)
    original = {k: v.clone() for k, v in blocked.state_dict().items()}
    for m in (onednn, blocked):
        fuse_projections(m)
    prepare_cpu_linears(onednn, "onednn")
    done = prepare_cpu_linears(blocked, "blocked")
    assert f"{ISA_NAMES[kernels.ISA]} kernel" in done, done
    types = {type(m) for m in blocked.modules() if isinstance(m, torch.nn.Linear)}
    assert BlockedLinear in types  # moe: the 4-expert router (out 4) stays on oneDNN (or torch's kernel)
    assert types <= {BlockedLinear, PackedLinear if not packing_error() else torch.nn.Linear}
    toks = prompts(lengths=(33,))[0]
    want = chunked_logits(ref, toks, 33).float()
    err_blocked = (chunked_logits(blocked, toks, 5).float() - want).abs().max()
    err_onednn = (chunked_logits(onednn, toks, 5).float() - want).abs().max()
    assert err_blocked <= 1.5 * err_onednn, (err_blocked, err_onednn)
    assert unpack_linears(blocked) > 0
    from model.layers import unfuse_projections

    unfuse_projections(blocked)
    after = blocked.state_dict()
    assert set(after) == set(original) and all(torch.equal(after[k], original[k]) for k in original)


@pytest.mark.timeout(300)
def test_compiled_decode_with_blocked_linears_gives_the_eager_tokens(kernels) -> None:  # noqa: ANN001
    # dynamo keeps recompiling one code object (Transformer._step) for a few shapes only, then runs it
    # eagerly: start and leave this process's compile caches empty, as other tests expect them
    torch._dynamo.reset()
    try:
        compiled_matches_eager()
    finally:
        torch._dynamo.reset()


def compiled_matches_eager() -> None:
    eager, compiled = random_model("dense", torch.bfloat16), random_model("dense", torch.bfloat16)
    for m in (eager, compiled):
        fuse_projections(m)
        prepare_cpu_linears(m, "blocked")
    compiled.compile_decode()
    ps = prompts(lengths=(5, 19))
    params = GenerationParams(max_tokens=12, eos_ids=(), num_microbatches=1)
    want = Pipeline(eager, 0, 1, torch.device("cpu"), None).generate(ps, params)
    got = Pipeline(compiled, 0, 1, torch.device("cpu"), None).generate(ps, params)
    assert got == want and compiled.compile_seconds > 0


@pytest.mark.timeout(420)
def test_engine_picks_the_kernel_and_two_stages_give_one_stage_tokens(kernels, tmp_path: Path) -> None:  # noqa: ANN001
    """Through the command line: auto takes the blocked kernel at batch 1 and oneDNN at batch 16;
    bf16 greedy tokens with the blocked kernel are the same for P = 1 and P = 2."""
    model_dir = write_model(tmp_path / "m", CONFIGS["dense"], dtype=torch.bfloat16)
    bench = [sys.executable, "-m", "launch", "bench", str(model_dir), "--prompt_len", "8", "--new_tokens", "4",
             "--repeat", "1", "--warmup", "0", "--json", "--quiet"]  # fmt: skip
    seen = {}
    for extra in (["--batch_size", "1"], ["--batch_size", "16"], ["--batch_size", "1", "--cpu_linear", "onednn"]):
        r = subprocess.run([*bench, *extra], cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        out = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("{")))
        seen[" ".join(extra)] = out["ranks"][0]["cpu_linears"]
    assert set(seen["--batch_size 1"]) == {"blocked"}, seen
    if packing_error():  # oneDNN cannot pack bf16 on this CPU: blocked at any batch, torch's own if asked
        assert set(seen["--batch_size 16"]) == {"blocked"}, seen
        assert set(seen["--batch_size 1 --cpu_linear onednn"]) == set(), seen
    else:
        assert set(seen["--batch_size 16"]) == {"onednn"}, seen
        assert set(seen["--batch_size 1 --cpu_linear onednn"]) == {"onednn"}, seen

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"tokens": p}) + "\n" for p in prompts(lengths=(5, 19))))
    common = ["-m", "launch", "generate", str(model_dir), "--input", str(inp), "--max_tokens", "12",
              "--cpu_linear", "blocked"]  # fmt: skip
    one = subprocess.run([sys.executable, *common, "--output", str(tmp_path / "p1.jsonl")], cwd=REPO,
                         env=base_env(), capture_output=True, text=True, timeout=180)  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert f"{ISA_NAMES[kernels.ISA]} kernel" in one.stderr, one.stderr
    job = torchrun(2, [*common, "--output", str(tmp_path / "p2.jsonl"), "--num_pipeline_ranks", "2"])
    _, err = job.communicate(timeout=360)
    assert job.returncode == 0, err
    assert (tmp_path / "p2.jsonl").read_text() == (tmp_path / "p1.jsonl").read_text()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("n", "k", "group"), [(8, 32, 0), (200, 544, 0), (1024, 4096, 0), (8, 32, 32),
                                              (200, 544, 32), (1024, 4096, 64), (48, 384, 128)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_matches_float64_and_is_batch_invariant(int_kernels, n: int, k: int, group: int,  # noqa: ANN001
                                                            dtype: torch.dtype) -> None:
    """Per output channel (group 0) and group-wise: against the weight written out in float64 from
    the canonical tensors (within the kernel's 14-bit rounding of x per chunk of inputs and fp32
    sums), and every prefix of the batch against the batch. Out features not a multiple of 16 are
    padded inside."""
    kernels = int_kernels
    from model.quant import QuantLinear, QuantSpec, quantize

    spec = QuantSpec("int8", group or None)
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[: n // 2, : k // 2] *= 30  # groups (and rows) of very different magnitude
    canonical = quantize(w, spec)
    mod = QuantLinear.from_tensors({n: t.clone() for n, t in canonical.items()}, spec, k)  # prepare re-lays in place
    mod.prepare()
    assert mod.kernel == "int8blk"
    assert all(torch.equal(a, b) for a, b in zip(mod.canonical().values(), canonical.values(), strict=True))
    x = torch.randn(7, k, generator=g).to(dtype)
    x[:, 1] *= 50  # an outlier input channel
    y = mod(x)
    assert y.dtype == dtype and y.shape == (7, n)
    s = canonical["scales"].double()
    q = canonical["qweight"].double()
    w64 = q * s[:, None] if not group else (q.view(n, k // group, group) * s[..., None]).view(n, k)
    exact = x.double() @ w64.T  # the independent reference
    # x rounded to 14 bits per chunk of C inputs (half a step: amax / 8191 / 2 per entry), fp32 sums, and
    # for a bf16 output its final rounding
    c = min(group, 128) if group else next(c for c in (128, 64, 32) if k % c == 0)
    half_step = (x.double().view(7, k // c, c).abs().amax(-1, keepdim=True) / 8191 / 2).expand(7, k // c, c)
    rounding = half_step.reshape(7, k) @ w64.abs().T
    scale = x.double().abs() @ w64.abs().T
    bound = exact.abs() * (2.0**-8 if dtype == torch.bfloat16 else 0) + rounding * (1 + 1e-3) + 1e-6 * scale
    assert ((y.double() - exact).abs() <= bound).all()
    assert (y.double() - exact).abs().max() > 0  # not trivially: x is rounded
    raw = kernels.int8_linear(x, mod.qweight, mod.scales, group, n)
    for m in range(1, 8):
        assert torch.equal(kernels.int8_linear(x[:m], mod.qweight, mod.scales, group, n), raw[:m])


def int4_reference(x: torch.Tensor, canonical: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """What the int4 kernel is specified to compute, written independently in float64: x quantized to
    int8 per group (sx = amax / 127, qx = round(x * 127 / amax) in float32, as llama.cpp's Q8 blocks),
    y = W x^ for x^ = sx * qx: y[n] = sum_g sx[g] * (scale[n, g] * (q[n, g] . qx[g]) + min[n, g] * sum(qx[g]))."""
    from model.quant import unpack_nibbles

    m, k = x.shape
    xg = x.float().view(m, k // group, group)
    amax = xg.abs().amax(-1, keepdim=True)
    # (127 / tensor would be 127 * reciprocal(tensor) in torch: not the correctly rounded quotient)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    qx = torch.round(xg * inv).double()
    sx = (amax / 127).double()
    q = unpack_nibbles(canonical["qweight"]).double().view(-1, k // group, group)  # [N, G, g]
    dots = torch.einsum("mgi,ngi->mng", qx, q)  # [M, N, G]
    s, mn = canonical["scales"].double(), canonical["mins"].double()  # [N, G]
    sx = sx.squeeze(-1)  # [M, G]
    return (dots * sx[:, None, :] * s[None]).sum(-1) + (sx * qx.sum(-1)) @ mn.T


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("n", "k", "group"), [(16, 32, 32), (208, 544, 32), (96, 256, 64), (1024, 4096, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_its_arithmetic_and_is_batch_invariant(int_kernels, n: int, k: int, group: int,  # noqa: ANN001
                                                                   dtype: torch.dtype) -> None:
    """The engine's int4 kernel (int8 activations, AVX512-VNNI) against the same arithmetic in float64,
    the weight against its dequantized product, and every row alone against the batch."""
    kernels = int_kernels
    from model.quant import QuantLinear, QuantSpec, dequantize, int4_block_weight, int4_unblock_weight, quantize

    spec = QuantSpec("int4", group)
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[:, 5] *= 10  # an outlier input channel
    canonical = quantize(w, spec)
    packed, sm = int4_block_weight(canonical, group)
    back = int4_unblock_weight(packed, sm)
    assert all(torch.equal(back[s], canonical[s]) for s in canonical)
    mod = QuantLinear.from_tensors(dict(canonical), spec, k)
    mod.prepare()
    assert mod.kernel == "int4blk" and torch.equal(mod.qweight, packed) and torch.equal(mod.scales, sm)
    x = torch.randn(7, k, generator=g).to(dtype)
    x[0, :group] = 0  # an all-zero group
    y = mod(x)
    assert y.dtype == dtype and y.shape == (7, n)
    raw = kernels.int4_linear(x, mod.qweight, mod.scales, group)
    spec_ref = int4_reference(x, canonical, group)
    # fp32 accumulation of exact integer dot products: float rounding only
    assert ((raw.double() - spec_ref).abs() <= 1e-5 * spec_ref.abs() + 1e-5 * (k / 32)).all()
    # and close to the dequantized weight's product (x's rounding to int8 per group: ~1 % here)
    exact = x.double() @ dequantize(canonical, "int4", torch.float64).T
    assert (raw.double() - exact).abs().max() <= 2e-2 * exact.abs().max()
    for m in range(1, 7):
        assert torch.equal(kernels.int4_linear(x[:m], mod.qweight, mod.scales, group), raw[:m])
    assert torch.equal(torch.cat([kernels.int4_linear(x[i : i + 1], mod.qweight, mod.scales, group)
                                  for i in range(7)]), raw)  # fmt: skip
