"""Greedy, BeamSearch (plain and diverse) and SharedPromptBatch against Hugging Face `generate`.

Tiny random Llama / Qwen2 models (GQA, two EOS ids) built from configs, fp32 on CPU. HF treats
`pad_token_id` in a prompt as padding and pads its outputs (with it, or with eos_token_id[0] in beam
search), so prompts never contain PAD and each HF row is compared as `row[:len(ours)] == ours` with
the rest all padding.
"""

from __future__ import annotations

import copy
import random
import zlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sharedecode.engine import Engine
from sharedecode.strategies import BeamSearch, Greedy, ParallelSampling, SharedPromptBatch
from sharedecode.strategies import beam_search
from sharedecode.strategies.beam_search import BeamRequest
from sharedecode.strategies.diverse_beam_search import DiverseBeamRequest

VOCAB = 96
PAD = 0
EOS = [2, 3]
BLOCK = 4  # small blocks: beams cross block boundaries and copy-on-write often


def _config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=EOS, bos_token_id=1, pad_token_id=PAD, tie_word_embeddings=False)
    return LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)


def _build(kind: str, eos_bias: bool, seed: int):
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM
    model = cls(_config(kind)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: no near-ties between candidates
        if eos_bias:  # EOS likely at some steps and unlikely at others
            model.lm_head.weight[EOS[0]].mul_(3.0)
            model.lm_head.weight[EOS[1]].mul_(2.5)
    return model


MODELS = {}


def get(kind: str, eos_bias: bool = False):
    """(model, engine) built once per module."""
    key = (kind, eos_bias)
    if key not in MODELS:
        model = _build(kind, eos_bias, seed=1234 if kind == "llama" else 4321)
        engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2 * 2**20, backend="torch")
        MODELS[key] = (model, engine)
    return MODELS[key]


def prompt_of(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, VOCAB) for _ in range(length)]


def hf_generate(model, prompt: list[int], **kwargs):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=PAD,
                              eos_token_id=EOS, return_dict_in_generate=True, output_scores=True, **kwargs)


def assert_matches_hf(result, out, prompt, *, scores: bool):
    length = len(prompt)
    assert len(result.sequences) == out.sequences.shape[0]
    for i, seq in enumerate(result.sequences):
        row = out.sequences[i, length:].tolist()
        assert row[:len(seq.token_ids)] == seq.token_ids, (i, row, seq.token_ids)
        # HF pads finished rows with pad_token_id (beam search: with eos_token_id[0]).
        assert all(t in (PAD, EOS[0]) for t in row[len(seq.token_ids):]), (i, row, seq.token_ids)
        if seq.token_ids[-1] in EOS:
            assert seq.finish_reason == "eos"
        if scores:
            assert abs(seq.score - float(out.sequences_scores[i])) < 1e-4, (i, seq.score, out.sequences_scores)


def run_checked(strategy, prompt):
    result = strategy.run(prompt)
    assert strategy.engine.kv_stats().blocks_in_use == 0
    strategy.engine.allocator.check()
    return result


# ------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("eos_bias", [False, True])
@pytest.mark.parametrize("min_new", [0, 5])
def test_greedy_matches_hf(kind, eos_bias, min_new):
    model, engine = get(kind, eos_bias)
    prompt = prompt_of(9, seed=min_new + 7 * eos_bias)
    ours = run_checked(Greedy(engine, max_new_tokens=14, min_new_tokens=min_new), prompt)
    out = hf_generate(model, prompt, num_beams=1, max_new_tokens=14, min_new_tokens=min_new)
    assert_matches_hf(ours, out, prompt, scores=False)
    assert len(ours.sequences[0].token_ids) >= min_new


def test_num_beams_1_is_greedy():
    model, engine = get("llama", True)
    prompt = prompt_of(6, seed=3)
    ours = run_checked(BeamSearch(engine, num_beams=1, max_new_tokens=12), prompt)
    out = hf_generate(model, prompt, num_beams=1, max_new_tokens=12)
    assert_matches_hf(ours, out, prompt, scores=False)


# ------------------------------------------------------------------------------------- beam search
BEAM_CASES = [
    # (kind, eos_bias, num_beams, length_penalty, early_stopping, num_return, min_new, max_new, prompt_len)
    (kind, eos_bias, nb, lp, es, min(nr, nb), min_new, max_new, plen)
    for i, (kind, eos_bias, nb, lp, es, nr, min_new, max_new, plen) in enumerate([
        ("llama", False, 2, 1.0, False, 1, 0, 10, 7),
        ("llama", True, 2, 0.0, True, 2, 0, 12, 5),
        ("llama", True, 4, 1.0, False, 2, 0, 14, 9),
        ("llama", True, 4, 2.0, "never", 4, 3, 14, 4),
        ("llama", True, 4, 0.0, "never", 1, 0, 12, 12),
        ("llama", True, 8, 1.0, True, 3, 0, 12, 6),
        ("llama", True, 8, 2.0, False, 8, 2, 10, 8),
        ("llama", False, 8, 0.0, "never", 2, 0, 9, 3),
        ("qwen2", True, 2, 2.0, "never", 1, 0, 12, 8),
        ("qwen2", True, 4, 0.0, False, 3, 4, 12, 5),
        ("qwen2", True, 4, 1.0, True, 1, 0, 16, 10),
        ("qwen2", False, 4, 2.0, False, 2, 0, 8, 6),
        ("qwen2", True, 8, 1.0, "never", 2, 0, 12, 7),
        ("qwen2", True, 8, 0.0, True, 8, 0, 10, 4),
        ("qwen2", True, 2, 1.0, False, 2, 6, 12, 9),
    ])
]


