"""Chat with a dllm-serve server through the official openai client.

Shows a plain chat request, streaming, choosing the decoding algorithm and its parameters per request
(`extra_body`), and how to read the `diffusion` object that says how much model work an answer took -
here used to compare two presets on the same prompt.

    python examples/chat.py
"""

from __future__ import annotations

from _common import client, model_name

PROMPT = "Copy the list: d i f f u s i o n s e r v e r s"


def main() -> None:
    c = client()
    model = model_name(c)

    # 1. A plain request: the server's default algorithm and parameters.
    reply = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=32
    )
    print("reply:   ", reply.choices[0].message.content)

    # 2. Streaming: committed text arrives as soon as the sampler fixes it, left to right.
    stream = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=32, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    print("streamed:", "".join(pieces), f"({len(pieces)} chunks)")

    # 3. Per-request algorithm and diffusion knobs are extra body fields. The answer carries a
    #    `diffusion` object (forwards, tokens per forward) next to the usual fields.
    for algorithm, knobs in [
        ("llada", {"steps": 32, "block_length": 32}),  # reference sampler: one token per step
        ("dual_cache", {"threshold": 0.9, "block_length": 32}),  # Fast-dLLM: cache + parallel commits
    ]:
        r = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=32,
            extra_body={"algorithm": algorithm, **knobs},
        )
        work = r.model_extra["diffusion"]
        print(
            f"{algorithm:>10}: {r.choices[0].message.content!r}  "
            f"forwards={work['forwards']} tokens/forward={work['tokens_per_forward']}"
        )


if __name__ == "__main__":
    main()
