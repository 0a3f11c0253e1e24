"""A request's output constraint: ``response_format``, ``guided_*`` or a forced tool call, compiled.

One constraint at a time: a request that sends two is a 400. A constraint that cannot be compiled
(a bad schema, regex or grammar) is a 400 whose message is the grammar engine's, naming the
problem; so is a ``max_tokens`` too small for the shortest valid output (the commit rule's
guarantee needs room to close, engine/constrained.py).
"""

from __future__ import annotations

from typing import Any

from dllm_serve.engine import grammar
from dllm_serve.engine.constrained import RowConstraint
from dllm_serve.server import tools
from dllm_serve.server.errors import bad_request


def compile_constraint(engine: Any, req: Any, max_tokens: int) -> grammar.Grammar | None:
    """The request's grammar, or None when its output is free text. Runs on a preparation thread."""
    sources = _sources(req)
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(param for param, _ in sources)
        raise bad_request(f"Send one output constraint, not several ({names}).", sources[1][0])
    param, build = sources[0]
    runner = getattr(engine, "runner", None)
    if runner is None:
        raise bad_request(f"{param} needs the native engine (not --trust-remote-code).", param)
    vocab = grammar.vocab_for(engine.loaded.tokenizer, runner.stop_ids)
    try:
        compiled = build(vocab, max_tokens)
    except grammar.GrammarError as exc:
        raise bad_request(f"Invalid {param}: {exc}", param, "invalid_value") from None
    if compiled.min_tokens is None or compiled.min_tokens > max_tokens:
        need = "more than max_tokens" if compiled.min_tokens is None else f"{compiled.min_tokens} tokens"
        raise bad_request(
            f"max_tokens {max_tokens} is too small for {param}: its shortest valid output takes {need} "
            "(with the end-of-text token); raise max_tokens.",
            "max_tokens",
            "invalid_value",
        )
    return compiled


def row(compiled: grammar.Grammar | None) -> RowConstraint | None:
    """One choice's constraint state (each choice advances its own matcher)."""
    return None if compiled is None else RowConstraint(compiled.row(), compiled.closing)


def _sources(req: Any) -> list[tuple[str, Any]]:
    """(param, builder) for each constraint the request sets."""
    out: list[tuple[str, Any]] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        out.append(("response_format", grammar.json_object))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_
        out.append(("response_format", lambda v, n: grammar.json_schema(schema, v, n)))
    if getattr(req, "guided_json", None) is not None:
        out.append(("guided_json", lambda v, n: grammar.json_schema(req.guided_json, v, n)))
    if getattr(req, "guided_regex", None) is not None:
        out.append(("guided_regex", lambda v, n: grammar.regex(req.guided_regex, v, n)))
    if getattr(req, "guided_choice", None) is not None:
        out.append(("guided_choice", lambda v, n: grammar.choice(req.guided_choice, v, n)))
    forced = tools.forced_calls(req)
    if forced is not None:
        out.append(("tool_choice", lambda v, n: grammar.lark("tool_calls", forced, v, n)))
    return out