@pytest.mark.parametrize("case", BEAM_CASES, ids=lambda c: "-".join(map(str, c)))
def test_beam_search_matches_hf(case):
    kind, eos_bias, nb, lp, es, nr, min_new, max_new, plen = case
    model, engine = get(kind, eos_bias)
    prompt = prompt_of(plen, seed=zlib.crc32(repr(case).encode()) % 1000)
    params = dict(num_beams=nb, length_penalty=lp, early_stopping=es, num_return_sequences=nr,
                  min_new_tokens=min_new, max_new_tokens=max_new)
    ours = run_checked(BeamSearch(engine, **params), prompt)
    out = hf_generate(model, prompt, **params)
    assert_matches_hf(ours, out, prompt, scores=True)
    for seq in ours.sequences:
        assert min_new <= len(seq.token_ids) <= max_new
    assert ours.stats.decode_steps <= max_new - 1


def test_beam_cases_exercise_eos():
    """The EOS-biased models really end beams early, and some other beams run to the limit."""
    model, engine = get("llama", True)
    reasons = set()
    for seed in range(4):
        result = run_checked(BeamSearch(engine, num_beams=4, num_return_sequences=4, max_new_tokens=12),
                             prompt_of(6, seed=seed))
        reasons |= {s.finish_reason for s in result.sequences}
    assert {"eos", "length"} <= reasons


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_beam_batch_of_prompts_equals_each_alone(kind):
    model, engine = get(kind, True)
    prompts = [prompt_of(5, 11), prompt_of(11, 12), prompt_of(17, 13)]
    params = dict(num_beams=4, num_return_sequences=2, max_new_tokens=10, length_penalty=1.0)
    results = BeamSearch(engine, **params).run(prompts)
    assert engine.kv_stats().blocks_in_use == 0
    assert len(results) == 3
    for prompt, ours in zip(prompts, results):
        assert ours.prompt_token_ids == prompt
        assert_matches_hf(ours, hf_generate(model, prompt, **params), prompt, scores=True)


def test_greedy_batch_of_prompts_equals_each_alone():
    model, engine = get("qwen2", True)
    prompts = [prompt_of(3, 21), prompt_of(14, 22), prompt_of(8, 23)]
    results = Greedy(engine, max_new_tokens=10).run(prompts)
    for prompt, ours in zip(prompts, results):
        assert_matches_hf(ours, hf_generate(model, prompt, num_beams=1, max_new_tokens=10), prompt,
                          scores=False)


def test_repetition_penalty_beam_matches_hf():
    model, engine = get("llama", False)
    prompt = prompt_of(8, 31)
    params = dict(num_beams=4, max_new_tokens=10, repetition_penalty=1.3, num_return_sequences=2)
    ours = run_checked(BeamSearch(engine, **params), prompt)
    assert_matches_hf(ours, hf_generate(model, prompt, **params), prompt, scores=True)


