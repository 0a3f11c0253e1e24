"""Structured output and tool calls end to end, driven by real clients: the openai SDK's
``.parse()`` with pydantic models, LangChain's ``with_structured_output`` and ``bind_tools`` (a tool
loop: call, tool result, final answer) and litellm as an OpenAI-compatible provider, against one
real server with the trained tiny-llada. The tiny model knows no JSON: every valid output here is
the constraint's work."""

from __future__ import annotations

import json
import os
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.structured_schemas import INVALID, SCHEMAS

MODEL = "tiny-llada"


class Address(BaseModel):
    city: str
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(pattern=r"^[A-Z][a-z]+$")
    age: int = Field(ge=0, le=120)
    color: Literal["red", "green", "blue"]
    nick: str | None = None
    address: Address
    tags: list[Literal["a", "b"]]


class Weather(BaseModel):
    """Get the weather for a city."""

    city: str
    unit: Literal["c", "f"]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_openai_parse_with_pydantic(client, temperature):
    for seed in range(3):
        out = client.chat.completions.parse(
            model=MODEL,
            messages=_user("Describe a person."),
            response_format=Person,
            temperature=temperature,
            seed=seed,
            max_tokens=160,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person), choice.message.content


def test_every_schema_through_the_api(client):
    """Each schema as response_format json_schema (strict) at temperature 1: output validates."""
    for name, schema in SCHEMAS.items():
        out = client.chat.completions.create(
            model=MODEL,
            messages=_user("Answer in JSON."),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            },
            temperature=1.0,
            seed=1,
            max_tokens=96,
        )
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_json_object_streamed_and_n(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_user("JSON please"),
        response_format={"type": "json_object"},
        stream=True,
        n=2,
        temperature=1.0,
    )
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert all(isinstance(json.loads(t), dict) for t in texts)


def test_guided_regex_and_choice_on_completions(client):
    out = client.completions.create(
        model=MODEL,
        prompt="Apples:",
        max_tokens=24,
        temperature=1.0,
        extra_body={"guided_regex": r"[0-9]{1,3} apples"},
    )
    assert out.choices[0].text.endswith(" apples") and out.choices[0].text.split()[0].isdigit()
    out = client.completions.create(
        model=MODEL, prompt="Pick", n=4, temperature=1.0, extra_body={"guided_choice": ["yes", "no", "maybe"]}
    )
    assert {c.text for c in out.choices} <= {"yes", "no", "maybe"}


@pytest.mark.parametrize(("case", "schema_and_word"), list(INVALID.items()))
def test_invalid_schema_is_a_400_naming_the_problem(client, case, schema_and_word):
    schema, word = schema_and_word
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=_user("x"),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert word in err.value.message and err.value.body["param"] == "response_format"


def test_other_constraint_errors(server, client):
    with pytest.raises(openai.BadRequestError, match="too small"):
        client.chat.completions.parse(model=MODEL, messages=_user("x"), response_format=Person, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="one output constraint"):
        client.chat.completions.create(
            model=MODEL,
            messages=_user("x"),
            response_format={"type": "json_object"},
            extra_body={"guided_regex": "a+"},
        )
    with pytest.raises(openai.BadRequestError, match=r"json_schema\.schema"):
        client.chat.completions.create(
            model=MODEL, messages=_user("x"), response_format={"type": "json_schema"}
        )
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model=MODEL,
            messages=_user("x"),
            tools=[openai.pydantic_function_tool(Weather)],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_required_tool_call_streams_like_openai(client):
    tools = [
        openai.pydantic_function_tool(Weather, name="get_weather"),
        openai.pydantic_function_tool(Address),
    ]
    out = client.chat.completions.create(
        model=MODEL,
        messages=_user("Weather in Paris?"),
        tools=tools,
        tool_choice="required",
        temperature=1.0,
        seed=2,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        params = next(
            t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name
        )
        jsonschema.validate(json.loads(call.function.arguments), params)
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(
        model=MODEL, messages=_user("Weather in Oslo?"), tools=tools, tool_choice=named, temperature=1.0
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.parsed_arguments, Weather)
    assert final.choices[0].finish_reason == "tool_calls"


def test_a_streamed_tool_call_sends_no_empty_chunks(client):
    """While a call's text is held back (it goes out whole), no chunk with an empty delta is sent."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_user("Weather in Rome?"),
        tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
        tool_choice=named,
        temperature=0,
        stream=True,
    )
    choices = [c.choices[0] for c in stream if c.choices]
    assert choices[0].delta.role == "assistant"
    later = choices[1:]
    assert all(c.delta.content or c.delta.tool_calls or c.finish_reason for c in later), later
    assert sum(len(c.delta.tool_calls or []) for c in later) == 1
    assert choices[-1].finish_reason == "tool_calls"


def test_tool_turns_in_history(client):
    """An assistant turn with tool_calls and a tool turn answering it are accepted."""
    history = [
        *_user("Weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    tools = [openai.pydantic_function_tool(Weather, name="get_weather")]
    out = client.chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=16)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    out = client.chat.completions.create(
        model=MODEL, messages=history, tools=tools, tool_choice="none", max_tokens=16
    )
    assert out.choices[0].message.tool_calls is None


def test_langchain_structured_output_and_tool_loop(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=server.v1, api_key="unused", temperature=1.0, max_tokens=160, max_retries=0
    )
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Describe a person.")
        assert isinstance(person, Person)

    @tool
    def get_weather(city: str, unit: Literal["c", "f"]) -> str:
        """Get the weather for a city."""
        return f"21 degrees {unit} in {city}"

    messages = [HumanMessage("What is the weather in Paris?")]
    ai = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    messages.append(ai)
    for call in ai.tool_calls:
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    final = llm.bind_tools([get_weather], tool_choice="none").invoke(messages)
    assert isinstance(final.content, str) and not final.tool_calls


def test_litellm_as_an_openai_compatible_provider(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    common = {"model": f"openai/{MODEL}", "api_base": server.v1, "api_key": "unused", "max_tokens": 160}
    out = litellm.completion(
        messages=_user("Describe a person."), response_format=Person, temperature=1.0, **common
    )
    Person.model_validate_json(out.choices[0].message.content)
    tools = [openai.pydantic_function_tool(Weather, name="get_weather")]
    out = litellm.completion(
        messages=_user("Weather in Rome?"), tools=tools, tool_choice="required", **common
    )
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    Weather.model_validate_json(call.function.arguments)
