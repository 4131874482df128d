"""GPU check: engine decode logits against the model's own forward, fp32 and bf16.

plain: the torch backend, Triton eager, Triton + CUDA graphs (with and without torch.compile), several
batch sizes; prints relative L2 errors per step.
shared: the shared-prefix cascade in the decode step (Triton eager, CUDA graphs, compiled CUDA graphs)
on the workloads where groups appear: 6 beams forked from one prompt (a padded bucket), 64 samples of
one prompt, 256 requests sharing a cached 1024-token system prompt, 16 prompts x 8 beams. Checks that
every step took the cascade (eager) or a group graph (graphs), and exits 1 on any mismatch.
look_ahead: greedy and seeded sampling (with EOS stops at different steps) with the scheduler's
look-ahead on and off, through CUDA graphs (compiled) and Triton eager: the same tokens, every
block freed, and steps really launched ahead.
beams: beam search through CUDA graphs with the CUDA path's kernels (kernels/beam_select.py), its
torch ops with the two-stage top-K (each row's best, then the request's) and the flat top-K over
k x V: the same tokens and scores; HF generate's
tokens on the same fp32 model are printed beside them. Then steps launched ahead (survivors and
block tables made on the device) against reading each step first, with and without graphs and
with the cascade forced on: the same tokens and scores, every block freed.

prefill_graphs: prefill chunks replayed from CUDA graphs against the eager prefill (logits, the
whole KV pool, a replay, greedy tokens).

    python bench/check_decode_gpu.py [--only plain|shared|look_ahead|beams|prefill_graphs]
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sharedecode.kernels.paged_attention as pa  # noqa: E402
import sharedecode.kernels.shared_prefix as sp  # noqa: E402
from sharedecode import Engine  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # max relative L2 error of a step's logits


def make_model(dtype):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048)
    return LlamaForCausalLM(config).to("cuda", dtype).eval()


def rel_l2(out, ref):
    return float((out - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------ plain decode
def check(model, backend, graphs, batch, dtype, splits=None, compile=True):
    engine = Engine(model, backend=backend, kv_cache_bytes=2**30, cuda_graphs=graphs, compile=compile)
    if graphs:
        engine.graphs.num_splits = splits
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (int(n),), generator=gen).tolist()
               for n in torch.randint(20, 300, (batch,), generator=gen)]
    tables = [engine.add(p) for p in prompts]
    outs = [engine.prefill(tables)]
    steps = [[5 + i] * batch for i in range(4)]
    for tokens in steps:
        outs.append(engine.decode(tables, tokens))
    errors = []
    with torch.inference_mode():
        for b, prompt in enumerate(prompts):
            full = prompt + [tokens[b] for tokens in steps]
            ref = model(torch.tensor([full], device="cuda")).logits[0, len(prompt) - 1:].float()
            for step, out in enumerate(outs):
                errors.append(rel_l2(out[b], ref[step]))
    engine.free_all()
    return max(errors[::5]), max(e for i, e in enumerate(errors) if i % 5)


def check_plain():
    choose = pa.choose_num_splits
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(dtype)
        for name, backend, graphs, splits, forced, compile in (
                ("triton eager", "triton", False, None, None, False),
                ("eager forced 32 splits", "triton", False, None, 32, False),
                ("eager forced 4 splits", "triton", False, None, 4, False),
                ("graphs 1 split", "triton", True, 1, None, False),
                ("graphs 4 splits", "triton", True, 4, None, False),
                ("graphs auto", "triton", True, None, None, False),
                ("compiled graphs auto", "triton", True, None, None, True),
                ("compiled graphs 4 splits", "triton", True, 4, None, True)):
            pa.choose_num_splits = (lambda *a, n=forced, **k: n) if forced else choose
            for batch in (1, 8):
                prefill_err, decode_err = check(model, backend, graphs, batch, dtype, splits, compile)
                print(f"{str(dtype):15s} {name:24s} batch={batch}: prefill {prefill_err:.2e} "
                      f"decode {decode_err:.2e}", flush=True)
    pa.choose_num_splits = choose


# ------------------------------------------------------------------------------ shared prefixes
def scenario(engine, name, gen):
    """(tables, token lists) after prefill, for one workload where decode groups appear."""
    def prompt(n):
        return torch.randint(3, 250, (n,), generator=gen).tolist()

    if name in ("6 beams", "64 samples"):
        root = engine.add(prompt(300 if name == "6 beams" else 517))
        engine.prefill([root])
        tables = [root] + [engine.fork(root) for _ in range(5 if name == "6 beams" else 63)]
    elif name == "256 x system prompt":
        system = prompt(1024)
        tables = [engine.add(system + prompt(int(n))) for n in torch.randint(64, 128, (256,), generator=gen)]
        engine.prefill(tables)
        assert all(t.num_cached_tokens >= 1024 for t in tables[1:]), "system prompt not reused"
    else:  # 16 prompts x 8 beams
        roots = [engine.add(prompt(int(n))) for n in torch.randint(100, 400, (16,), generator=gen)]
        engine.prefill(roots)
        tables = [t for r in roots for t in [r] + [engine.fork(r) for _ in range(7)]]
    return tables, [list(t.token_ids) for t in tables]


SCENARIOS = {"6 beams": 1, "64 samples": 1, "256 x system prompt": 1, "16 x 8 beams": 16}  # -> groups


def run_scenario(engine, name, steps=4):
    """Decode `steps` steps with distinct tokens per sequence; returns (sequences, step logits,
    how many steps took the cascade)."""
    gen = torch.Generator().manual_seed(1)
    tables, seqs = scenario(engine, name, gen)
    took_cascade = 0
    keys = []
    if engine.graphs is not None:
        stage = engine.graphs.stage
        engine.graphs.stage = lambda *a: keys.append(stage(*a)) or keys[-1]
    calls = []
    original = sp.shared_prefix_decode
    sp.shared_prefix_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    outs = []
    try:
        for _ in range(steps):
            tokens = torch.randint(3, 250, (len(tables),), generator=gen).tolist()
            groups = sp.group_shared_prefixes([t.block_ids for t in tables],
                                              [t.num_tokens + 1 for t in tables], engine.block_size)
            assert len(groups) == SCENARIOS[name], (name, len(groups))
            before = len(calls)
            outs.append(engine.decode(tables, tokens))
            for seq, token in zip(seqs, tokens):
                seq.append(token)
            took_cascade += bool(keys and keys[-1].chunks) if engine.graphs else len(calls) > before
    finally:
        sp.shared_prefix_decode = original
        if engine.graphs is not None:
            del engine.graphs.stage
        engine.free_all()
    return seqs, outs, took_cascade


def reference(model, seqs, steps):
    """[steps, S, V] logits of the model's own forward at each decode step."""
    out = []
    with torch.inference_mode():
        for seq in seqs:
            out.append(model(torch.tensor([seq], device=model.device)).logits[0, -steps:].float())
    return torch.stack(out, 1)