# ------------------------------------------------------------------------------ memory and leaks
def test_beam_search_peak_blocks_below_contiguous():
    model, engine = get("llama", False)
    prompt = prompt_of(40, 41)
    nb, new = 8, 12
    result = run_checked(BeamSearch(engine, num_beams=nb, max_new_tokens=new, early_stopping="never"),
                         prompt)
    stats = result.stats
    contiguous_blocks = nb * -(-(len(prompt) + new) // BLOCK)
    assert 0 < stats.peak_blocks_in_use < contiguous_blocks
    assert 0 < stats.peak_kv_bytes < stats.peak_contiguous_kv_bytes
    # The prompt's 10 blocks are shared by all beams: far below 8 private copies.
    assert stats.peak_blocks_in_use <= -(-len(prompt) // BLOCK) + nb * (-(-new // BLOCK) + 1)
    assert stats.kv_memory_saved > 0.5
    assert stats.prefill_tokens_computed == len(prompt)


def test_no_leak_when_the_consumer_raises_inside_stream():
    model, engine = get("qwen2", False)
    strategy = BeamSearch(engine, num_beams=4, max_new_tokens=10)
    with pytest.raises(RuntimeError, match="consumer"):
        for step, _ in enumerate(strategy.stream(prompt_of(9, 51))):
            if step == 2:
                assert engine.kv_stats().blocks_in_use > 0
                raise RuntimeError("consumer")
    assert engine.kv_stats().blocks_in_use == 0


@pytest.mark.parametrize("make", [
    lambda e: BeamSearch(e, num_beams=4, max_new_tokens=10),
    lambda e: BeamSearch(e, num_beams=4, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=10),
    lambda e: ParallelSampling(e, n=3, seed=0, max_new_tokens=10),
])
def test_no_leak_when_stream_is_closed_early(make):
    model, engine = get("llama", False)
    gen = make(engine).stream(prompt_of(13, 52))
    next(gen)
    next(gen)
    assert engine.kv_stats().blocks_in_use > 0
    gen.close()
    assert engine.kv_stats().blocks_in_use == 0
    engine.allocator.check()


class RaisingTokenizer:
    """Decodes token ids as text; raises on the `fail_at`-th decode (a stop check that fails)."""

    eos_token_id = EOS[0]

    def __init__(self, fail_at: int):
        self.calls = 0
        self.fail_at = fail_at

    def decode(self, ids, skip_special_tokens=False):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise ValueError("stop check failed")
        return " ".join(map(str, ids))


@pytest.mark.parametrize("strategy_cls, params", [
    (BeamSearch, dict(num_beams=4)),
    (BeamSearch, dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5)),
    (ParallelSampling, dict(n=4, seed=1)),
])
@pytest.mark.parametrize("fail_at", [1, 30])
def test_no_leak_when_a_stop_check_raises(strategy_cls, params, fail_at):
    model, _ = get("llama", False)
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**20, backend="torch")
    strategy = strategy_cls(engine, RaisingTokenizer(fail_at), stop=["zz"], max_new_tokens=10, **params)
    with pytest.raises(ValueError, match="stop check failed"):
        strategy.run(prompt_of(10, 53))
    assert engine.kv_stats().blocks_in_use == 0
    engine.allocator.check()


def test_no_leak_when_a_stop_check_raises_in_a_batch():
    """The first request's start raises during admission: the batch's later prefilled prompts too
    must be freed (they are in no request's pending branches yet)."""
    model, _ = get("llama", False)
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**20, backend="torch")
    strategy = BeamSearch(engine, RaisingTokenizer(1), stop=["zz"], max_new_tokens=10, num_beams=2)
    with pytest.raises(ValueError, match="stop check failed"):
        strategy.run([prompt_of(10, 54), prompt_of(10, 55)])
    assert engine.kv_stats().blocks_in_use == 0


# ------------------------------------------------------------------------------ shared prompt batch
@pytest.fixture(scope="module")
def embedded():
    from sharedecode.embedded import load_embedded_model

    model, tokenizer = load_embedded_model()
    return model, tokenizer


SYSTEM = ("You are a courteous herald of the king's court. Speak plainly, in the manner of the plays, "
          "and answer each petitioner in a line or two. ")
USERS = ["What news from France?", "Who comes here, my lord?", "Where is the duke tonight?"]


def _engine(model, tokenizer, block_size=8):
    return Engine(model, tokenizer, block_size=block_size, kv_cache_bytes=8 * 2**20, backend="torch")


def _common_prefix(seqs):
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


@pytest.mark.parametrize("strategy, params", [
    ("greedy", dict(max_new_tokens=8)),
    ("beam", dict(num_beams=3, max_new_tokens=6, num_return_sequences=2)),
])
def test_shared_prompt_batch_reuses_the_prefix_and_matches_each_alone(embedded, strategy, params):
    model, tokenizer = embedded
    engine = _engine(model, tokenizer)
    batch = SharedPromptBatch(engine, system_prompt=SYSTEM, strategy=strategy, **params)
    results = batch.run(USERS)
    assert engine.kv_stats().blocks_in_use == 0
    prompts = [r.prompt_token_ids for r in results]
    assert prompts == [tokenizer(SYSTEM + u)["input_ids"] for u in USERS]  # no template: concatenation
    shared = _common_prefix(prompts) // 8 * 8
    assert shared >= 16
    stats = results[0].stats
    assert stats.prefill_tokens_reused == (len(USERS) - 1) * shared
    assert stats.prefill_tokens_computed == sum(len(p) for p in prompts) - stats.prefill_tokens_reused
    cls = Greedy if strategy == "greedy" else BeamSearch
    for prompt, result in zip(prompts, results):
        alone = cls(_engine(model, tokenizer), **params).run(prompt)
        assert [s.token_ids for s in result.sequences] == [s.token_ids for s in alone.sequences]
        assert [s.text for s in result.sequences] == [s.text for s in alone.sequences]
        assert alone.stats.prefill_tokens_reused == 0


def test_shared_prompt_batch_uses_the_chat_template(embedded):
    model, tokenizer = embedded
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")
    engine = _engine(model, tokenizer)
    batch = SharedPromptBatch(engine, system_prompt=SYSTEM, strategy="greedy", max_new_tokens=5)
    results = batch.run(USERS)
    for user, result in zip(USERS, results):
        text = f"<system> {SYSTEM}\n<user> {user}\n<assistant> "
        assert result.prompt_token_ids == tokenizer(text)["input_ids"]
    assert results[0].stats.prefill_tokens_reused > 0
    assert engine.kv_stats().blocks_in_use == 0


