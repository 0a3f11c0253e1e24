"""Use a dllm-serve server from LangChain through its OpenAI chat model (`pip install langchain-openai`).

Diffusion parameters travel in `extra_body`, exactly as with the openai client.

    python examples/langchain_chat.py
"""

from __future__ import annotations

from _common import API_KEY, BASE_URL, client, model_name
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI


def main() -> None:
    llm = ChatOpenAI(
        base_url=BASE_URL,
        api_key=API_KEY,
        model=model_name(client()),
        max_tokens=32,
        temperature=0,
        extra_body={"algorithm": "dual_cache", "threshold": 0.9},
    )
    reply = llm.invoke([HumanMessage("Replace each letter by the next one: l a n g c h a i n a b c")])
    print("invoke:", reply.content)
    streamed = "".join(
        chunk.content for chunk in llm.stream("Copy the list: c h a i n s o f t o k e n s o k")
    )
    print("stream:", streamed)


if __name__ == "__main__":
    main()