def check_shared() -> bool:
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(dtype)
        refs = {}
        for mode, graphs, compile in (("triton eager", False, False), ("graphs", True, False),
                                      ("compiled graphs", True, True)):
            engine = Engine(model, backend="triton", kv_cache_bytes=2**30, cuda_graphs=graphs,
                            compile=compile)
            engine.shared_prefix_min_saved_tokens = 0  # the check is of the cascade itself
            for name in SCENARIOS:
                seqs, outs, took = run_scenario(engine, name)
                if name not in refs:
                    refs[name] = reference(model, seqs, len(outs))
                err = max(rel_l2(out[b], refs[name][step, b])
                          for step, out in enumerate(outs) for b in range(out.shape[0]))
                good = err <= TOLERANCE[dtype] and took == len(outs)
                ok &= good
                print(f"{str(dtype):15s} shared prefix, {mode:16s} {name:20s}: decode {err:.2e}, "
                      f"cascade in {took}/{len(outs)} steps {'ok' if good else 'MISMATCH'}", flush=True)
            if engine.graphs is not None:
                print(f"{'':15s} graphs captured: {sorted(engine.graphs.graphs)}", flush=True)
            del engine
            torch.cuda.empty_cache()
    return ok


# ------------------------------------------------------------------------------ look-ahead
def check_look_ahead() -> bool:
    from sharedecode import Greedy, ParallelSampling

    ok = True
    model = make_model(torch.float32)
    with torch.no_grad():
        model.lm_head.weight[2].add_(0.05)  # EOS (id 2) likely enough to stop some sequences early
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 250, (int(n),), generator=gen).tolist() for n in (40, 300, 17, 128)]
    for graphs in (True, False):
        outcomes = {}
        for look_ahead in (True, False):
            engine = Engine(model, backend="triton", kv_cache_bytes=2**30, cuda_graphs=graphs,
                            look_ahead=look_ahead)
            fed = []
            decode = engine.decode
            engine.decode = lambda t, k, input_ids=None, **kw: (fed.append(input_ids is not None)
                                                                or decode(t, k, input_ids, **kw))
            runs = [Greedy(engine, max_new_tokens=40, eos_token_id=2).run(prompts),
                    ParallelSampling(engine, n=8, best_of=10, temperature=1.0, top_p=0.9, seed=1,
                                     max_new_tokens=40, eos_token_id=2).run(prompts)]
            outcomes[look_ahead] = [[(s.token_ids, s.finish_reason) for s in r.sequences] for rs in runs for r in rs]
            leaked = engine.kv_stats().blocks_in_use
            good = leaked == 0 and (any(fed) == look_ahead)
            ok &= good
            print(f"look-ahead {look_ahead!s:5s} graphs {graphs!s:5s}: {sum(fed)} of {len(fed)} steps ahead, "
                  f"{leaked} blocks left {'ok' if good else 'MISMATCH'}", flush=True)
        same = outcomes[True] == outcomes[False]
        stops = sum(s[1] == "eos" for r in outcomes[True] for s in r)
        ok &= same
        print(f"graphs {graphs!s:5s}: tokens {'identical' if same else 'DIFFER'} with and without look-ahead "
              f"({stops} sequences stopped at EOS)", flush=True)
    return ok