# ------------------------------------------------------------------------------------ stop strings
@pytest.mark.parametrize("strategy_cls, params", [
    (Greedy, {}),
    (ParallelSampling, dict(n=2, temperature=0.0)),
])
def test_stop_string_ends_the_text_before_it(embedded, strategy_cls, params):
    model, tokenizer = embedded
    engine = _engine(model, tokenizer)
    prompt = "KING HENRY:\nWhat say you, my lords? Shall we"
    full = strategy_cls(engine, max_new_tokens=24, **params).run(prompt).sequences[0]
    words = full.text.split()
    assert len(words) >= 4, full.text
    stop = words[2]  # a stop string that appears a few tokens in
    index = full.text.find(stop)
    stopped = strategy_cls(engine, max_new_tokens=24, stop=stop, **params).run(prompt)
    for seq in stopped.sequences:
        assert seq.finish_reason == "stop"
        assert seq.text == full.text[:index]
        assert stop not in seq.text
        assert seq.token_ids == full.token_ids[:len(seq.token_ids)]
        assert len(seq.token_ids) < len(full.token_ids)
        # The token that completed the stop string is the last one kept.
        assert stop not in tokenizer.decode(seq.token_ids[:-1])
    assert engine.kv_stats().blocks_in_use == 0


@pytest.mark.parametrize("params", [
    dict(num_beams=3),
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5),
])
def test_stop_string_in_beam_search(embedded, params):
    """Beams that complete the stop string finish (like EOS); returned texts never contain it."""
    model, tokenizer = embedded
    engine = _engine(model, tokenizer)
    prompt = "KING HENRY:\nWhat say you, my lords? Shall we"
    nb = params["num_beams"]
    full = BeamSearch(engine, max_new_tokens=16, num_return_sequences=nb, **params).run(prompt)
    stop = full.sequences[0].text.split()[1]
    # length_penalty 0: the short stopped beam (raw logprob) beats the long ones.
    stopped = BeamSearch(engine, max_new_tokens=16, num_return_sequences=nb, stop=stop, length_penalty=0.0,
                         **params).run(prompt)
    reasons = [s.finish_reason for s in stopped.sequences]
    assert "stop" in reasons
    for seq in stopped.sequences:
        decoded = tokenizer.decode(seq.token_ids)
        assert stop not in seq.text
        if seq.finish_reason == "stop":
            assert seq.text == decoded[:decoded.find(stop)]
            assert stop not in tokenizer.decode(seq.token_ids[:-1])
        else:
            assert stop not in decoded
    assert engine.kv_stats().blocks_in_use == 0


# ------------------------------------------------------------------------------ diverse beam search
def reference_group_beam_search(model, prompt, *, num_beams, num_beam_groups, diversity_penalty,
                                max_new_tokens, length_penalty=1.0, early_stopping=False,
                                num_return_sequences=1, min_new_tokens=0):
    """transformers v4 `_group_beam_search` + `BeamSearchScorer(num_beam_groups)` +
    `HammingDiversityLogitsProcessor`, batch 1, recomputing the full forward every step (no cache),
    on the (num_beams, len) tensor of input ids as v4 did. Done groups are padded as in v4; their pad
    tokens are not counted by the diversity penalty (sharedecode's one documented departure)."""
    gs = num_beams // num_beam_groups
    L = len(prompt)
    input_ids = torch.tensor([prompt] * num_beams)
    beam_scores = torch.full((num_beams,), -1e9)
    beam_scores[::gs] = 0
    hyps = [[] for _ in range(num_beam_groups)]  # (score, tokens)
    worst = [1e9] * num_beam_groups
    done = [False] * num_beam_groups
    n_keep = max(2, 1 + len(EOS)) * gs

    def add(g, tokens, sum_logprobs):
        score = sum_logprobs / (len(tokens) ** length_penalty)
        if len(hyps[g]) < gs or score > worst[g]:
            hyps[g].append((score, tokens))
            if len(hyps[g]) > gs:
                ranked = sorted((s, i) for i, (s, _) in enumerate(hyps[g]))
                del hyps[g][ranked[0][1]]
                worst[g] = ranked[1][0]
            else:
                worst[g] = min(score, worst[g])

    def is_done(g, best, cur):
        if len(hyps[g]) < gs:
            return False
        if early_stopping is True:
            return True
        length = max_new_tokens if (early_stopping == "never" and length_penalty > 0) else cur
        return worst[g] >= best / length ** length_penalty

    for step in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids).logits[:, -1, :].float()
        current = torch.full((num_beams,), PAD)
        counted = torch.zeros(num_beams, dtype=torch.bool)
        reorder = torch.arange(num_beams)
        for g in range(num_beam_groups):
            idx = list(range(g * gs, (g + 1) * gs))
            if done[g]:
                beam_scores[idx] = 0
                current[idx] = PAD
                reorder[idx] = g * gs
                continue
            scores = torch.log_softmax(logits[idx], dim=-1)
            if g > 0 and diversity_penalty > 0:
                prev = current[:g * gs][counted[:g * gs]]
                scores -= diversity_penalty * torch.bincount(prev, minlength=VOCAB)
            if step < min_new_tokens:
                scores[:, EOS] = float("-inf")
            scores = (scores + beam_scores[idx][:, None]).view(1, -1)
            top, tok = torch.topk(scores, n_keep, dim=1, largest=True, sorted=True)
            nxt = []
            for rank, (s, t) in enumerate(zip(top[0].tolist(), tok[0].tolist())):
                b, t = divmod(t, VOCAB)
                if t in EOS:
                    if rank < gs:
                        add(g, input_ids[g * gs + b, L:].tolist() + [t], s)
                else:
                    nxt.append((s, t, b))
                if len(nxt) == gs:
                    break
            done[g] = is_done(g, top[0].max().item(), step + 1)
            for j, (s, t, b) in enumerate(nxt):
                beam_scores[g * gs + j] = s
                current[g * gs + j] = t
                reorder[g * gs + j] = g * gs + b
                counted[g * gs + j] = True
        input_ids = torch.cat([input_ids[reorder], current[:, None]], dim=1)
        if all(done):
            break
    for g in range(num_beam_groups):
        if not done[g]:
            for j in range(gs):
                add(g, input_ids[g * gs + j, L:].tolist(), beam_scores[g * gs + j].item())
    ranked = sorted([h for group in hyps for h in group], key=lambda h: h[0])
    return [ranked.pop() for _ in range(num_return_sequences)]


