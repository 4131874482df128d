"""End-to-end and decode-step benchmarks on one GPU (issues 4 and 7; benchmarks.md protocol).

Measures, in one run on one card: the copy bandwidth; the engine's decode step (CUDA graphs,
Triton kernels) for M1/M2 at batch 1, 8, 64 against the bandwidth floor; and the workloads W-beam,
W-beam-batch, W-sample and W-shared for sharedecode and HF `model.generate` with the same settings
(warm, median of --repeats), with peak KV memory against the contiguous equivalent.

    python bench/bench_e2e.py --out results.json [--models M1 M2] [--quick] [--time-budget 480]
    python bench/bench_e2e.py --tiny --device cpu   # a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharedecode import BeamSearch, Engine, Greedy, ParallelSampling  # noqa: E402
from bench.graph_timing import median_replay_us  # noqa: E402
from sharedecode.kernels import paged_attention as paged_attention_module  # noqa: E402
from sharedecode.kernels import pdl as pdl_module  # noqa: E402
from sharedecode.kernels import skinny_matmul as skinny_matmul_module  # noqa: E402
import sharedecode.attention as attention_module  # noqa: E402
import sharedecode.sampling as sampling  # noqa: E402

MODELS = {
    "M1": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "M2": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(name: str, device, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[name], max_position_embeddings=4096, eos_token_id=2, bos_token_id=1)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    if device.type != "cuda":
        return float("nan")
    src = torch.randn(2**28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed(fn, device, repeats: int, before=None):
    """(median seconds, all runs, last output) of `fn` over `repeats` runs after two warm-up runs;
    `before()` runs ahead of every run, untimed (ours: `Engine.reset_prefix_cache`, so that no run
    reuses the prompts' KV left by the run before: HF generate computes every prompt each time)."""
    times, out = [], None
    for index in range(2 + repeats):
        if before is not None:
            before()
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


HI = 250  # token ids drawn from [3, HI): valid for every model here


def decode_steps(engine: Engine, batch: int, context: int, steps: int, bandwidth: float):
    """Median decode-step time for `batch` sequences of `context` tokens (distinct prompts)."""
    device = engine.device
    gen = torch.Generator().manual_seed(batch)
    tables = [engine.add(torch.randint(3, HI, (context,), generator=gen).tolist()) for _ in range(batch)]
    try:
        engine.prefill(tables)
        tokens = [5] * batch
        for _ in range(3):
            engine.decode(tables, tokens)
        sync(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.decode(tables, tokens)
            sync(device)
            times.append(time.perf_counter() - start)
        ctx = tables[0].num_tokens
        try:
            replay = replay_seconds(engine, batch, steps)
        except Exception as error:  # noqa: BLE001 - an extra column must not cost the run
            print(f"  replay timing failed: {error!r}", flush=True)
            replay = None
    finally:
        for t in tables:
            engine.free(t)
    kv = batch * ctx * engine.layout.bytes_per_token
    floor = (weight_bytes(engine.model) + kv) / bandwidth
    step = statistics.median(times)
    row = {"batch": batch, "context": ctx, "step_ms": step * 1e3, "floor_ms": floor * 1e3,
           "ratio_to_floor": step / floor}
    if replay is not None:  # the captured step alone: no host staging, no sync wait
        row.update(replay_ms=replay * 1e3, replay_ratio_to_floor=replay / floor)
    return row


def set_folds(folds: tuple[bool, bool, bool, bool]) -> tuple[bool, bool, bool, bool]:
    """Set (split merge in the attention kernel, split-K sum in the skinny GEMM, KV write in the
    attention kernel, programmatic dependent launch) for the graphs captured next; returns the
    settings it replaced."""
    previous = (paged_attention_module.MERGE_SPLITS_IN_KERNEL, skinny_matmul_module.SUM_SPLITS_IN_KERNEL,
                attention_module.WRITE_KV_IN_KERNEL, pdl_module.ENABLED)
    (paged_attention_module.MERGE_SPLITS_IN_KERNEL, skinny_matmul_module.SUM_SPLITS_IN_KERNEL,
     attention_module.WRITE_KV_IN_KERNEL, pdl_module.ENABLED) = folds
    return previous


def replay_note(row: dict) -> str:
    return f", replay {row['replay_ms']:.3f} ms" if "replay_ms" in row else ""


def replay_seconds(engine: Engine, batch: int, steps: int) -> float | None:
    """Median device time of the last decode step's CUDA graph replayed again (CUDA events around
    each replay): the kernels alone, for comparing variants of the step more finely than the
    step's wall time (which adds the host's staging). Replaying rewrites the same K/V slots."""
    graphs = engine.graphs
    if graphs is None or not torch.cuda.is_available():
        return None
    keys = [k for k in graphs.graphs if k.size == graphs._bucket(batch) and not k.chunks]
    if not keys:
        return None
    graph, _ = graphs.graphs[keys[0]]
    return median_replay_us(graph, steps) / 1e6


def check_logits(model, engine: Engine) -> dict:
    """Engine prefill + decode logits against the model's own forward (relative L2 error)."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, HI, (300,), generator=gen).tolist()
    table = engine.add(prompt)
    try:
        ours = [engine.prefill([table])[0]]
        for token in (7, 8, 9):
            ours.append(engine.decode([table], [token])[0])
    finally:
        engine.free(table)
    with torch.inference_mode():
        ref = model(torch.tensor([prompt + [7, 8, 9]], device=engine.device)).logits[0, -4:].float()
    errors = [float((o - r).norm() / r.norm()) for o, r in zip(ours, ref)]
    return {"prefill_rel_err": errors[0], "decode_rel_err_max": max(errors[1:])}


def run_hf_generate_batch(model, prompts, new_tokens, repeats, device) -> dict:
    """HF continuous batching (`generate_batch`, its own paged cache), greedy, as a second baseline."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              eos_token_id=model.config.vocab_size - 1)  # an id the prompts never hold

    def run():
        return model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)

    try:
        t, runs, out = timed(run, device, repeats)
    except Exception as error:  # noqa: BLE001 - recorded, the other baselines go on
        return {"hf_batch_error": repr(error)[:300]}
    generated = sum(len(o.generated_tokens) for o in out.values())
    return {"hf_batch_s": t, "hf_batch_runs_s": runs, "hf_batch_tokens": generated,
            "hf_batch_tok_s": generated / t}


def run_workload(name, model, engine, prompts, ours, hf_kwargs, repeats, device, hf_batch=False,
                 ablate_shared_prefix=False, ablate_look_ahead=False, ablate_graph_copies=False,
                 ablate_fused_top_p=False, ablate_compiled_prefill=False, ablate_prefill_graphs=False):
    """Time sharedecode and HF generate (and, for shared prompts, HF generate_batch) on the same prompts."""
    ids = [torch.tensor(p) for p in prompts]

    def run_ours():
        return ours.run(prompts if len(prompts) > 1 else prompts[0])

    def run_hf():
        batch = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0, padding_side="left")
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True,
                                               padding_side="left")
        return model.generate(batch.to(device), attention_mask=mask.to(device), **hf_kwargs)

    def time_ours():  # every run on a fresh prefix cache (see `timed`)
        return timed(run_ours, device, repeats, engine.reset_prefix_cache)

    def replays():
        return engine.prefill_graphs.replays if engine.prefill_graphs is not None else 0

    replays_before = replays()
    t_ours, all_ours, result = time_ours()
    prefill_graph_replays = replays() - replays_before
    plain = None
    if ablate_shared_prefix and engine.shared_prefix:  # the same run with plain paged attention
        engine.shared_prefix = False
        try:
            plain, _, _ = time_ours()
        finally:
            engine.shared_prefix = True
    stepped = None
    if ablate_look_ahead and engine.look_ahead:  # the same run reading each step's results first
        engine.look_ahead = False
        try:
            stepped, _, _ = time_ours()
        finally:
            engine.look_ahead = True
    launched_copies = None
    if ablate_graph_copies and engine.graphs is not None:  # copy-on-write launched before each replay
        engine.graphs.takes_copies = lambda copies, num_seqs: False
        try:
            launched_copies, _, _ = time_ours()
        finally:
            del engine.graphs.takes_copies
    eager_prefill = None
    if ablate_compiled_prefill and engine.graphs is not None and engine.graphs.compiled_prefill is not None:
        compiled_prefill = engine.graphs.compiled_prefill  # eager, the swaps from swap_from_tokens
        engine.graphs.compiled_prefill = None
        try:
            eager_prefill, _, _ = time_ours()
        finally:
            engine.graphs.compiled_prefill = compiled_prefill
    uncaptured_prefill = None
    if ablate_prefill_graphs and engine.prefill_graphs is not None:  # short prefills run eagerly
        prefill_graphs, engine.prefill_graphs = engine.prefill_graphs, None
        try:
            uncaptured_prefill, _, _ = time_ours()
        finally:
            engine.prefill_graphs = prefill_graphs
    sorted_top_p = None
    params = getattr(ours, "params", None)
    if ablate_fused_top_p and params is not None and params.temperature > 0:  # the torch ops' sort
        sampling.FUSED_TOP_P = False
        try:
            sorted_top_p, _, _ = time_ours()
        finally:
            sampling.FUSED_TOP_P = True
    stats = (result[0] if isinstance(result, list) else result).stats
    new_tokens = hf_kwargs["max_new_tokens"]
    outputs = len(prompts) * hf_kwargs.get("num_return_sequences", 1) * new_tokens
    row = {
        "workload": name, "sharedecode_s": t_ours, "sharedecode_runs_s": all_ours,
        "sharedecode_tok_s": outputs / t_ours,
        "peak_kv_bytes": stats.peak_kv_bytes, "peak_contiguous_kv_bytes": stats.peak_contiguous_kv_bytes,
        "kv_fraction_of_contiguous": stats.peak_kv_bytes / max(1, stats.peak_contiguous_kv_bytes),
        "prefill_tokens_reused": stats.prefill_tokens_reused, "decode_steps": stats.decode_steps,
    }
    if launched_copies is not None:
        row["sharedecode_copies_launched_s"] = launched_copies
        print(f"  {name:28s} ours {t_ours:7.3f}s copies in the graph, {launched_copies:7.3f}s launched",
              flush=True)
    row["prefill_graph_replays"] = prefill_graph_replays  # over the warm-up and timed runs
    if uncaptured_prefill is not None:
        row["sharedecode_prefill_not_captured_s"] = uncaptured_prefill
        print(f"  {name:28s} ours {t_ours:7.3f}s prefill graphs, {uncaptured_prefill:7.3f}s without",
              flush=True)
    if eager_prefill is not None:
        row["sharedecode_eager_prefill_s"] = eager_prefill
        print(f"  {name:28s} ours {t_ours:7.3f}s prefill compiled, {eager_prefill:7.3f}s eager", flush=True)
    if sorted_top_p is not None:
        row["sharedecode_sorted_top_p_s"] = sorted_top_p
        print(f"  {name:28s} ours {t_ours:7.3f}s fused top-p, {sorted_top_p:7.3f}s sorted", flush=True)
    if stepped is not None:
        row["sharedecode_no_look_ahead_s"] = stepped
        print(f"  {name:28s} ours {t_ours:7.3f}s with look-ahead, {stepped:7.3f}s without", flush=True)
    if plain is not None:
        row["sharedecode_plain_attention_s"] = plain
        print(f"  {name:28s} ours {t_ours:7.3f}s with shared-prefix decode, {plain:7.3f}s without", flush=True)
    try:  # HF runs second, so that its failure (e.g. out of memory) keeps our measurement
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t_hf, all_hf, _ = timed(run_hf, device, repeats)
    except torch.OutOfMemoryError as error:
        row["hf_error"] = repr(error)[:300]
        print(f"  {name:28s} ours {t_ours:7.3f}s  hf out of memory", flush=True)
        return row
    row.update(hf_s=t_hf, hf_runs_s=all_hf, speedup=t_hf / t_ours, hf_tok_s=outputs / t_hf,
               hf_peak_extra_bytes=(torch.cuda.max_memory_allocated(device) - base)
               if device.type == "cuda" else None)
    print(f"  {name:28s} ours {t_ours:7.3f}s  hf {t_hf:7.3f}s  x{t_hf / t_ours:5.2f}  "
          f"kv {row['kv_fraction_of_contiguous']:.3f} of contiguous", flush=True)
    if hf_batch:
        row.update(run_hf_generate_batch(model, prompts, new_tokens, repeats, device))
        if "hf_batch_s" in row:
            row["speedup_vs_hf_batch"] = row["hf_batch_s"] / t_ours
            print(f"  {name:28s} hf generate_batch {row['hf_batch_s']:7.3f}s "
                  f"({row['hf_batch_tokens']} tokens)  x{row['speedup_vs_hf_batch']:5.2f}", flush=True)
        else:
            print(f"  {name:28s} hf generate_batch failed: {row['hf_batch_error']}", flush=True)
    return row


