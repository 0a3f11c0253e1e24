"""Grammars for constrained generation (JSON schema, any JSON object, regex, choice, tool calls).

The grammar engine is llguidance (benchmarks/grammar_engines.md says why): a grammar is compiled
once per request, on the server's preparation threads, into a matcher; each choice gets its own
copy (``Grammar.row``), which the engine thread advances as the row's left-to-right frontier grows
(engine/constrained.py).

The closing search (``closing_tokens``) is what lets the commit rule promise an output that fits
the canvas: from any matcher state it finds a short token sequence that completes the grammar,
preferring tokens that close something (``}`` ``]`` ``"``). Its length bounds how many positions a
row must keep free; it is deterministic, so following it from a state always finishes in exactly
the length it reported.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, cast

import llguidance
import llguidance.hf
import numpy as np

from dllm_serve.models.tokenizer import ChatTokenizer

# Compact JSON (no optional whitespace, "," and ":" separators): fewest tokens on a short canvas.
JSON_OPTIONS: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions
CLOSERS = ("}", "]", '"', ",", ":")


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile; the message names the problem."""


@dataclass(frozen=True)
class GrammarVocab:
    """The model's tokenizer as the grammar engine sees it, plus the closing search's preferences."""

    tokenizer: llguidance.LLTokenizer
    size: int
    stop_ids: tuple[int, ...]
    closers: tuple[int, ...]  # single-token ids of CLOSERS, in that order
    quote: int | None  # the single-token id of '"'
    order: np.ndarray  # every token id: ordinary before special, then shorter text, then lower id
    kind: np.ndarray  # per token id, its first byte's class (digit, lower, upper, space, other, non-ASCII)
    singles: np.ndarray  # ids of the single-ASCII-character tokens, by id

    def unpack(self, words: np.ndarray) -> np.ndarray:
        """A bitmask (32-bit words) as one bool per token id."""
        return np.unpackbits(words.view(np.uint8), bitorder="little")[: self.size].astype(bool)


@functools.lru_cache(maxsize=4)
def vocab_for(tokenizer: ChatTokenizer, stop_ids: tuple[int, ...]) -> GrammarVocab:
    """Built once per loaded tokenizer (about a second for a 100k-token vocabulary)."""
    hf = tokenizer.hf
    size = len(hf)
    lt = llguidance.hf.from_tokenizer(cast(Any, hf), n_vocab=size, eos_token=stop_ids[0])
    texts = [lt.decode_bytes([i]) for i in range(size)]
    closers = tuple(texts.index(c.encode()) for c in CLOSERS if c.encode() in texts)
    special = set(hf.all_special_ids) | set(stop_ids)
    order = np.array(sorted(range(size), key=lambda i: (i in special, len(texts[i]) or 1 << 20, i)))
    kind = np.array([_byte_class(t[:1]) for t in texts], dtype=np.int64)
    quote = texts.index(b'"') if b'"' in texts else None
    singles = np.array([i for i, t in enumerate(texts) if len(t) == 1 and t[0] < 128 and i not in special])
    return GrammarVocab(lt, size, tuple(stop_ids), closers, quote, order, kind, singles.astype(np.int64))


