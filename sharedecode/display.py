"""Rich rendering for the CLI: live views while decoding, then result tables and a KV-cache panel.

The live views are built from the per-request snapshots that `Strategy.stream()` yields after every
step (`{"beams": [(tokens, score)], "finished": [...], "done": bool}` for beam search,
`{"samples": [(tokens, logprob)], "finished": [...], "done": bool}` for sampling and greedy), so
they need nothing from the engine but its `kv_stats()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

NEWLINE = "⏎"
FORK_STYLES = ["cyan", "magenta", "yellow", "green", "blue", "red"]
MAX_LIVE_REQUESTS = 3  # requests shown in a live view; the rest are summarised in one line


# ------------------------------------------------------------------------- text helpers
def one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", NEWLINE)


def marked_newlines(text: str) -> Text:
    """Text on one line, each newline shown as a dim ⏎."""
    out = Text()
    for index, line in enumerate(text.replace("\r", "").split("\n")):
        if index:
            out.append(NEWLINE, style="dim")
        out.append(line)
    return out


def short(text: str, width: int) -> str:
    """`text` on one line, its start elided to fit `width` characters."""
    text = one_line(text)
    return text if len(text) <= width else "…" + text[-(width - 1):]


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


class TokenText:
    """Decodes token lists for display, caching by tuple (the same beams come back every step)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[tuple[int, ...], str] = {}

    def __call__(self, tokens) -> str:
        key = tuple(tokens)
        if key not in self.cache:
            if len(self.cache) > 20000:
                self.cache.clear()
            if self.tokenizer is None:
                self.cache[key] = " ".join(map(str, key))
            else:
                self.cache[key] = self.tokenizer.decode(list(key), skip_special_tokens=True)
        return self.cache[key]

    def tail(self, tokens, width: int, style: str = "bold green") -> Text:
        """The end of the decoded text, with the newest token's text highlighted."""
        full = self(tokens)
        before = self(tokens[:-1]) if tokens else ""
        if not full.startswith(before):  # a multi-byte character split across tokens
            before = full
        old, new = one_line(before), one_line(full[len(before):])
        room = max(width - len(new), 8)
        if len(old) > room:
            old = "…" + old[-(room - 1):]
        return Text.assemble(old, (new, style))


# ------------------------------------------------------------------------- step tracking
@dataclass
class Tracker:
    """Follows a stream: peak shared blocks (sampled every step), live token counts, throughput."""

    engine: object
    peak_shared_blocks: int = 0
    peak_live_sequences: int = 0
    decoded_tokens: int = 0
    steps: int = 0
    started: float = 0.0

    def __post_init__(self):
        self.started = time.perf_counter()
        self._tokens: dict[int, int] = {}  # per request: tokens decoded so far
        self._beam_length: dict[int, int] = {}

    def update(self, snapshots: list[dict]) -> None:
        self.steps += 1
        kv = self.engine.kv_stats()
        self.peak_shared_blocks = max(self.peak_shared_blocks, kv.shared_blocks)
        self.peak_live_sequences = max(self.peak_live_sequences,
                                       sum(len(live_sequences(s)) for s in snapshots))
        for index, snap in enumerate(snapshots):
            if "samples" in snap:  # every sample ever drawn is in the snapshot, running or finished
                self._tokens[index] = sum(len(t) for t, _ in snap["samples"] + snap["finished"])
            elif snap["beams"]:  # every running beam grew by one token per step
                length = len(snap["beams"][0][0])
                grown = length - self._beam_length.get(index, 0)
                self._tokens[index] = self._tokens.get(index, 0) + grown * len(snap["beams"])
                self._beam_length[index] = length
        self.decoded_tokens = sum(self._tokens.values())

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.decoded_tokens / self.elapsed if self.elapsed > 0 else 0.0


def live_sequences(snap: dict) -> list:
    return snap["beams"] if "beams" in snap else snap["samples"]


def snap_progress(snap: dict) -> int:
    """How many tokens the request's longest sequence has."""
    seqs = live_sequences(snap) + snap["finished"]
    return max((len(t) for t, _ in seqs), default=0)


def kv_line(engine) -> Text:
    kv = engine.kv_stats()
    return Text.assemble(
        ("KV cache ", "bold"), f"{kv.blocks_in_use}/{kv.num_blocks} blocks in use · ",
        (f"{kv.shared_blocks} shared", "cyan"), f" · {kv.num_sequences} sequences · ",
        f"{kv.logical_tokens} logical / {kv.physical_tokens} physical tokens",
    )