def fits_in_budget(engine, prompt_len: int, new_tokens: int, budget: int) -> dict:
    """Concurrent beams/samples of one prompt that fit `budget` bytes: paged+shared vs contiguous."""
    bs = engine.block_size
    per_token = engine.layout.bytes_per_token
    prompt_blocks = prompt_len // bs  # full prompt blocks are shared by every fork
    own_blocks = -(-(prompt_len + new_tokens) // bs) - prompt_blocks
    blocks = budget // (bs * per_token)
    paged = (blocks - prompt_blocks) // own_blocks
    contiguous = budget // ((prompt_len + new_tokens) * per_token)
    return {"prompt": prompt_len, "new_tokens": new_tokens, "budget_bytes": budget,
            "paged_sequences": paged, "contiguous_sequences": contiguous, "ratio": paged / contiguous}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_e2e.json")
    parser.add_argument("--models", nargs="+", default=["M1"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer workloads")
    parser.add_argument("--tiny", action="store_true", help="smoke-test the script on a tiny model")
    parser.add_argument("--time-budget", type=float, default=480.0)
    parser.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    parser.add_argument("--only", default=None,
                        help="run only workloads whose name contains this (or one of these, comma-separated)")
    parser.add_argument("--skip-decode", action="store_true", help="skip the decode-step section")
    parser.add_argument("--skip-hf-batch", action="store_true",
                        help="skip the HF generate_batch baseline of W-shared (minutes per model)")
    parser.add_argument("--hf-control", action="store_true",
                        help="time HF W-beam k=8 on the model before any engine touches it")
    parser.add_argument("--no-compile", action="store_true", help="capture the uncompiled decode step")
    parser.add_argument("--ablate-shared-prefix", action="store_true",
                        help="also time each workload with plain paged attention (no shared-prefix decode)")
    parser.add_argument("--ablate-look-ahead", action="store_true",
                        help="also time each workload without the scheduler's look-ahead")
    parser.add_argument("--decode-variants", action="store_true",
                        help="also time the decode step captured without torch.compile / fused projections")
    parser.add_argument("--ablate-graph-copies", action="store_true",
                        help="also time each workload with copy-on-write copies launched before the replay")
    parser.add_argument("--ablate-fused-top-p", action="store_true",
                        help="also time each sampling workload with the torch ops' sort-based top-p")
    parser.add_argument("--ablate-merge", action="store_true",
                        help="also time the decode step with the split-KV merge, the split-K sum and "
                             "the KV write as kernels of their own")
    parser.add_argument("--ablate-kv-write", action="store_true",
                        help="also time the decode step with the KV write as a kernel of its own")
    parser.add_argument("--pdl", action="store_true",
                        help="also time the decode step with programmatic dependent launch (off by default)")
    parser.add_argument("--ablate-skinny", action="store_true",
                        help="also time the decode step with cuBLAS for every projection (no skinny GEMM)")
    parser.add_argument("--ablate-compiled-prefill", action="store_true",
                        help="also time each workload with the prefill run eagerly (not compiled)")
    parser.add_argument("--ablate-prefill-graphs", action="store_true",
                        help="also time each workload with short prefills run without their CUDA graphs")
    parser.add_argument("--ablate-rotary", action="store_true",
                        help="also time the decode step with the model's own rotary kernels (not deferred to "
                             "the attention kernels)")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                        help="set a torch._inductor.config option (Python literal) for the whole run")
    args = parser.parse_args()
    t0 = time.perf_counter()
    for option in args.inductor:  # experiments: e.g. combo_kernels=True
        import ast

        import torch._inductor.config as inductor_config

        name, _, value = option.partition("=")
        setattr(inductor_config, name, ast.literal_eval(value))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import transformers

    report = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "commit": args.commit,
        "date": time.strftime("%Y-%m-%d"), "dtype": str(dtype), "inductor_options": args.inductor,
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else 50e9
    report["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(report, flush=True)
    models = ["tiny"] if args.tiny else args.models
    scale = 8 if args.tiny else 1
    prompt_len, new_tokens = 512 // scale, 128 // scale
    for name in models:
        if time.perf_counter() - t0 > args.time_budget:
            break
        section = report.setdefault(name, {})
        model = build_model(name, device, dtype)
        kv_bytes = 16 * 2**30 if device.type == "cuda" else 2**28
        if args.hf_control:
            # HF generate's W-beam k=8 on the untouched model, before any engine exists: shows whether
            # anything we do to the model (attention switch, fused weight views, compile) slows HF.
            gen = torch.Generator().manual_seed(0)
            control = torch.randint(3, HI, (1, prompt_len), generator=gen).to(device)
            t_control, runs, _ = timed(lambda: model.generate(control, num_beams=8, do_sample=False,
                                                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                              pad_token_id=0), device, args.repeats)
            section["hf_control_beam8_before_engine_s"] = t_control
            section["hf_control_beam8_before_engine_runs_s"] = runs
            print(f"  {name} HF W-beam k=8 before any engine: {t_control:.3f}s {runs}", flush=True)
        section["compile"] = not args.no_compile
        section["shared_prefix_decode"] = True
        # (name, compile, fused projections, skinny GEMM, folds: None for the defaults, else
        # (split merge in the attention kernel, split-K sum in the GEMM, KV write in the attention
        # kernel, programmatic dependent launch), and optionally False: the model's own rotary)
        variants = []
        if args.decode_variants:
            variants += [("graphs", False, False, False, None), ("graphs+compile", True, False, False, None)]
        if args.ablate_skinny:
            variants.append(("compile+fused, cuBLAS projections", True, True, False, None))
        if args.ablate_merge:
            variants.append(("split merge and split-K sum as kernels of their own", True, True, True,
                             (False, False, False, False)))
        if args.ablate_kv_write:
            variants.append(("KV write as its own kernel", True, True, True, (True, True, False, False)))
        if args.ablate_rotary:
            variants.append(("rotary as the model's own kernels", True, True, True, None, False))
        if args.pdl:
            variants.append(("programmatic dependent launch", True, True, True, (True, True, True, True)))
        if variants and not args.skip_decode:
            # The same captured step with other options, same run.
            for variant, compile_step, fuse, skinny, folds, *rotary in variants:
                plain = Engine(model, backend="auto", kv_cache_bytes=kv_bytes, compile=compile_step)
                if rotary == [False] and plain.graphs is not None:  # (read at capture)
                    plain.graphs.rotary = None
                if not fuse and plain.graphs is not None:
                    plain.graphs.fuser = None
                elif plain.graphs is not None and plain.graphs.fuser is not None:
                    plain.graphs.fuser.skinny = skinny
                rows = section.setdefault("decode_variants", {}).setdefault(variant, [])
                defaults = set_folds(folds) if folds is not None else None  # (read at capture)
                try:
                    for batch in (1, 8, 64):
                        row = decode_steps(plain, batch, prompt_len, 20 if not args.tiny else 3, bandwidth)
                        rows.append(row)
                        print(f"  {name} decode ({variant}) batch {batch:3d}: {row['step_ms']:.3f} ms, "
                              f"floor {row['floor_ms']:.3f} ms, x{row['ratio_to_floor']:.2f}"
                              f"{replay_note(row)}", flush=True)
                finally:
                    if defaults is not None:
                        set_folds(defaults)
                del plain
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        # A fixed KV budget leaves HF generate room on the same card.
        engine = Engine(model, backend="auto", kv_cache_bytes=kv_bytes, compile=not args.no_compile)
        section["weight_bytes"] = weight_bytes(model)
        section["check"] = check_logits(model, engine)
        print(f"  {name} logits vs HF forward: {section['check']}", flush=True)
        section["kv_blocks"] = engine.allocator.num_blocks
        # Decode step against the floor.
        section["decode"] = []
        for batch in (() if args.skip_decode else (1, 8, 64)):
            row = decode_steps(engine, batch, prompt_len, 20 if not args.tiny else 3, bandwidth)
            section["decode"].append(row)
            print(f"  {name} decode batch {batch:3d}: {row['step_ms']:.3f} ms, floor {row['floor_ms']:.3f} ms, "
                  f"x{row['ratio_to_floor']:.2f}{replay_note(row)}", flush=True)
        section["fit_8GiB"] = fits_in_budget(engine, 2048, 128, 8 * 2**30)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, HI, (prompt_len,), generator=gen).tolist()
        common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        hf_common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        workloads = []
        for k in ((4, 8, 16) if not args.quick else (8,)):
            workloads.append((f"W-beam k={k}", [prompt], BeamSearch(engine, num_beams=k, **common),
                              dict(num_beams=k, do_sample=False, **hf_common)))
        # top_k=0 for HF: its generate adds top_k=50 by default, which the workload does not have
        # (our ParallelSampling, like the spec, applies only top_p and temperature).
        workloads.append(("W-sample n=64", [prompt],
                          ParallelSampling(engine, n=64, top_p=0.9, temperature=0.8, seed=0, **common),
                          dict(do_sample=True, num_return_sequences=64, top_p=0.9, temperature=0.8, top_k=0,
                               **hf_common)))
        if not args.quick:
            workloads.append(("W-sample n=8", [prompt],
                              ParallelSampling(engine, n=8, top_p=0.9, temperature=0.8, seed=0, **common),
                              dict(do_sample=True, num_return_sequences=8, top_p=0.9, temperature=0.8, top_k=0,
                                   **hf_common)))
        system = torch.randint(3, HI, (1024 // scale,), generator=gen).tolist()
        for requests in (32, 256):
            prompts = [system + torch.randint(3, HI, (64 // scale,), generator=gen).tolist()
                       for _ in range(requests)]
            workloads.append((f"W-shared {requests}", prompts, Greedy(engine, **common),
                              dict(do_sample=False, **hf_common)))
        batch_prompts = [torch.randint(3, HI, (prompt_len,), generator=gen).tolist() for _ in range(16)]
        workloads.append(("W-beam-batch 16x8", batch_prompts, BeamSearch(engine, num_beams=8, **common),
                          dict(num_beams=8, do_sample=False, **hf_common)))
        section["workloads"] = []
        for workload in workloads:
            if args.only and not any(part in workload[0] for part in args.only.split(",")):
                continue
            if time.perf_counter() - t0 > args.time_budget:
                section["skipped_for_time"] = True
                break
            try:
                section["workloads"].append(run_workload(*workload[:1], model, engine, workload[1], workload[2],
                                                         workload[3], args.repeats, device,
                                                         hf_batch=workload[0].startswith("W-shared")
                                                         and not args.skip_hf_batch,
                                                         ablate_shared_prefix=args.ablate_shared_prefix,
                                                         ablate_look_ahead=args.ablate_look_ahead,
                                                         ablate_graph_copies=args.ablate_graph_copies,
                                                         ablate_compiled_prefill=args.ablate_compiled_prefill,
                                                         ablate_prefill_graphs=args.ablate_prefill_graphs,
                                                         ablate_fused_top_p=args.ablate_fused_top_p))
            except Exception as error:  # record and go on: one failure must not lose the others
                section["workloads"].append({"workload": workload[0], "error": repr(error)})
                print(f"  {workload[0]} failed: {error!r}", flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
        del engine, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