DIVERSE_CASES = [
    # kind, eos_bias, num_beams, groups, penalty, length_penalty, early_stopping, num_return, max_new
    ("llama", False, 4, 2, 1.0, 1.0, False, 4, 8),
    ("llama", True, 6, 3, 0.7, 1.0, False, 3, 10),
    ("llama", True, 4, 4, 2.0, 0.0, True, 2, 10),
    ("qwen2", True, 8, 2, 1.5, 2.0, "never", 4, 10),
    ("qwen2", False, 6, 2, 0.0, 1.0, False, 2, 8),
    ("qwen2", True, 8, 4, 0.4, 1.0, False, 8, 12),
    ("llama", True, 4, 2, 1.0, -0.5, "never", 3, 12),
    ("llama", True, 6, 2, 0.5, 1.0, True, 6, 14),
    ("qwen2", True, 4, 2, 0.5, 2.0, True, 4, 14),
]


@pytest.mark.parametrize("case", DIVERSE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_diverse_beam_search_matches_v4_reference(case):
    kind, eos_bias, nb, groups, penalty, lp, es, nr, new = case
    model, engine = get(kind, eos_bias)
    prompt = prompt_of(7, seed=zlib.crc32(repr(case).encode()) % 1000)
    params = dict(num_beams=nb, num_beam_groups=groups, diversity_penalty=penalty, length_penalty=lp,
                  early_stopping=es, num_return_sequences=nr, max_new_tokens=new)
    ours = run_checked(BeamSearch(engine, **params), prompt)
    ref = reference_group_beam_search(model, prompt, **params)
    assert [s.token_ids for s in ours.sequences] == [t for _, t in ref]
    for seq, (score, _) in zip(ours.sequences, ref):
        assert abs(seq.score - score) < 1e-4


def test_diverse_beam_search_is_diverse_and_deterministic():
    model, engine = get("llama", False)
    prompt = prompt_of(8, seed=61)
    common = dict(num_beams=6, num_return_sequences=6, max_new_tokens=8)
    plain = run_checked(BeamSearch(engine, **common), prompt)
    diverse = BeamSearch(engine, num_beam_groups=3, diversity_penalty=3.0, **common)
    first = run_checked(diverse, prompt)
    again = run_checked(diverse, prompt)
    assert [s.token_ids for s in first.sequences] == [s.token_ids for s in again.sequences]
    assert [s.score for s in first.sequences] == [s.score for s in again.sequences]
    # Sorted best first, all distinct.
    scores = [s.score for s in first.sequences]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(s.token_ids) for s in first.sequences}) == 6
    # Plain beams share long prefixes; diverse groups start differently.
    firsts_plain = {s.token_ids[0] for s in plain.sequences}
    firsts_diverse = {s.token_ids[0] for s in first.sequences}
    assert len(firsts_diverse) >= 3 > len(firsts_plain) or len(firsts_diverse) > len(firsts_plain)
    # The best diverse sequence cannot beat plain beam search's best (same beam budget, penalised).
    assert first.sequences[0].score <= plain.sequences[0].score + 1e-6


def test_diverse_groups_pick_different_tokens_at_each_step():
    """With a huge penalty and one beam per group, no two groups pick the same token in a step."""
    model, engine = get("qwen2", False)
    prompt = prompt_of(6, seed=62)
    strategy = BeamSearch(engine, num_beams=4, num_beam_groups=4, diversity_penalty=1e4, max_new_tokens=6,
                          early_stopping="never", num_return_sequences=4, eos_token_id=[])
    snapshots = []
    for step in strategy.stream(prompt):
        snapshots.append(step[0])
    for snap in snapshots[:-1]:
        lasts = [tokens[-1] for tokens, _ in snap["beams"]]
        assert len(set(lasts)) == len(lasts) == 4
    assert engine.kv_stats().blocks_in_use == 0


