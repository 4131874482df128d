"""The `sharedecode` command: JSON equal to the Python API, rich output, one-line errors, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sharedecode import BeamSearch, Engine, Greedy, ParallelSampling, SharedPromptBatch
from sharedecode.cli import main
from sharedecode.embedded import load_embedded_model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_embedded_model()


def api_engine(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return Engine(model, tokenizer)


def run_json(capsys, argv: list[str]) -> list[dict]:
    capsys.readouterr()
    code = main(argv + ["--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)  # nothing but JSON on stdout


def assert_same(cli: list[dict], api_results, prompts: list[str]) -> None:
    assert len(cli) == len(api_results)
    for got, prompt, result in zip(cli, prompts, api_results):
        want = result.to_dict()
        assert got["prompt"] == prompt
        assert got["prompt_token_ids"] == want["prompt_token_ids"]
        assert len(got["sequences"]) == len(want["sequences"])
        for g, w in zip(got["sequences"], want["sequences"]):
            assert g["token_ids"] == w["token_ids"]
            assert g["finish_reason"] == w["finish_reason"]
            assert g["text"] == w["text"]
            assert g["score"] == pytest.approx(w["score"], abs=1e-6)
            assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-6)
        noisy = {"wall_time_s"}
        assert {k: v for k, v in got["stats"].items() if k not in noisy} == \
            {k: v for k, v in want["stats"].items() if k not in noisy}


def test_beam_json_matches_api(capsys, model_and_tokenizer):
    got = run_json(capsys, ["beam", "ROMEO:\\n", "--num-beams", "3", "--num-return-sequences", "2",
                            "--max-new-tokens", "8", "--length-penalty", "0.5", "--early-stopping", "true"])
    want = BeamSearch(api_engine(model_and_tokenizer), num_beams=3, num_return_sequences=2, max_new_tokens=8,
                      length_penalty=0.5, early_stopping=True).run(["ROMEO:\n"])
    assert_same(got, want, ["ROMEO:\n"])


def test_sample_json_matches_api_with_file_and_stop(capsys, tmp_path, model_and_tokenizer):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\\n\n\nJULIET:\nO Romeo,\n", encoding="utf-8")  # a blank line is skipped
    got = run_json(capsys, ["sample", "--file", str(prompts), "--n", "2", "--best-of", "3", "--temperature",
                            "0.8", "--top-k", "50", "--top-p", "0.9", "--min-p", "0.01", "--seed", "7",
                            "--max-new-tokens", "10", "--stop", "\\n", "--stop", "!"])
    texts = ["ROMEO:\n", "JULIET:", "O Romeo,"]
    want = ParallelSampling(api_engine(model_and_tokenizer), n=2, best_of=3, temperature=0.8, top_k=50,
                            top_p=0.9, min_p=0.01, seed=7, max_new_tokens=10, stop=["\n", "!"]).run(texts)
    assert_same(got, want, texts)
    assert all(len(r["sequences"]) == 2 for r in got)


def test_greedy_json_matches_api(capsys, model_and_tokenizer):
    got = run_json(capsys, ["greedy", "KING:\\n", "--max-new-tokens", "9", "--min-new-tokens", "3",
                            "--repetition-penalty", "1.3", "--truncate-prompt"])
    want = Greedy(api_engine(model_and_tokenizer), max_new_tokens=9, min_new_tokens=3,
                  repetition_penalty=1.3, truncate_prompt=True).run(["KING:\n"])
    assert_same(got, want, ["KING:\n"])


@pytest.mark.parametrize("strategy, extra, kwargs", [
    ("greedy", [], {}),
    ("beam", ["--num-beams", "2"], {"num_beams": 2}),
])
def test_batch_json_matches_api(capsys, model_and_tokenizer, strategy, extra, kwargs):
    system = ("KING HENRY:\nNow, lords, for France; the enterprise whereof\n"
              "Shall be to you, as us, like glorious.\n")
    users = ["Good morrow", "What news?"]
    got = run_json(capsys, ["batch", *users, "--system-prompt", system.replace("\n", "\\n"),
                            "--strategy", strategy, "--max-new-tokens", "6", *extra])
    want = SharedPromptBatch(api_engine(model_and_tokenizer), system_prompt=system, strategy=strategy,
                             max_new_tokens=6, **kwargs).run(users)
    assert_same(got, want, users)
    assert got[0]["stats"]["prefill_tokens_reused"] > 0  # the system prompt's full blocks are shared


def test_rich_output_without_a_terminal(capsys):
    code = main(["beam", "ROMEO:\\n", "--num-beams", "2", "--num-return-sequences", "2",
                 "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0
    for expected in ("beam search", "finish", "length", "KV cache", "blocks in use (peak)",
                     "shared blocks (peak)", "contiguous", "prefill tokens"):
        assert expected in out
    assert "\x1b[" not in out  # no live view, no escape codes when stdout is not a terminal


def test_batch_rich_output_shows_reuse(capsys):
    code = main(["batch", "a", "b", "--system-prompt", "KING HENRY:\\n" * 6, "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "shared-prompt batch (greedy)" in out and "reused" in out


ERRORS = [
    ["beam", "x", "--num-beams", "0"],
    ["sample", "x", "--top-p", "2"],
    ["sample", "x", "--temperature", "-1"],
    ["sample", "x", "--n", "two"],
    ["beam", "--file", "/no/such/prompts.txt"],
    ["beam", ""],
    ["beam"],
    ["beam", "x", "--no-such-option"],
    ["frobnicate"],
    [],
    ["beam", "x", "--early-stopping", "maybe"],
    ["beam", "x", "--block-size", "12"],
    ["beam", "x", "--kv-cache-bytes", "lots"],
    ["batch", "x"],  # no --system-prompt
    ["batch", "x", "--system-prompt", "s", "--strategy", "greedy", "--num-beams", "2"],
    ["beam", "x", "--device", "nonsense"],
    # checked by the library (ValueError / TypeError), after the model is loaded:
    ["beam", "x", "--num-beams", "2", "--num-return-sequences", "3"],
    ["sample", "x", "--n", "4", "--best-of", "2"],
    ["beam", "x", "--max-new-tokens", "100000"],
    ["beam", "x", "--kv-cache-bytes", "16"],
    ["greedy", "x", "--max-new-tokens", "3", "--min-new-tokens", "4"],
]


@pytest.mark.parametrize("argv", ERRORS, ids=lambda a: " ".join(a) or "nothing")
def test_bad_arguments_exit_2_with_one_line(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("sharedecode") and "error" in lines[0]


def test_json_keeps_number_lists_on_one_line_and_strings_intact():
    from sharedecode.cli import dump_json

    data = [{"token_ids": [1, 2, 3], "text": "[ 1, 2 ]\n[\n 3 ]", "score": -1.5}]
    text = dump_json(data)
    assert '"token_ids": [1, 2, 3]' in text
    assert json.loads(text) == data


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["beam", "--help"]) == 0
    assert "--num-beams" in capsys.readouterr().out


def test_unknown_option_through_the_console_entry_point():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "sharedecode", "sample", "x", "--top-p", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == "sharedecode sample: error: argument --top-p: must be in (0, 1], got 2"


@pytest.mark.slow
def test_demo_runs_offline_and_prints_sequences():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sharedecode", "demo"], capture_output=True, text=True,
                          env=env, timeout=180)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in ("beam search", "parallel sampling", "shared-prompt batch", "finish", "length",
                     "KV cache", "reused", "demo finished"):
        assert expected in out
    assert "Traceback" not in proc.stderr
    assert elapsed < 180