# ------------------------------------------------------------------------- beam search
class BeamView:
    """Current beams with their scores; which were forked from the same parent this step, which
    continued, which were pruned since the last step, and which finished."""

    def __init__(self, decode: TokenText, prompts: list[str], engine, width: int = 80):
        self.decode = decode
        self.prompts = prompts
        self.engine = engine
        self.width = width
        self.previous: list[list[tuple[list[int], float]] | None] = [None] * len(prompts)

    def render(self, snapshots: list[dict], step: int) -> RenderableType:
        parts: list[RenderableType] = []
        for index, snap in enumerate(snapshots[:MAX_LIVE_REQUESTS]):
            parts.append(self._request(index, snap, step))
        if len(snapshots) > MAX_LIVE_REQUESTS:
            done = sum(s["done"] for s in snapshots[MAX_LIVE_REQUESTS:])
            parts.append(Text(f"… and {len(snapshots) - MAX_LIVE_REQUESTS} more prompts "
                              f"({done} done)", style="dim"))
        parts.append(Text("score: summed log-probs while running, length-penalised once finished · "
                          "⑂ #p ×c: c beams forked from last step's beam p (sharing its blocks) · "
                          "✗ pruned: its blocks were freed", style="dim"))
        parts.append(kv_line(self.engine))
        for index, snap in enumerate(snapshots):
            self.previous[index] = [(list(t), s) for t, s in snap["beams"]] or self.previous[index]
        return Group(*parts)

    def _request(self, index: int, snap: dict, step: int) -> Table:
        previous = self.previous[index] or []
        beams = snap["beams"]
        text_width = max(self.width - 40, 20)
        title = Text.assemble(("beam search", "bold"), f" · step {step} · prompt ",
                              (repr(short(self.prompts[index], 40)), "italic"))
        table = Table(title=title, title_justify="left", expand=False, show_edge=False, pad_edge=False)
        table.add_column("beam", justify="right", min_width=4)
        table.add_column("score", justify="right", min_width=8)
        table.add_column("from", justify="left", min_width=10)
        table.add_column("text (newest token highlighted)", no_wrap=True, overflow="ellipsis",
                         min_width=text_width, max_width=text_width)

        # A beam's parent is the previous step's beam its tokens extend; several children of one
        # parent are forks of it (they share its blocks until they write into them).
        parent_of = []
        for tokens, _ in beams:
            parent = next((p for p, (ptoks, _) in enumerate(previous) if list(tokens[:-1]) == ptoks), None)
            parent_of.append(parent)
        children: dict[int, int] = {}
        for parent in parent_of:
            if parent is not None:
                children[parent] = children.get(parent, 0) + 1
        fork_colour = {p: FORK_STYLES[i % len(FORK_STYLES)]
                       for i, p in enumerate(sorted(p for p, c in children.items() if c > 1))}

        for rank, ((tokens, score), parent) in enumerate(zip(beams, parent_of)):
            if parent is None:
                origin = Text("new" if not previous else "?", style="dim")
            elif parent in fork_colour:
                origin = Text(f"⑂ #{parent + 1} ×{children[parent]}", style=f"bold {fork_colour[parent]}")
            else:
                origin = Text(f"→ #{parent + 1}", style="dim")
            table.add_row(f"#{rank + 1}", f"{score:.3f}", origin, self.decode.tail(tokens, text_width))
        # Beams of the last step with no child now: pruned (or finished, listed below).
        finished_tokens = [list(t) for t, _ in snap["finished"]]
        for p, (ptoks, pscore) in enumerate(previous):
            if p in children or not beams:
                continue
            ended = any(f[:-1] == ptoks or f == ptoks for f in finished_tokens)
            label = Text("✓ ended" if ended else "✗ pruned", style="green" if ended else "red")
            table.add_row(Text(f"#{p + 1}", style="dim"), Text(f"{pscore:.3f}", style="dim"), label,
                          Text(short(self.decode(ptoks), text_width), style="dim strike"))
        for tokens, score in snap["finished"]:
            table.add_row(Text("done", style="green"), Text(f"{score:.3f}", style="green"),
                          Text("✓ finished", style="green"),
                          Text(short(self.decode(tokens), text_width), style="green"))
        return table