# ------------------------------------------------------------------------------ prefill graphs
def check_prefill_graphs() -> bool:
    """Prefill chunks replayed from CUDA graphs (padded to their bucket) against the same engine
    settings without them: logits, the keys and values written (the padding writes nowhere: the
    whole pool is compared), a replay of a captured graph, and greedy tokens."""
    from sharedecode import Greedy

    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(dtype)
        gen = torch.Generator().manual_seed(5)
        cases = {"512": [512], "300": [300], "3 prompts": [50, 130, 201], "64": [64], "20": [20]}
        for name, lengths in cases.items():
            prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in lengths]
            runs = {}
            for captured in (True, False):
                engine = Engine(model, backend="triton", kv_cache_bytes=2**28)
                if not captured:
                    engine.prefill_graphs = None
                logits = [engine.prefill([engine.add(p) for p in prompts])]
                engine.free_all()
                engine.reset_prefix_cache()
                logits.append(engine.prefill([engine.add(p) for p in prompts]))  # a replay
                replayed = captured and len(engine.prefill_graphs.graphs) == 1
                runs[captured] = (logits, engine.pool.tensor.float().clone(), replayed)
            (got, pool, replayed), (want, want_pool, _) = runs[True], runs[False]
            err = max(rel_l2(g, w) for g, w in zip(got, want))
            pool_err = rel_l2(pool, want_pool)
            same_top = all(bool((g.argmax(-1) == w.argmax(-1)).all()) for g, w in zip(got, want))
            good = err < TOLERANCE[dtype] and pool_err < TOLERANCE[dtype] and replayed and same_top
            ok &= good
            print(f"prefill graphs {str(dtype)[6:]:8s} {name:10s}: logits rel err {err:.1e}, pool {pool_err:.1e}, "
                  f"argmax {'same' if same_top else 'DIFFERS'}, one graph replayed: {replayed} "
                  f"{'ok' if good else 'MISMATCH'}", flush=True)
        if dtype == torch.float32:
            prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (77, 260)]
            tokens = {}
            for captured in (True, False):
                engine = Engine(model, backend="triton", kv_cache_bytes=2**28)
                if not captured:
                    engine.prefill_graphs = None
                results = Greedy(engine, max_new_tokens=12, min_new_tokens=12).run(prompts)
                tokens[captured] = [r.sequences[0].token_ids for r in results]
                leaked = engine.kv_stats().blocks_in_use
                ok &= leaked == 0
            same = tokens[True] == tokens[False]
            ok &= same
            print(f"prefill graphs greedy: tokens {'identical' if same else 'DIFFER'} with and without", flush=True)
    return ok


