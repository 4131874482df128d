"""Rotary embedding in the kernels: rope_write_kv (rotated queries out, rotated keys and values into
their slots) and the plain decode kernel's rotation as it loads (paged_attention(rope=...)),
against float64 references and against transformers' own apply_rotary_pos_emb."""
import pytest
import torch

from sharedecode.kernels import rotary
from sharedecode.kernels.paged_attention import paged_attention
from sharedecode.kernels.rotary import rope_write_kv, rope_write_kv_torch, rotary_torch

from kernel_ref import TOL, make_case, naive_attention, rel_err


def cos_sin(positions: torch.Tensor, d: int, dtype, base: float = 10000.0):
    """As transformers' rotary embedding makes them: [T, D], the halves repeating the angles."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)
    angles = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotated64(x, cos, sin):
    """float64 reference: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    x = x.double()
    return x * cos[:, None].double() + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None].double()


def test_reference_is_transformers_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    t, hq, hkv, d = 7, 4, 2, 16
    q, k = torch.randn(t, hq, d), torch.randn(t, hkv, d)
    cos, sin = cos_sin(torch.arange(100, 100 + t), d, torch.float32)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(rotary_torch(q, cos, sin), q_hf[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rotary_torch(k, cos, sin), k_hf[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,bs", [(8, 2, 64, 16), (4, 4, 80, 8), (6, 1, 128, 32)])
def test_rope_write_kv(dtype, hq, hkv, d, bs, device, monkeypatch):
    monkeypatch.setattr(rotary, "_alloc", lambda shape, dt, dev: torch.full(shape, float("nan"), dtype=dt, device=dev))
    nb, t = 10, 13
    qkv = torch.randn(t, hq + 2 * hkv, d, device=device).to(dtype)  # strided views, as a fused projection gives
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    cos, sin = cos_sin(torch.randint(0, 4000, (t,), device=device), d, dtype)
    kc = torch.randn(nb, bs, hkv, d, device=device).to(dtype)
    vc = torch.randn_like(kc)
    slots = torch.randperm(nb * bs, device=device)[:t]
    slots[3] = -1  # padding: nothing stored, its query still rotated
    a, b = kc.clone(), vc.clone()
    out = rope_write_kv(q, k, v, cos, sin, a, b, slots)
    assert rel_err(out.cpu(), rotated64(q.cpu(), cos.cpu(), sin.cpu())) < TOL[dtype] / 4
    keep = slots >= 0
    stored = a.view(-1, hkv, d)[slots[keep]]
    assert rel_err(stored.cpu(), rotated64(k[keep].cpu(), cos[keep].cpu(), sin[keep].cpu())) < TOL[dtype] / 4
    assert torch.equal(b.view(-1, hkv, d)[slots[keep]], v[keep])
    untouched = torch.ones(nb * bs, dtype=torch.bool, device=device)
    untouched[slots[keep]] = False
    assert torch.equal(a.view(-1, hkv, d)[untouched], kc.view(-1, hkv, d)[untouched])
    assert torch.equal(b.view(-1, hkv, d)[untouched], vc.view(-1, hkv, d)[untouched])
    a2, b2 = kc.clone(), vc.clone()
    out2 = rope_write_kv_torch(q, k, v, cos, sin, a2, b2, slots)
    assert rel_err(out.cpu(), out2.cpu()) < TOL[dtype] / 4 and rel_err(a.cpu(), a2.cpu()) < TOL[dtype] / 4


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_rotates_the_query_and_the_new_key(num_splits, dtype, device):
    """paged_attention(new_kv=..., rope=...) equals attention of the rotated query over a cache
    holding the rotated new key, and stores the rotated key (the slot held NaN before)."""
    d = 64
    case = make_case([(1, 45), (1, 130), (1, 3), (1, 33)], 8, 2, d, 16, dtype, device, share=False)
    q, k_cache, v_cache, bt, ctx, qsl = case
    pos = (ctx - 1).long()
    slots = bt[torch.arange(len(pos)), pos // 16].long() * 16 + pos % 16
    cos, sin = cos_sin(pos, d, dtype)
    new_k = torch.randn(len(pos), 2, d, device=device).to(dtype)
    new_v = v_cache.flatten(0, 1)[slots].clone()
    ref_cache = k_cache.clone()
    ref_cache.view(-1, 2, d)[slots] = rotated64(new_k, cos, sin).to(dtype)
    q_rot = rotated64(q, cos, sin).to(dtype)
    ref = naive_attention(q_rot.cpu(), ref_cache.cpu(), v_cache.cpu(), bt.cpu(), ctx.cpu(), qsl.cpu(), scale=0.125)
    unused = k_cache.isnan()  # (make_case poisons the blocks no table holds)
    k_cache.view(-1, 2, d)[slots] = float("nan")
    out = paged_attention(q, k_cache, v_cache, bt, ctx, qsl, scale=0.125, num_splits=num_splits,
                          new_kv=(new_k, new_v, slots), rope=(cos, sin))
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    assert rel_err(k_cache.view(-1, 2, d)[slots].cpu(), rotated64(new_k, cos, sin).cpu()) < TOL[dtype] / 4
    assert torch.equal(k_cache.isnan(), unused)


def test_rope_is_validated(device):
    case = make_case([(1, 20), (1, 9)], 4, 2, 64, 8, torch.float32, device, share=False)
    q = case[0]
    key = torch.zeros(2, 2, 64, device=device)
    slots = torch.zeros(2, dtype=torch.int64, device=device)
    cos, sin = cos_sin(torch.arange(2, device=device), 64, torch.float32)
    with pytest.raises(ValueError, match="needs new_kv"):
        paged_attention(*case, scale=0.1, rope=(cos, sin))
    with pytest.raises(TypeError, match="rope"):
        paged_attention(*case, scale=0.1, new_kv=(key, key, slots), rope=[cos, sin])
    with pytest.raises(ValueError, match="cos"):
        paged_attention(*case, scale=0.1, new_kv=(key, key, slots), rope=(cos[:, :32], sin))
    with pytest.raises(ValueError, match="even head_dim"):
        rotary.check_rope((torch.zeros(2, 5), torch.zeros(2, 5)), 2, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match="query"):
        rope_write_kv(q[:, :3], key, key, cos, sin, case[1], case[2], slots)