# ------------------------------------------------------------------------- sampling
class SampleView:
    """Samples streaming: one row per sample, kept in place across steps (matched by prefix)."""

    def __init__(self, decode: TokenText, prompts: list[str], engine, width: int = 80, title="sampling"):
        self.decode = decode
        self.prompts = prompts
        self.engine = engine
        self.width = width
        self.title = title
        # Per request: rows of [tokens, logprob, finished]
        self.rows: list[list[list]] = [[] for _ in prompts]

    def _follow(self, index: int, snap: dict) -> None:
        rows = self.rows[index]
        current = [(list(t), lp, False) for t, lp in snap["samples"]] + \
                  [(list(t), lp, True) for t, lp in snap["finished"]]
        if not rows:
            self.rows[index] = [[t, lp, f] for t, lp, f in current]
            return
        unmatched = list(range(len(current)))
        for row in rows:
            if row[2]:  # already finished: stays as it is; drop it from the candidates
                match = next((i for i in unmatched if current[i][2] and current[i][0] == row[0]), None)
                if match is not None:
                    unmatched.remove(match)
                continue
            match = next((i for i in unmatched if current[i][0][:len(row[0])] == row[0]
                          and len(current[i][0]) >= len(row[0])), None)
            if match is not None:
                unmatched.remove(match)
                row[:] = [current[match][0], current[match][1], current[match][2]]
        for i in unmatched:
            rows.append([current[i][0], current[i][1], current[i][2]])

    def render(self, snapshots: list[dict], step: int) -> RenderableType:
        parts: list[RenderableType] = []
        for index, snap in enumerate(snapshots):
            self._follow(index, snap)
        for index, _ in enumerate(snapshots[:MAX_LIVE_REQUESTS]):
            parts.append(self._request(index, step))
        if len(snapshots) > MAX_LIVE_REQUESTS:
            done = sum(s["done"] for s in snapshots[MAX_LIVE_REQUESTS:])
            parts.append(Text(f"… and {len(snapshots) - MAX_LIVE_REQUESTS} more prompts "
                              f"({done} done)", style="dim"))
        parts.append(kv_line(self.engine))
        return Group(*parts)

    def _request(self, index: int, step: int) -> Table:
        text_width = max(self.width - 36, 20)
        title = Text.assemble((self.title, "bold"), f" · step {step} · prompt ",
                              (repr(short(self.prompts[index], 40)), "italic"))
        table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        table.add_column("sample", justify="right")
        table.add_column("logprob", justify="right", min_width=8)
        table.add_column("tokens", justify="right")
        table.add_column("", justify="left")
        table.add_column("text (streaming)", no_wrap=True, overflow="ellipsis", min_width=text_width,
                         max_width=text_width)
        for number, (tokens, logprob, finished) in enumerate(self.rows[index], 1):
            status = Text("✓", style="green") if finished else Text("…", style="yellow")
            style = "green" if finished else "bold green"
            table.add_row(f"#{number}", f"{logprob:.2f}", str(len(tokens)), status,
                          self.decode.tail(tokens, text_width, style=style))
        return table


# ------------------------------------------------------------------------- shared-prompt batch
class BatchView:
    """A progress bar over the batch (tokens/s) and one line per request."""

    def __init__(self, decode: TokenText, prompts: list[str], engine, tracker: Tracker,
                 max_new_tokens: int, width: int = 80):
        self.decode = decode
        self.prompts = prompts
        self.engine = engine
        self.tracker = tracker
        self.max_new_tokens = max_new_tokens
        self.width = width
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[requests]} requests done ·"),
            TextColumn("[cyan]{task.fields[tokens]} tokens · {task.fields[rate]:.1f} tok/s"),
            TimeElapsedColumn(),
        )
        # The bar: generated tokens of the longest sequence per request, out of max_new_tokens each.
        self.task = self.progress.add_task("batch", total=len(prompts) * max(max_new_tokens, 1), done=0,
                                           requests=len(prompts), tokens=0, rate=0.0)

    def render(self, snapshots: list[dict], step: int) -> RenderableType:
        done = sum(bool(s["done"]) for s in snapshots)
        steps = sum(self.max_new_tokens if s["done"] else min(snap_progress(s), self.max_new_tokens)
                    for s in snapshots)
        self.progress.update(self.task, completed=steps, done=done, tokens=self.tracker.decoded_tokens,
                             rate=self.tracker.tokens_per_s)
        text_width = max(self.width - 40, 20)
        table = Table(show_edge=False, pad_edge=False, box=None)
        table.add_column("#", justify="right")
        table.add_column("user prompt", max_width=24, no_wrap=True, overflow="ellipsis")
        table.add_column("progress", justify="right")
        table.add_column("best so far", no_wrap=True, overflow="ellipsis", max_width=text_width)
        shown = 8
        for index, snap in enumerate(snapshots[:shown]):
            seqs = sorted(live_sequences(snap) + snap["finished"], key=lambda s: s[1], reverse=True)
            best = seqs[0][0] if seqs else []
            status = Text("✓", style="green") if snap["done"] else \
                Text(f"{snap_progress(snap)}/{self.max_new_tokens}", style="yellow")
            table.add_row(str(index + 1), one_line(self.prompts[index]), status,
                          self.decode.tail(best, text_width) if best else Text("waiting", style="dim"))
        parts: list[RenderableType] = [self.progress, table]
        if len(snapshots) > shown:
            parts.append(Text(f"… and {len(snapshots) - shown} more", style="dim"))
        parts.append(kv_line(self.engine))
        return Group(*parts)


