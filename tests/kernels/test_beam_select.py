"""Beam search's device kernels (`kernels/beam_select.py`) against their torch references: the
request's top-K of its rows' candidates and HF's choice of the running beams, and the block
tables of a step launched ahead. Selections must be equal element for element (ties, -inf, NaN,
EOS among the candidates), on fresh random inputs with outputs poisoned first."""
import pytest
import torch

from sharedecode.kernels.beam_select import (MAX_CANDIDATES, beam_candidates, beam_candidates_torch,
                                             fork_beam_rows, fork_beam_rows_torch)


def candidates_inputs(requests, k, eos_count, vocab, device, ties=False, nan=False):
    keep = max(2, 1 + eos_count) * k
    log_probs = torch.randn(requests * k, vocab, device=device).log_softmax(-1)
    if ties:  # equal scores inside rows and across rows of a request
        log_probs = (log_probs * 4).round() / 4
    if nan:
        log_probs[0, 1] = float("nan")
        log_probs[-1, :3] = float("-inf")
    values, tokens = torch.topk(log_probs, keep, dim=-1)
    running = torch.randn(requests * k, device=device)
    if ties:
        running = running.round()
    running[::k][: requests // 2] = 0.0
    eos = torch.randperm(vocab, device=device)[:eos_count]
    if eos_count:  # make EOS a top candidate somewhere
        tokens[0, 0] = eos[0]
    return values, tokens, running, eos, keep


@pytest.mark.parametrize("k,eos_count", [(1, 0), (2, 1), (4, 2), (8, 1), (5, 3), (16, 1)])
@pytest.mark.parametrize("ties,nan", [(False, False), (True, False), (False, True)])
def test_beam_candidates_matches_the_reference(device, k, eos_count, ties, nan):
    vocab = 3 * max(2, 1 + eos_count) * k + 7
    values, tokens, running, eos, keep = candidates_inputs(3, k, eos_count, vocab, device, ties, nan)
    out = torch.full((3, 2 * keep + 2 * k), float("nan"), dtype=torch.float64, device=device)
    got = beam_candidates(values, tokens, running, eos, vocab, k, out=out)
    want = beam_candidates_torch(values, tokens, running, eos, vocab, k)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(got).any(), "an output element was not written"
    assert torch.equal(got, want)


def test_beam_candidates_is_hfs_top_k_and_running_choice(device):
    """On distinct scores the layout holds HF's values: the top-K of k x V scores (with flat
    indices), and the best k of them after EOS candidates are pushed down."""
    k, vocab = 4, 40
    log_probs = torch.randn(2 * k, vocab, device=device).log_softmax(-1)
    running = torch.randn(2 * k, device=device)
    keep = 2 * k
    values, tokens = torch.topk(log_probs, keep, dim=-1)
    eos = tokens[0, :1].clone()  # the best token of beam 0 ends
    got = beam_candidates(values, tokens, running, eos, vocab, k).cpu()
    scores = (log_probs + running[:, None]).reshape(2, k * vocab).cpu()
    top_values, top_indices = torch.topk(scores, keep)
    assert torch.equal(got[:, :keep], top_values.double())
    assert torch.equal(got[:, keep : 2 * keep], top_indices.double())
    ends = torch.isin(top_indices % vocab, eos.cpu())
    kept, chosen = torch.topk(top_values + ends.float() * -1e9, k)
    assert torch.equal(got[:, 2 * keep : 2 * keep + k], chosen.double())
    assert torch.equal(got[:, 2 * keep + k :], kept.double())


def test_beam_candidates_validates_its_inputs(device):
    values, tokens, running, eos, keep = candidates_inputs(2, 4, 1, 50, device)
    with pytest.raises(ValueError, match="num_beams"):
        beam_candidates(values, tokens, running, eos, 50, 0)
    with pytest.raises(ValueError, match="rows per request"):
        beam_candidates(values, tokens, running, eos, 50, 3)
    with pytest.raises(ValueError, match="running"):
        beam_candidates(values, tokens, running[:-1], eos, 50, 4)
    with pytest.raises(ValueError, match="vocab"):
        beam_candidates(values, tokens, running, eos, 3, 4)
    with pytest.raises(ValueError, match="float32"):
        beam_candidates(values.double(), tokens, running, eos, 50, 4)
    assert 32 * 4 * 32 > MAX_CANDIDATES
    with pytest.raises(ValueError, match="candidates"):
        beam_candidates(*candidates_inputs(1, 32, 3, 200, device)[:4], 200, 32)


@pytest.mark.parametrize("k,requests,launched", [(2, 1, 1), (4, 3, 5), (8, 2, 2), (3, 4, 6)])
def test_fork_beam_rows_matches_the_reference(device, k, requests, launched):
    vocab = 97
    values, tokens, running, eos, keep = candidates_inputs(launched, k, 1, vocab, device)
    flat = beam_candidates_torch(values, tokens, running, eos, vocab, k)
    order = torch.randperm(launched, device=device)[:requests].to(torch.int32)
    prev_width = torch.randint(2, 9, ()).item()
    store = torch.randint(0, 1000, (launched * k + 3, prev_width + 4), dtype=torch.int32, device=device)
    previous = store[: launched * k, :prev_width]  # a strided view, as the graph's static table is
    n = requests * k
    columns = torch.randint(0, prev_width + 1, (n,), dtype=torch.int32, device=device)
    copy = ((torch.rand(n, device=device) < 0.6) & (columns < prev_width)).to(torch.int32)
    tails = torch.randperm(500, device=device)[:n].to(torch.int32) + 2000
    width = prev_width + 1
    got = fork_beam_rows(flat, order, previous, columns, tails, copy, vocab, k, width)
    want = fork_beam_rows_torch(flat, order, previous, columns, tails, copy, vocab, k, width)
    for name, a, b in zip(("rows", "copy_src", "tokens", "running"), got, want):
        assert torch.equal(a, b), name
    rows, source, tok, run = want
    # the definition: row i is its chosen parent's row with the tail in its column
    results = flat.index_select(0, order.long()).cpu()
    for i in range(n):
        r, j = divmod(i, k)
        position = int(results[r, 2 * keep + j])
        index = int(results[r, keep + position])
        parent = int(order[r]) * k + index // vocab
        expected = previous[parent].tolist() + [0]
        expected[int(columns[i])] = int(tails[i])
        assert rows[i].tolist() == expected[:width]
        assert int(tok[i]) == index % vocab
        assert int(source[i]) == (int(previous[parent, int(columns[i])]) if copy[i] else -1)
        assert float(run[i]) == float(results[r, 2 * keep + k + j])


def test_fork_beam_rows_validates_its_inputs(device):
    flat = torch.zeros(2, 4 * 2 + 4, dtype=torch.float64, device=device)
    order = torch.zeros(2, dtype=torch.int32, device=device)
    previous = torch.zeros(4, 3, dtype=torch.int32, device=device)
    ints = torch.zeros(4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="width"):
        fork_beam_rows(flat, order, previous, ints, ints, ints, 50, 2, 2)
    with pytest.raises(ValueError, match="columns"):
        fork_beam_rows(flat, order, previous, ints[:3], ints[:3], ints[:3], 50, 2, 4)
    with pytest.raises(ValueError, match="previous"):
        fork_beam_rows(flat, order, previous.long(), ints, ints, ints, 50, 2, 4)
    with pytest.raises(ValueError, match="flat"):
        fork_beam_rows(flat.float(), order, previous, ints, ints, ints, 50, 2, 4)