def _byte_class(first: bytes) -> int:
    if not first:
        return 5
    c = chr(first[0])
    if c.isdigit():
        return 0
    if c.islower():
        return 1
    if c.isupper():
        return 2
    if c.isspace():
        return 3
    return 4 if first[0] < 128 else 5


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint. ``kind`` names it; ``min_tokens`` is the length of the closing
    search's output from the start plus one position for the stop token (None when the search
    finds no completion within its limit)."""

    kind: str
    vocab: GrammarVocab
    matcher: llguidance.LLMatcher
    closing: tuple[int, ...] | None  # the closing search's output from the start

    @property
    def min_tokens(self) -> int | None:
        return None if self.closing is None else len(self.closing) + 1

    def row(self) -> RowMatcher:
        """A fresh matcher for one choice."""
        return RowMatcher(self.matcher.deep_copy(), self.vocab)


def _compile(kind: str, grammar: str, vocab: GrammarVocab, limit: int) -> Grammar:
    error = llguidance.LLMatcher.validate_grammar(grammar, vocab.tokenizer)
    if error:
        raise GrammarError(error.strip())
    matcher = llguidance.LLMatcher(vocab.tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    close = RowMatcher(matcher.deep_copy(), vocab).closing_tokens(limit)
    return Grammar(kind, vocab, matcher, None if close is None else tuple(close))


def json_schema(schema: Any, vocab: GrammarVocab, limit: int) -> Grammar:
    """Output that parses as JSON and validates against ``schema``."""
    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise GrammarError("the schema must be a JSON object")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None
    return _compile("json_schema", grammar, vocab, limit)


def json_object(vocab: GrammarVocab, limit: int) -> Grammar:
    """Any JSON object (OpenAI's ``{"type": "json_object"}``)."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    return _compile("json_object", grammar, vocab, limit)


def regex(pattern: str, vocab: GrammarVocab, limit: int) -> Grammar:
    """Output that matches ``pattern`` in full."""
    return _compile("regex", llguidance.LLMatcher.grammar_from_regex(pattern), vocab, limit)


def choice(options: list[str], vocab: GrammarVocab, limit: int) -> Grammar:
    """Output that is exactly one of ``options``."""
    if not options:
        raise GrammarError("the list of choices is empty")
    alternatives = " | ".join(json.dumps(o) for o in options)
    return lark("choice", f"start: {alternatives}\n", vocab, limit)


def lark(kind: str, text: str, vocab: GrammarVocab, limit: int) -> Grammar:
    """A Lark grammar (llguidance's dialect, with ``%json {schema}`` for embedded JSON)."""
    return _compile(kind, llguidance.LLMatcher.grammar_from_lark(text), vocab, limit)


class RowMatcher:
    """One row's grammar state: the tokens consumed so far, the allowed set after them, and the
    closing search. Host-only; lives on the engine thread once the request is submitted.

    Alongside the matcher it tracks whether the text so far ends inside a JSON string (unescaped
    quotes), which the closing search needs: there ``"`` closes, elsewhere it opens.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab: GrammarVocab) -> None:
        self.m = matcher
        self.vocab = vocab
        self._quoting = [(False, False)]  # (inside a string, after a backslash) after each token

    def accepting(self) -> bool:
        return self.m.is_accepting()

    def allowed_words(self) -> np.ndarray:
        """The allowed set for the next token as 32-bit bitmask words (bit i of word w: token
        32 w + i); the stop tokens are allowed exactly when the grammar is complete."""
        words = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint32).copy()
        accepting = self.m.is_accepting()
        for t in self.vocab.stop_ids:
            bit = np.uint32(1 << (t % 32))
            words[t // 32] = (words[t // 32] | bit) if accepting else (words[t // 32] & ~bit)
        return words

    def consume(self, token: int) -> bool:
        """Consume ``token`` if the grammar allows it (a refused token leaves the state unchanged)."""
        if token in self.vocab.stop_ids or self.m.is_stopped():
            return False
        if self.m.try_consume_tokens([token]) != 1:
            return False
        inside, escaped = self._quoting[-1]
        for byte in self.vocab.tokenizer.decode_bytes([token]):
            if escaped:
                escaped = False
            elif byte == 0x5C and inside:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                inside = not inside
        self._quoting.append((inside, escaped))
        return True

    def rollback(self, n: int) -> None:
        if n:
            self.m.rollback(n)
            del self._quoting[-n:]

    def completes(self, tokens: list[int]) -> bool:
        """Whether ``tokens`` complete the grammar from here (the state is left unchanged)."""
        n = self.m.try_consume_tokens(tokens) if tokens else 0
        done = n == len(tokens) and self.m.is_accepting()
        if n:
            self.m.rollback(n)
        return done

    def closing_tokens(self, limit: int) -> list[int] | None:
        """A token sequence that completes the grammar from here (empty when already complete), at
        most ``limit`` long, or None. The state is left unchanged."""
        taken: list[int] = []
        seen: set[bytes] = set()
        try:
            while not self.m.is_accepting():
                if len(taken) >= limit or self.m.is_stopped():
                    return None
                token = self._closing_step(seen)
                if token is None:
                    return None
                taken.append(token)
            return taken
        finally:
            self.rollback(len(taken))

    def _closing_step(self, seen: set[bytes]) -> int | None:
        """Consume and return the next closing token.

        Candidates: the allowed closers (``"`` first inside a string, ``}`` ``]`` first outside),
        the most preferred allowed token of each ASCII byte class (digit, letter, space ...), then
        every allowed single ASCII character. Taken, in order of preference: a candidate that
        completes the grammar at once; else the first that leads to an allowed set not met before
        in this search (it leaves a repetition such as a string's characters or ``\\d+``); else the
        first that changes the allowed set; else the most preferred allowed token of all.
        """
        current = self.m.compute_bitmask()
        seen.add(current)
        allowed = self.vocab.unpack(np.frombuffer(current, dtype=np.uint32))
        for t in self.vocab.stop_ids:
            allowed[t] = False
        ranked = self.vocab.order[allowed[self.vocab.order]]
        if not len(ranked):
            return None
        candidates = [t for t in self.vocab.closers if allowed[t]]
        if self._quoting[-1][0] and self.vocab.quote in candidates:
            candidates.remove(self.vocab.quote)
            candidates.insert(0, self.vocab.quote)
        kinds = self.vocab.kind[ranked]
        ascii_ranked = ranked[kinds < 5]
        _, first = np.unique(kinds[kinds < 5], return_index=True)
        singles = self.vocab.singles[allowed[self.vocab.singles]]
        for t in [*(ascii_ranked[i] for i in sorted(first)), *singles]:
            if int(t) not in candidates:
                candidates.append(int(t))
        for t in candidates:
            if self.consume(t):
                if self.m.is_accepting():
                    return t
                self.rollback(1)
        changes = None
        for t in candidates:
            if self.consume(t):
                after = self.m.compute_bitmask()
                if after not in seen:
                    return t
                self.rollback(1)
                if changes is None and after != current:
                    changes = t
        fallback = changes if changes is not None else int(ranked[0])
        return fallback if self.consume(fallback) else None
