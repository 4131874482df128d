"""The fused top-p sampling kernel against the torch path (HF's sort-based top-p, log_softmax, race)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sharedecode.sampling as sampling
from sharedecode import Engine
from sharedecode.kernels.fused_sampling import top_p_sample
from sharedecode.sampling import apply_top_p, race
from sharedecode.strategies import ParallelSampling


def reference(scores, noise, top_p):
    return race(apply_top_p(scores, top_p), noise)


def make_scores(n, v, device, spread=2.0, banned=(3,)):
    scores = torch.randn(n, v, device=device) * spread
    scores[:, list(banned)] = float("-inf")  # an EOS ban / top-k cut before the warper
    return scores


@pytest.mark.parametrize("n,v,block", [(4, 300, 64), (3, 1000, 1024), (2, 2048, 256), (1, 5, 64)])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("resident", [True, False])
def test_matches_torch_path(device, n, v, block, top_p, resident):
    scores = make_scores(n, v, device)
    noise = torch.empty_like(scores).exponential_()
    tokens, logprobs = top_p_sample(scores, noise, top_p, block=block, resident=resident)
    ref_tokens, ref_logprobs = reference(scores, noise, top_p)
    assert torch.equal(tokens.cpu(), ref_tokens.cpu())
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
@pytest.mark.parametrize("resident", [True, False])
def test_cut_is_hf_cut(device, top_p, resident):
    """Tiny noise on the largest removed token and on the smallest kept one: the race picks a
    token whenever it is kept, so the pick shows which side of the cut it is on."""
    n, v = 6, 700
    scores = make_scores(n, v, device, spread=1.5)
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    removed = cumulative <= (1 - top_p)
    cut = removed.sum(-1)  # ascending position of the smallest kept token
    rows = torch.arange(n, device=device)
    # rows whose cut lies within rounding of 1 - top_p could go either way: checked elsewhere
    clear = (cumulative[rows, cut] - (1 - top_p)).abs() > 1e-5
    assert clear.sum() >= n // 2
    for position in (cut - 1, cut):  # largest removed, smallest kept
        noise = torch.empty_like(scores).exponential_()
        token = order[rows, position]
        noise[rows, token] = 1e-30
        tokens, _ = top_p_sample(scores, noise, top_p, block=128, resident=resident)
        assert torch.equal(tokens[clear].cpu(), reference(scores, noise, top_p)[0][clear].cpu())
        assert torch.equal((tokens == token)[clear], (position == cut)[clear])


def test_rejects_bad_input(device):
    scores = torch.zeros(2, 8, device=device)
    noise = torch.ones(2, 8, device=device)
    with pytest.raises(ValueError, match="top_p"):
        top_p_sample(scores, noise, 0.0)
    with pytest.raises(ValueError, match="top_p"):
        top_p_sample(scores, noise, 1.5)
    with pytest.raises(ValueError, match="noise"):
        top_p_sample(scores, noise[:, :4], 0.9)
    with pytest.raises(ValueError, match="float32"):
        top_p_sample(scores.double(), noise, 0.9)
    with pytest.raises(TypeError, match="scores"):
        top_p_sample([0.0], noise, 0.9)


def test_sampling_strategy_same_tokens_fused_or_not(device, monkeypatch):
    """ParallelSampling with a seed draws the same tokens through the kernel as through the
    torch ops (the engine on this device; through the interpreter on the CPU)."""
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(device)
    engine = Engine(model, backend="torch", kv_cache_bytes=8 * 2**20)
    prompt = torch.randint(3, 512, (20,)).tolist()

    def run(fused):  # (on the CPU the kernel runs through the interpreter)
        monkeypatch.setattr(sampling, "_runs_fused", lambda scores, params: fused and params.min_p == 0.0)
        result = ParallelSampling(engine, n=4, temperature=0.8, top_p=0.9, seed=7, max_new_tokens=6,
                                  min_new_tokens=6).run(prompt)
        return [(s.token_ids, s.score) for s in result.sequences]

    calls = []
    kernel = sampling.top_p_sample
    monkeypatch.setattr(sampling, "top_p_sample", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    fused = run(True)
    assert len(calls) == 6  # one launch per step
    plain = run(False)
    assert len(calls) == 6
    assert [t for t, _ in fused] == [t for t, _ in plain]
    assert [s for _, s in fused] == pytest.approx([s for _, s in plain], rel=1e-5, abs=1e-5)
    assert engine.kv_stats().blocks_in_use == 0