def test_diverse_min_new_tokens_matches_v4_reference():
    model, engine = get("llama", True)
    prompt = prompt_of(5, seed=64)
    params = dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.8, max_new_tokens=10,
                  min_new_tokens=4, num_return_sequences=6)
    ours = run_checked(BeamSearch(engine, **params), prompt)
    ref = reference_group_beam_search(model, prompt, **params)
    assert [s.token_ids for s in ours.sequences] == [t for _, t in ref]
    assert all(len(s.token_ids) >= 4 for s in ours.sequences)


def test_diverse_batch_of_prompts_equals_each_alone():
    model, engine = get("qwen2", True)
    prompts = [prompt_of(4, 65), prompt_of(15, 66)]
    strategy = BeamSearch(engine, num_beams=4, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=10,
                          num_return_sequences=4)
    batch = strategy.run(prompts)
    assert engine.kv_stats().blocks_in_use == 0
    for prompt, result in zip(prompts, batch):
        alone = strategy.run(prompt)
        assert [s.token_ids for s in result.sequences] == [s.token_ids for s in alone.sequences]


@pytest.mark.parametrize("blocks, params", [
    (26, dict(num_beams=4, num_return_sequences=2)),
    (26, dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=2)),
    (14, dict(num_beams=1)),
])
def test_beam_search_under_memory_pressure_equals_each_alone(blocks, params):
    """A cache too small for the whole batch preempts and recomputes requests: same outputs."""
    model, engine = get("llama", True)
    small = Engine(model, block_size=BLOCK, kv_cache_bytes=blocks * engine.layout.bytes_per_block,
                   backend="torch")
    prompts = [prompt_of(12, 71), prompt_of(9, 72), prompt_of(14, 73)]
    strategy = BeamSearch(small, max_new_tokens=14, min_new_tokens=14, **params)
    batch = strategy.run(prompts)
    assert small.kv_stats().blocks_in_use == 0
    assert batch[0].stats.preemptions > 0
    for prompt, result in zip(prompts, batch):
        alone = BeamSearch(engine, max_new_tokens=14, min_new_tokens=14, **params).run(prompt)
        assert [s.token_ids for s in result.sequences] == [s.token_ids for s in alone.sequences]
        for a, b in zip(result.sequences, alone.sequences):
            assert abs(a.score - b.score) < 1e-4


class OneGroupDiverse(BeamSearch):
    def make_request(self, prompt_ids):
        return DiverseBeamRequest(prompt_ids, self)


@pytest.mark.parametrize("params", [
    dict(num_beams=4, max_new_tokens=10, num_return_sequences=2),
    dict(num_beams=3, max_new_tokens=12, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=4, max_new_tokens=12, length_penalty=0.0, early_stopping=True, num_return_sequences=4),
    dict(num_beams=4, max_new_tokens=14, length_penalty=1.0, early_stopping=True, num_return_sequences=4),
])
def test_one_group_without_penalty_equals_plain_beam_search(params):
    model, engine = get("llama", True)
    prompt = prompt_of(9, seed=63)
    plain = run_checked(BeamSearch(engine, **params), prompt)
    group = run_checked(OneGroupDiverse(engine, num_beam_groups=1, diversity_penalty=0.0, **params), prompt)
    assert [s.token_ids for s in group.sequences] == [s.token_ids for s in plain.sequences]
    for a, b in zip(group.sequences, plain.sequences):
        assert abs(a.score - b.score) < 1e-4
        assert a.finish_reason == b.finish_reason


def test_one_new_token():
    model, engine = get("qwen2", True)
    prompt = prompt_of(6, seed=81)
    params = dict(num_beams=4, max_new_tokens=1, num_return_sequences=4)
    plain = run_checked(BeamSearch(engine, **params), prompt)
    assert_matches_hf(plain, hf_generate(model, prompt, **params), prompt, scores=True)
    diverse = run_checked(BeamSearch(engine, num_beam_groups=2, diversity_penalty=1.0, **params), prompt)
    ref = reference_group_beam_search(model, prompt, num_beam_groups=2, diversity_penalty=1.0, **params)
    assert [s.token_ids for s in diverse.sequences] == [t for _, t in ref]
    assert all(len(s.token_ids) == 1 for s in diverse.sequences)


def test_diverse_beam_search_validation():
    model, engine = get("llama", False)
    with pytest.raises(ValueError):
        BeamSearch(engine, num_beams=4, num_beam_groups=3)
    with pytest.raises(ValueError):
        BeamSearch(engine, num_beams=4, num_beam_groups=8)
    with pytest.raises(ValueError):
        BeamSearch(engine, num_beams=4, num_beam_groups=2, diversity_penalty=-1.0)


