"""Grammar engines on this server's workload: compile time and per-token mask time.

The workload: a JSON schema compiled per request, then one token mask per frontier step, plus one
token consumed (the diffusion commit rule also consumes and rolls back while it checks a row can
still close, see docs/structured-output.md). Measured with the bundled tiny tokenizer (384 ids) and
with a synthetic 32k byte-level vocabulary built from it (pairs of the tiny tokens), so the scaling
with vocabulary size shows too.

    OMP_NUM_THREADS=1 python benchmarks/grammar_engines.py > benchmarks/grammar_engines.jsonl

Engines not installed are reported as missing (only llguidance is a dependency of dllm-serve; the
others were installed into a side directory for the measurement: PYTHONPATH=/tmp/gcand).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}},
                },
                "required": ["id", "tags"],
                "additionalProperties": False,
            },
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        },
        "required": ["user", "code"],
        "additionalProperties": False,
    },
}
DOCS = {
    "flat": '{"name":"bob","age":42}',
    "nested": '{"user":{"id":7,"tags":["red","blue","green","red"]},"code":"ABC-12"}',
}


def _median_us(values: list[float]) -> float:
    return round(statistics.median(values) * 1e6, 2)


def bench_llguidance(tok, vocab: int) -> dict:
    import llguidance
    import llguidance.hf

    t0 = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=tok.eos_token_id)
    setup = time.perf_counter() - t0
    out = {"engine": "llguidance", "version": version("llguidance"), "tokenizer_setup_s": round(setup, 4)}
    for name, schema in SCHEMAS.items():
        ids = tok.encode(DOCS[name], add_special_tokens=False)
        compiles, masks = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
            m = llguidance.LLMatcher(lt, grammar)
            compiles.append(time.perf_counter() - t0)
            for t in ids:
                t0 = time.perf_counter()
                m.compute_bitmask()
                masks.append(time.perf_counter() - t0)
                assert m.consume_token(t), m.get_error()
        out[name] = {"compile_us": _median_us(compiles), "mask_us_per_token": _median_us(masks)}
    return out


def bench_xgrammar(tok, vocab: int) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    setup = time.perf_counter() - t0
    out = {"engine": "xgrammar", "version": version("xgrammar"), "tokenizer_setup_s": round(setup, 4)}
    for name, schema in SCHEMAS.items():
        ids = tok.encode(DOCS[name], add_special_tokens=False)
        compiles, masks = [], []
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        for _ in range(20):
            compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            t0 = time.perf_counter()
            compiled = compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(",", ":")
            )
            m = xgr.GrammarMatcher(compiled)
            compiles.append(time.perf_counter() - t0)
            for t in ids:
                t0 = time.perf_counter()
                m.fill_next_token_bitmask(bitmask)
                masks.append(time.perf_counter() - t0)
                assert m.accept_token(t)
        out[name] = {"compile_us": _median_us(compiles), "mask_us_per_token": _median_us(masks)}
    return out


def bench_outlines_core(tok, vocab: int) -> dict:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    words: dict[str, list[int]] = {}
    for token, i in tok.get_vocab().items():
        if i < vocab and i != tok.eos_token_id and i not in tok.all_special_ids:
            words.setdefault(tok.convert_tokens_to_string([token]), []).append(i)
    voc = outlines_core.Vocabulary(tok.eos_token_id, words)
    setup = time.perf_counter() - t0
    out = {
        "engine": "outlines-core",
        "version": version("outlines-core"),
        "tokenizer_setup_s": round(setup, 4),
    }
    for name, schema in SCHEMAS.items():
        ids = tok.encode(DOCS[name], add_special_tokens=False)
        compiles, masks = [], []
        for _ in range(3):  # each compile walks the whole vocabulary over the regex's automaton
            t0 = time.perf_counter()
            regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
            guide = outlines_core.Guide(outlines_core.Index(regex, voc))
            compiles.append(time.perf_counter() - t0)
            for t in ids:
                t0 = time.perf_counter()
                guide.get_tokens()
                masks.append(time.perf_counter() - t0)
                guide.advance(t)
        out[name] = {"compile_us": _median_us(compiles), "mask_us_per_token": _median_us(masks)}
    return out


def widened(tok):
    """The tiny tokenizer with ~32k extra merged tokens (pairs of its tokens), for scale."""
    from tokenizers import Tokenizer

    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    base = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 6][:181]
    merges = []
    for a in base:
        for b in base:
            if len(vocab) >= 32768:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append([a, b])
    data["model"]["merges"] = data["model"]["merges"] + merges
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token=tok.eos_token,
        bos_token=tok.bos_token,
    )


def main() -> None:
    tiny = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llada")
    for label, tok in (("tiny-384", tiny), ("synthetic-32k", widened(tiny))):
        vocab = len(tok)
        for bench in (bench_llguidance, bench_xgrammar, bench_outlines_core):
            try:
                result = bench(tok, vocab)
            except ImportError as exc:
                result = {"engine": bench.__name__[6:], "missing": str(exc)}
            except Exception as exc:  # an engine that cannot take this tokenizer: say so
                result = {"engine": bench.__name__[6:], "error": f"{type(exc).__name__}: {exc}"[:300]}
            print(json.dumps({"vocab": label, "size": vocab, **result}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
