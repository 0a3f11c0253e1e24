"""Send many requests at once with the async openai client; the server batches them continuously.

python examples/async_client.py
"""

from __future__ import annotations

import asyncio
import time

from _common import API_KEY, BASE_URL, client, model_name
from openai import AsyncOpenAI

PROMPTS = [
    "Copy the list: a b c d e f g h i j k l m n o p",
    "Upper-case the list: q w e r t y u i o p a s d f",
    "Add one to each digit: 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0",
    "Replace each letter by the next one: a b c d e f g h i j k l",
] * 4


async def ask(c: AsyncOpenAI, model: str, prompt: str) -> str:
    r = await c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=48
    )
    return r.choices[0].message.content or ""


async def main() -> None:
    model = model_name(client())
    async with AsyncOpenAI(base_url=BASE_URL, api_key=API_KEY) as c:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(ask(c, model, p) for p in PROMPTS))
        elapsed = time.perf_counter() - t0
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        print(f"{prompt}\n  -> {answer}")
    print(f"{len(PROMPTS)} requests in {elapsed:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