def test_a_strategy_tokenizer_does_not_change_the_shared_engine():
    from sharedecode.embedded import load_embedded_model

    model, tokenizer = load_embedded_model()
    engine = Engine(model, None, block_size=16, kv_cache_bytes=2**22)
    greedy = Greedy(engine, tokenizer, max_new_tokens=3)
    assert engine.tokenizer is None and greedy.tokenizer is tokenizer
    result = greedy.run("ROMEO:\n")
    assert greedy.last_results is result and result.sequences[0].text is not None
    with pytest.raises(ValueError, match="tokenizer"):
        Greedy(engine, max_new_tokens=3).run("ROMEO:\n")  # no tokenizer of its own


# ------------------------------------------------------------------------ grouped beam steps
def test_grouped_beam_steps_with_mixed_eos_bans_match_each_alone_and_hf(monkeypatch):
    """A cache too small for the whole batch admits the prompts at different steps, so one grouped
    device step holds requests that still ban EOS (min_new_tokens) beside requests that do not;
    some beams end by EOS, one by length. Each request equals itself alone and HF (scores to 1e-4:
    a preempted request's recomputed prefill rounds differently from its decode steps)."""
    model, engine = get("llama", True)
    groups: list[tuple[int, ...]] = []
    grouped = BeamRequest.step_device_group

    def spy(requests, logits):
        groups.append(tuple(r.num_generated for r in requests))
        return grouped(requests, logits)

    monkeypatch.setattr(BeamRequest, "step_device_group", staticmethod(spy))
    small = Engine(model, block_size=BLOCK, kv_cache_bytes=22 * engine.layout.bytes_per_block, backend="torch")
    prompts = [prompt_of(5, 91), prompt_of(13, 92), prompt_of(9, 93), prompt_of(3, 94)]
    params = dict(num_beams=4, max_new_tokens=12, min_new_tokens=4, num_return_sequences=2)
    batch = BeamSearch(small, **params).run(prompts)
    assert small.kv_stats().blocks_in_use == 0
    small.allocator.check()
    assert any(len(g) > 1 and min(g) < 4 <= max(g) for g in groups), groups
    assert {s.finish_reason for r in batch for s in r.sequences} == {"eos", "length"}
    for prompt, result in zip(prompts, batch):
        alone = run_checked(BeamSearch(engine, **params), prompt)
        assert [(s.token_ids, s.finish_reason) for s in result.sequences] == \
            [(s.token_ids, s.finish_reason) for s in alone.sequences]
        assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(result.sequences, alone.sequences))
        assert_matches_hf(result, hf_generate(model, prompt, **params), prompt, scores=True)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_grouped_beam_batch_with_repetition_penalty_matches_hf(kind):
    model, engine = get(kind, True)
    prompts = [prompt_of(6, 101), prompt_of(14, 102), prompt_of(3, 103)]
    params = dict(num_beams=3, max_new_tokens=9, repetition_penalty=1.4, num_return_sequences=3,
                  length_penalty=0.5, early_stopping=True)
    results = BeamSearch(engine, **params).run(prompts)
    assert engine.kv_stats().blocks_in_use == 0
    for prompt, ours in zip(prompts, results):
        assert_matches_hf(ours, hf_generate(model, prompt, **params), prompt, scores=True)


def test_step_device_group_equals_each_request_alone():
    """The grouped device step gives every request exactly the tensor its own step gives."""
    model, engine = get("qwen2", True)
    k = 3
    strategy = BeamSearch(engine, num_beams=k, max_new_tokens=10, min_new_tokens=2, repetition_penalty=1.2)
    requests = [strategy.make_request(prompt_of(n, 110 + n)) for n in (4, 7, 5)]
    rng = random.Random(0)
    for request, generated in zip(requests, (0, 2, 5)):  # the first still bans EOS
        request.num_generated = generated
        request.running_generated = [[rng.randrange(4, VOCAB) for _ in range(generated)] for _ in range(k)]
        request.running_scores = [float(torch.tensor(-rng.random() * generated).float()) for _ in range(k)]
    torch.manual_seed(0)
    logits = torch.randn(k * len(requests), VOCAB) * 4
    together, sizes = BeamRequest.step_device_group(requests, logits)
    assert sizes == [2 * requests[0].beams_to_keep] * len(requests) and together.numel() == sum(sizes)
    for i, request in enumerate(requests):
        alone = together[sum(sizes[:i]):sum(sizes[:i + 1])]
        assert torch.equal(alone, request.step_device(logits[i * k:(i + 1) * k]))


@pytest.mark.parametrize("vocab,num_requests,k,keep", [(50, 3, 4, 8), (7, 2, 3, 9), (1000, 1, 8, 16)])
def test_per_row_top_candidates_equal_the_flat_top_k(vocab, num_requests, k, keep):
    """The CUDA path's two-stage top-K (each row's best, then the request's best of those) gives
    HF's flat top-K over k x V: same scores, same flat indices, when there are no exact ties;
    banned (-inf) tokens included, and a vocabulary smaller than `keep`."""
    gen = torch.Generator().manual_seed(vocab)
    for _ in range(20):
        log_probs = torch.log_softmax(torch.randn(num_requests * k, vocab, generator=gen) * 3, dim=-1)
        log_probs[:, 0] = float("-inf")
        running = -torch.rand(num_requests * k, generator=gen) * 10
        flat = beam_search.top_candidates(log_probs, running, num_requests, keep, per_row_first=False)
        two_stage = beam_search.top_candidates(log_probs, running, num_requests, keep, per_row_first=True)
        finite = flat[0] > float("-inf")  # (the order of -inf ties is any kernel's own)
        assert torch.equal(flat[0], two_stage[0])
        assert torch.equal(flat[1][finite], two_stage[1][finite])