# ------------------------------------------------------------------------------ beams
def check_beams() -> bool:
    from sharedecode import BeamSearch
    from sharedecode.strategies import beam_search

    model = make_model(torch.float32)
    with torch.no_grad():
        model.lm_head.weight[2].add_(0.05)  # EOS (id 2) reachable: finished hypotheses compete
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 250, (int(n),), generator=gen).tolist() for n in (40, 300, 17)]
    engine = Engine(model, backend="triton", kv_cache_bytes=2**30)
    two_stage, on_kernels = beam_search.top_candidates, beam_search._on_kernels
    outcomes = {}
    for name, kernels, per_row in (("kernels", True, True), ("two-stage", False, True), ("flat", False, False)):
        beam_search.top_candidates = lambda lp, r, n, keep, per_row_first, f=two_stage, p=per_row: f(lp, r, n, keep, p)
        beam_search._on_kernels = lambda tensor, use=kernels: use and tensor.is_cuda
        try:
            results = [BeamSearch(engine, num_beams=k, max_new_tokens=30, eos_token_id=2, num_return_sequences=2)
                       .run(prompts) for k in (4, 8)]
        finally:
            beam_search.top_candidates, beam_search._on_kernels = two_stage, on_kernels
        outcomes[name] = [[(s.token_ids, round(s.score, 5)) for s in r.sequences] for rs in results for r in rs]
    ok = outcomes["two-stage"] == outcomes["flat"] == outcomes["kernels"] and engine.kv_stats().blocks_in_use == 0
    # Steps launched ahead (survivors and block tables made on the device; on by default on CUDA)
    # against reading each step's results first, with and without graphs, and with the cascade
    # forced on so that the steps ahead take shared-prefix groups too.
    for graphs in (True, False):
        for cascade in (False, True):
            runs = {}
            for look_ahead in (True, False):
                other = Engine(model, backend="triton", kv_cache_bytes=2**30, cuda_graphs=graphs,
                               look_ahead=look_ahead, compile=False)  # (compiling: minutes per engine)
                if cascade:
                    other.shared_prefix_min_saved_tokens = 0
                forked = []
                decode_forked = other.decode_forked
                other.decode_forked = lambda *a, f=decode_forked, **kw: forked.append(1) or f(*a, **kw)
                results = [BeamSearch(other, num_beams=k, max_new_tokens=30, eos_token_id=2,
                                      num_return_sequences=2).run(prompts) for k in (4, 8)]
                runs[look_ahead] = [[(s.token_ids, round(s.score, 4)) for s in r.sequences]
                                    for rs in results for r in rs]
                leaked = other.kv_stats().blocks_in_use + len(other.allocator.reserved)
                good = leaked == 0 and bool(forked) == look_ahead
                ok &= good
                print(f"beams ahead {look_ahead!s:5s} graphs {graphs!s:5s} cascade {cascade!s:5s}: "
                      f"{len(forked)} steps forked on the device, {leaked} blocks left "
                      f"{'ok' if good else 'MISMATCH'}", flush=True)
            same = runs[True] == runs[False]
            ok &= same
            print(f"beams graphs {graphs!s:5s} cascade {cascade!s:5s}: "
                  f"{'identical' if same else 'DIFFER'} with and without steps ahead", flush=True)
    hf_same = 0
    for k in (4, 8):
        for i, prompt in enumerate(prompts):
            out = model.generate(torch.tensor([prompt], device="cuda"), num_beams=k, do_sample=False,
                                 max_new_tokens=30, eos_token_id=2, pad_token_id=0, num_return_sequences=2,
                                 early_stopping=False)
            ours = outcomes["kernels"][(0 if k == 4 else 1) * len(prompts) + i]
            theirs = [[t for t in row[len(prompt):].tolist() if t != 0] for row in out]
            hf_same += [o[0] for o in ours] == theirs
    print(f"beams: kernels, two-stage and flat top-K {'identical' if ok else 'DIFFER'}; "
          f"HF generate's tokens equal ours for {hf_same} of {2 * len(prompts)} prompts", flush=True)
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("plain", "shared", "look_ahead", "beams", "prefill_graphs"))
    args = parser.parse_args()
    if args.only in (None, "plain"):
        check_plain()
    if args.only in (None, "shared") and not check_shared():
        print("shared-prefix decode: MISMATCH", flush=True)
        sys.exit(1)
    if args.only in (None, "look_ahead") and not check_look_ahead():
        print("look-ahead: MISMATCH", flush=True)
        sys.exit(1)
    if args.only in (None, "prefill_graphs") and not check_prefill_graphs():
        print("prefill graphs: MISMATCH", flush=True)
        sys.exit(1)
    if args.only in (None, "beams") and not check_beams():
        print("beams: MISMATCH", flush=True)
        sys.exit(1)
