"""The embedded default model (sharedecode/models/tiny-shakespeare) loads offline and is not gibberish."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest
import torch

from sharedecode.embedded import EMBEDDED_MODEL_DIR, load_embedded_model

# Common English words plus the stock vocabulary of the plays (stage directions, titles, forms
# of address, archaic pronouns and verbs).  A random-weight model with the same tokenizer picks
# words from this list only a few percent of the time.
COMMON_WORDS = set("""
a about above after again against all alone also am an and another any are art as at away ay
back bad be bear bed been before being best better between blood body both bring brother but by
call came can cannot come comes content could country crown cousin dare day dead dear death did
die do does done doth down duke each earth end england enter even ever every exeunt exit eye eyes
fair faith false far father fear fellow few find fire first follow fool for forth fortune france
friend friends from gentle gentleman get give go god gods gone good grace great had hand hands
has hast hath have he head hear heard heart heaven her here him himself his hither honest honour
house how i if ill in is it its itself joy just keep kill king kingdom knew know lady last lay
leave let life light like little live long look lord lords love made madam make man many marry
master may me mean men might mind mine more most mother much must my myself name nay ne'er never
new news night no noble nor not nothing now o of off oh old on once one only or other our out
own palace part peace place play poor pray prince put queen rather room royal said same say
scene see seem self set shall she should sir so some son soul speak stand still such sweet take
tell than thank thanks that the thee their them then there these they thine thing think this
those thou though thought three thus thy time to too true truth two unto up upon us very war was
way we welcome well were what when where which while who whom why wife will wind with within
without woman word words world would ye yea year yes yet you young your yourself
i'll i'm 'tis 'twas o'er e'en ta'en
""".split())


def _words(text: str) -> list[str]:
    out = []
    for w in text.lower().split():
        w = w.strip(".,;:!?-\"()[]")
        w = re.sub(r"'s$", "", w)
        if re.search(r"[a-z]", w):
            out.append(w)
    return out


def _common_fraction(model, tok, prompts, n_new=20):
    words = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 num_beams=1, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        words += _words(text)
    return sum(w in COMMON_WORDS for w in words) / max(len(words), 1), words


@pytest.fixture(scope="module")
def loaded():
    records = []

    class _Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = _Catch()
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, tok = load_embedded_model()
    finally:
        tf_logger.removeHandler(handler)
    return model, tok, records + [str(w.message) for w in caught]


def test_files_and_config(loaded):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tok, _ = loaded
    files = {p.name: p.stat().st_size for p in EMBEDDED_MODEL_DIR.iterdir()}
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "training.json"):
        assert name in files, name
    assert files["model.safetensors"] <= 10.5e6
    assert sum(files.values()) <= 12e6

    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert isinstance(cfg, LlamaConfig)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg.vocab_size == len(tok) == 4096
    assert cfg.max_position_embeddings >= 512
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 10e6
    assert model.dtype == torch.float32 and not model.training
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.bos_token_id == tok.bos_token_id

    info = json.loads((EMBEDDED_MODEL_DIR / "training.json").read_text())
    assert info["val_loss_nats_per_token"] < 4.0
    assert info["params"] == n_params


def test_loads_without_warnings(loaded):
    _, _, messages = loaded
    bad = [m for m in messages if re.search(r"missing|newly initialized|not used|unexpected|not initialized", m, re.I)]
    assert not bad, bad


def test_tokenizer_round_trip(loaded):
    _, tok, _ = loaded
    assert tok.is_fast
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    line = ("HAMLET.\nTo be, or not to be, that is the question:\n"
            "Whether 'tis nobler in the mind to suffer\n  The slings and arrows of outrageous fortune,\n")
    ids = tok(line)["input_ids"]
    assert tok.eos_token_id not in ids  # no special tokens added implicitly
    assert len(ids) < len(line) / 2.5  # BPE actually merges (about 3-4 characters a token)
    assert tok.decode(ids) == line
    assert tok.decode(tok(" ¿naïve — ½ émigré\t\n")["input_ids"]) == " ¿naïve — ½ émigré\t\n"  # byte-level


def test_likelihood_of_shakespeare(loaded):
    model, tok, _ = loaded
    text = ("ROMEO.\nBut soft, what light through yonder window breaks?\n"
            "It is the east, and Juliet is the sun!\nArise, fair sun, and kill the envious moon,\n")
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.5, loss  # a random-weight model is at ln(4096) ~ 8.3


PROMPTS = ["ROMEO:\n", "To be, or not to be", "My lord,"]


def test_greedy_generation_is_words(loaded):
    model, tok, _ = loaded
    frac, words = _common_fraction(model, tok, PROMPTS)
    assert len(words) >= 15, words
    assert frac >= 0.6, (frac, words)


def test_word_check_rejects_random_weights(loaded):
    """Control: the same check fails for an untrained model of the same shape."""
    from transformers import LlamaForCausalLM

    model, tok, _ = loaded
    torch.manual_seed(0)
    rand = LlamaForCausalLM(model.config).eval()
    frac, words = _common_fraction(rand, tok, PROMPTS)
    assert frac < 0.4, (frac, words)