def test_float32_helpers_equal_torch():
    rng = random.Random(0)
    for _ in range(300):
        values = [float(torch.tensor(-rng.random() * rng.choice([1.0, 40.0, 1e4, 3e9])).float())
                  for _ in range(12)]
        divisor = rng.randint(1, 300) ** rng.choice([1.0, 0.5, 2.0, -1.0, 0.0, 100.0, -100.0])
        expected = (torch.tensor([values]) / divisor)[0].tolist()
        f32_divisor = beam_search.to_f32([divisor])[0]
        got = beam_search.divide_f32(values, f32_divisor)
        assert [repr(x) for x in got] == [repr(x) for x in expected]
        flags = [rng.random() < 0.5 for _ in values]
        expected = (torch.tensor([values]) + torch.tensor([flags]).to(torch.float32) * beam_search.NEG)[0]
        got = beam_search.to_f32([v + beam_search.neg_if(f) for v, f in zip(values, flags)])
        assert [repr(x) for x in got] == [repr(x) for x in expected.tolist()]
    assert beam_search.to_f32([1e39, -1e39, 3.4028234e38, 0.1]) == \
        torch.tensor([1e39, -1e39, 3.4028234e38, 0.1]).tolist()


@pytest.mark.parametrize("pool", [
    [-1.0, -2.0, -3.0, -4.0, -5.0],                            # distinct: the sort answers
    [beam_search.NEG, -0.5, beam_search.NEG, -1.5],             # ties: torch answers
    [float("-inf"), -1.0, float("-inf"), -2.0, -3.0],
    [float("nan"), -1.0, -2.0, float("inf"), 0.0],
    [0.0, -0.0, -1.0, beam_search.NEG, beam_search.NEG - 64.0],  # ties through the pattern cache
])
def test_topk_indices_equals_torch_topk(pool):
    rng = random.Random(1)
    for _ in range(400):
        values = [rng.choice(pool) for _ in range(rng.randint(2, 48))]
        k = rng.randint(1, len(values))
        expected = torch.topk(torch.tensor([values], dtype=torch.float32), k)[1][0].tolist()
        assert beam_search.topk_indices(values, k) == expected


class UngroupedBeamSearch(BeamSearch):
    """Beam search whose requests step one by one (the scheduler's path without a group step)."""

    class Request(BeamRequest):
        step_device_group = None

    def make_request(self, prompt_ids):
        return self.Request(prompt_ids, self)


def test_grouped_beam_batch_is_bit_identical_to_stepping_each_request():
    """Requests finishing at different steps leave the group one by one; the grouped step gives
    exactly what stepping each request on its own rows gives (same forwards), and each request
    equals itself alone (where the forward's batching changes the last bits of the logits)."""
    model, _ = get("qwen2", True)

    def fresh():
        return Engine(model, block_size=BLOCK, kv_cache_bytes=2**21, backend="torch")

    prompts = [prompt_of(n, 120 + n) for n in (4, 11, 7, 16, 2)]
    params = dict(num_beams=4, max_new_tokens=14, num_return_sequences=3, length_penalty=2.0)

    def outputs(results):
        return [[(s.token_ids, s.score, s.logprob, s.finish_reason) for s in r.sequences] for r in results]

    grouped = BeamSearch(fresh(), **params).run(prompts)
    assert len({r.stats.decode_steps for r in grouped}) == 1
    assert len({len(s.token_ids) for r in grouped for s in r.sequences}) > 3
    assert outputs(grouped) == outputs(UngroupedBeamSearch(fresh(), **params).run(prompts))
    for prompt, result in zip(prompts, grouped):
        alone = BeamSearch(fresh(), **params).run(prompt)
        assert [s.token_ids for s in result.sequences] == [s.token_ids for s in alone.sequences]
        assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(result.sequences, alone.sequences))


def test_run_takes_no_snapshots_and_stream_does(monkeypatch):
    """`run` only needs the results: snapshotting every request every step costs time that grows
    with the square of the length. `stream` yields one snapshot per request per step."""
    _, engine = get("llama", True)
    calls = []
    original = BeamRequest.snapshot

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(BeamRequest, "snapshot", counting)
    strategy = BeamSearch(engine, num_beams=2, max_new_tokens=4)
    strategy.run([prompt_of(5, 130), prompt_of(7, 131)])
    assert calls == []
    steps = list(strategy.stream([prompt_of(5, 130), prompt_of(7, 131)]))
    assert steps and len(calls) == 2 * len(steps) and all(len(step) == 2 for step in steps)
    assert engine.kv_stats().blocks_in_use == 0