# ------------------------------------------------------------------------- final output
def results_tables(results, prompts: list[str], label: str) -> list[Table]:
    """One table per prompt; several prompts of one sequence each share a single table."""
    if len(results) > 1 and all(len(r.sequences) == 1 for r in results):
        table = _sequence_table(Text.assemble((label, "bold"), f" · {len(results)} prompts"), "prompt")
        for prompt, result in zip(prompts, results):
            _add_sequence(table, Text(short(prompt, 28), style="italic"), result.sequences[0])
        return [table]
    tables = []
    for prompt, result in zip(prompts, results):
        title = Text.assemble((label, "bold"), " · prompt ", (repr(short(prompt, 60)), "italic"),
                              f" ({len(result.prompt_token_ids)} tokens)")
        table = _sequence_table(title, "#")
        for rank, seq in enumerate(result.sequences, 1):
            _add_sequence(table, str(rank), seq)
        tables.append(table)
    return tables


def _sequence_table(title, first: str) -> Table:
    table = Table(title=title, title_justify="left", show_lines=True)
    table.add_column(first, justify="right" if first == "#" else "left", max_width=30)
    table.add_column("score", justify="right")
    table.add_column("logprob", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("finish")
    table.add_column("text", overflow="fold")
    return table


def _add_sequence(table: Table, first, seq) -> None:
    style = {"eos": "green", "stop": "cyan", "length": "yellow"}.get(seq.finish_reason, "")
    text = seq.text if seq.text is not None else " ".join(map(str, seq.token_ids))
    table.add_row(first, f"{seq.score:.4f}", f"{seq.logprob:.3f}", str(len(seq.token_ids)),
                  Text(seq.finish_reason, style=style), marked_newlines(text))


def kv_panel(stats, engine, tracker: Tracker | None, title: str = "KV cache") -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    kv = engine.kv_stats()
    grid.add_row("blocks in use (peak)",
                 f"{stats.peak_blocks_in_use} of {kv.num_blocks} "
                 f"(block size {kv.block_size} tokens, {human_bytes(engine.layout.bytes_per_block)} each)")
    if tracker is not None:
        grid.add_row("shared blocks (peak)",
                      f"{tracker.peak_shared_blocks} (ref count > 1: forks and shared prefixes)")
    saved = stats.kv_memory_saved
    saved_text = Text(f"{saved:.1%} saved", style="bold green") if saved >= 0 else \
        Text(f"{-saved:.1%} more (partial blocks outweigh sharing)", style="yellow")
    grid.add_row("KV bytes (peak)",
                 Text.assemble(f"{human_bytes(stats.peak_kv_bytes)} paged vs "
                               f"{human_bytes(stats.peak_contiguous_kv_bytes)} contiguous: ", saved_text))
    reused = stats.prefill_tokens_reused
    grid.add_row("prefill tokens",
                 Text.assemble(f"{stats.prompt_tokens} prompt tokens: "
                               f"{stats.prefill_tokens_computed} computed, ",
                               (f"{reused} reused", "bold green" if reused else "")))
    rate = stats.generated_tokens / stats.wall_time_s if stats.wall_time_s > 0 else 0.0
    grid.add_row("decoding",
                 f"{stats.decode_steps} steps · {stats.generated_tokens} tokens returned · "
                 f"{stats.wall_time_s:.2f} s ({rate:.1f} returned tok/s)"
                 + (f" · {stats.preemptions} preemptions" if stats.preemptions else ""))
    return Panel(grid, title=title, title_align="left", expand=False)
