"""GPU check: engine decode logits (torch backend, Triton eager, Triton + CUDA graphs) against the
model's own forward, fp32 and bf16, several batch sizes. Prints relative L2 errors per step."""

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharedecode import Engine  # noqa: E402


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
                errors.append(float((out[b] - ref[step]).norm() / ref[step].norm()))
    engine.free_all()
    return max(errors[::5]), max(e for i, e in enumerate(errors) if i % 5)


import sharedecode.kernels.paged_attention as pa  # noqa: E402

choose = pa.choose_num_splits
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    for name, backend, graphs, splits, forced, compile in (
            ("triton eager", "triton", False, None, None, False),
            ("eager forced 32 splits", "triton", False, None, 32, False),
            ("eager forced 4 splits", "triton", False, None, 4, False),
            ("graphs 1 split", "triton", True, 1, None, False), ("graphs 4 splits", "triton", True, 4, None, False),
            ("graphs auto", "triton", True, None, None, False),
            ("compiled graphs auto", "triton", True, None, None, True),
            ("compiled graphs 4 splits", "triton", True, 4, None, True)):
        pa.choose_num_splits = (lambda *a, n=forced, **k: n) if forced else choose
        for batch in (1, 8):
            prefill_err, decode_err = check(model, backend, graphs, batch, dtype, splits, compile)
            print(f"{str(dtype):15s} {name:24s} batch={batch}: prefill {prefill_err:.2e} decode {decode_err:.2e}",
                  flush=True)
