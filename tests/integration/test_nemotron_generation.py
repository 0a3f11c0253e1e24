"""Nemotron diffusion end to end: the ``nemotron`` preset, the bundled tiny-nemotron, the API and
the remote-code path.

- The engine's cached block decoding (committed-context KV cache) produces exactly the tokens of
  an uncached decoder written here, which recomputes the whole committed context every step.
- The checkpoint's ``block_size`` is the default ``block_length`` everywhere (request > checkpoint >
  preset).
- tiny-nemotron reaches >= 95 % exact match on 200 held-out prompts with the nemotron preset, at any
  max_tokens up to 512; on the dependent suite one token per step reaches >= 80 %, and threshold
  0.5 pays for its extra tokens per forward with accuracy.
- A real server gives the openai client, streamed or not, exactly the offline engine's answer;
  LLaDA-only presets are 400s in OpenAI's error shape listing the valid names.
- ``--trust-remote-code``: a checkpoint that ships its own modeling file is loaded by transformers
  and served through its own ``generate`` (kwargs filtered by its signature, nfe reported as the
  forwards); without the flag it is refused with an error that names the flag.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file

from dllm_serve.bench.tasks import heldout_examples
from dllm_serve.commands import evaluate
from dllm_serve.config import EngineConfig
from dllm_serve.engine.engine import Engine, build_engine
from dllm_serve.engine.remote import RemoteEngine
from dllm_serve.engine.sequence import GenerationRequest, SequenceEvent
from dllm_serve.models import remote_code
from dllm_serve.models.loader import load_model
from dllm_serve.models.tokenizer import ChatTokenizer
from tests.nemotron_helpers import TINY_NEMOTRON, TOKENIZER_FILES


@pytest.fixture(scope="module")
def loaded():
    return load_model(TINY_NEMOTRON)


def chat(tok, text: str) -> list[int]:
    return tok.render_chat([{"role": "user", "content": text}])


def copy_checkpoint(dst: Path, **config_changes) -> Path:
    """tiny-nemotron under another directory, with config.json keys changed."""
    shutil.copytree(TINY_NEMOTRON, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# -- cached decoding equals uncached recomputation ---------------------------------------------


def uncached_decode(model, prompt: list[int], params, mask_id: int) -> list[int]:
    """Block diffusion with threshold commits, re-forwarding prompt + every committed block each
    step with block-causal attention (the prompt in blocks of block_length from position 0, its
    last, partial block seeing the whole prompt; then blocks of block_length from the prompt's
    end); the active block sees everything before it and itself."""
    bl, p_len = params.block_length, len(prompt)
    canvas = torch.tensor(prompt + [mask_id] * params.gen_length)
    steps_per_block = params.steps // params.num_blocks
    prompt_limits = [min(p_len, (i // bl + 1) * bl) for i in range(p_len)]
    for blk in range(params.num_blocks):
        start, end = p_len + blk * bl, p_len + (blk + 1) * bl
        limits = torch.tensor(prompt_limits + [p_len + (i // bl + 1) * bl for i in range(end - p_len)])
        mask = torch.arange(end)[None, :] < limits[:, None]
        for step in range(steps_per_block):
            block = canvas[start:end]
            masked = block == mask_id
            if not masked.any():
                break
            logits = model(canvas[None, :end], torch.arange(end)[None], mask[None])[0, start:end].float()
            conf, tokens = logits.softmax(-1).max(-1)
            conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
            floor = -(-int(masked.sum()) // (steps_per_block - step))  # linear share of the steps left
            order = torch.sort(conf, descending=True, stable=True).indices
            commit = torch.zeros_like(masked)
            commit[order[:floor]] = True
            commit |= (conf >= params.threshold) & masked
            block[commit] = tokens[commit]
    return canvas[p_len:].tolist()


def test_cached_block_decoding_equals_uncached_recomputation(loaded):
    """Six prompts of different lengths in one batch, each row with its own block length,
    threshold and step budget."""
    tok = loaded.tokenizer
    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    stop_ids = set(engine.runner.stop_ids)
    requests, expected = [], {}
    settings = [(8, 0.9, 48), (32, 0.5, 32), (16, 0.3, 24), (8, 0.6, 24), (32, 0.9, 64), (16, 0.9, 48)]
    for i, (ex, (block, threshold, steps)) in enumerate(zip(heldout_examples(6), settings, strict=True)):
        overrides = {"block_length": block, "threshold": threshold, "steps": steps, "seed": 0}
        params = engine.resolve_params(48, overrides)
        req = GenerationRequest(f"r{i}", chat(tok, ex.prompt), params, 48)
        requests.append(req)
        full = uncached_decode(loaded.model, req.prompt_ids, params, loaded.model.roles.mask_token_id)
        stop = next((j for j, t in enumerate(full) if t in stop_ids), None)
        expected[req.request_id] = full[:stop] if stop is not None else full[:48]
    assert len({len(r.prompt_ids) for r in requests}) > 1
    results = engine.run_to_completion(requests)
    for req in requests:
        got = results[req.request_id]
        assert got.token_ids == expected[req.request_id], req.request_id
        assert len(got.token_ids) >= 4 and got.finish_reason in ("stop", "length")


def test_checkpoint_block_size_is_the_default_and_requests_override_it(tmp_path):
    engine = Engine(load_model(copy_checkpoint(tmp_path / "m", block_size=16, shift_logits=True)))
    params = engine.resolve_params(40)
    assert (params.algorithm, params.block_length, params.gen_length) == ("nemotron", 16, 48)
    assert params.shift_logits is True and params.threshold == 0.9  # checkpoint, then preset default
    override = engine.resolve_params(40, {"block_length": 8, "shift_logits": False})
    assert (override.block_length, override.shift_logits) == (8, False)


# -- accuracy bar -------------------------------------------------------------------------------


def test_tiny_nemotron_accuracy_with_the_nemotron_preset(loaded):
    engine = Engine(loaded, EngineConfig(max_batch_size=64))
    assert engine.default_algorithm == "nemotron"  # --engine auto picks nemotron for this family
    report = evaluate(engine, "nemotron", 200, 64, {})
    assert report["num_prompts"] == 200
    assert report["accuracy"] >= 95.0, report
    assert report["params"]["cache"] == "committed" and report["params"]["rule"] == "threshold"
    assert report["tokens_per_forward"] > 1.0, report  # threshold decoding commits several per forward


@pytest.mark.parametrize("max_tokens", [256, 512])
def test_tiny_nemotron_accuracy_at_long_canvases(loaded, max_tokens):
    report = evaluate(Engine(loaded, EngineConfig(max_batch_size=64)), "nemotron", 200, max_tokens, {})
    assert report["accuracy"] >= 95.0, report


def test_tiny_nemotron_on_the_dependent_suite(loaded):
    """One token per step (threshold 1.0: only certain tokens beyond the schedule's one) against
    threshold 0.5, which commits both cases of the letters in one forward (docs/tasks.md)."""

    def run(threshold: float) -> dict:
        engine = Engine(loaded, EngineConfig(max_batch_size=64))
        return evaluate(engine, "nemotron", 100, 32, {"threshold": threshold}, "dependent")

    careful, greedy = run(1.0), run(0.5)
    assert careful["accuracy"] >= 80.0, careful
    assert greedy["accuracy"] <= careful["accuracy"] - 30.0, (greedy, careful)
    assert greedy["tokens_per_forward"] > careful["tokens_per_forward"]


# -- the OpenAI API -----------------------------------------------------------------------------

SERVED_BLOCK = 16  # the served copy's block_size, so the server must apply the checkpoint default


@pytest.fixture(scope="module")
def served_path(tmp_path_factory):
    return copy_checkpoint(tmp_path_factory.mktemp("served") / "tiny-nemotron", block_size=SERVED_BLOCK)


@pytest.fixture(scope="module")
def server(server_factory, served_path):
    return server_factory("--model-path", str(served_path))


def test_chat_completions_streamed_or_not_equal_the_offline_engine(server, served_path):
    loaded = load_model(served_path)
    tok = loaded.tokenizer
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    examples = heldout_examples(3, seed=11)
    params = engine.resolve_params(48, {"block_length": SERVED_BLOCK, "seed": 0})
    requests = [GenerationRequest(f"q{i}", chat(tok, ex.prompt), params, 48) for i, ex in enumerate(examples)]
    offline = engine.run_to_completion(requests)

    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    assert client.models.list().data[0].id == "tiny-nemotron"
    assert httpx.get(server.v1 + "/algorithms").json()["default"] == "nemotron"
    for ex, req in zip(examples, requests, strict=True):
        want = offline[req.request_id]
        text = tok.decode(want.token_ids)
        tokens = len(want.token_ids) + int(want.stopped_on_token)
        messages = [{"role": "user", "content": ex.prompt}]
        reply = client.chat.completions.create(
            model="tiny-nemotron", messages=messages, max_tokens=48, seed=0
        )
        choice = reply.choices[0]
        assert choice.message.content == text and choice.finish_reason == want.finish_reason
        assert reply.usage.completion_tokens == tokens
        assert reply.model_extra["diffusion"]["algorithm"] == "nemotron"
        assert reply.model_extra["diffusion"]["forwards"] == want.forwards

        stream = client.chat.completions.create(
            model="tiny-nemotron",
            messages=messages,
            max_tokens=48,
            seed=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        deltas, finish, usage = [], None, None
        for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                deltas.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert "".join(deltas) == text and finish == want.finish_reason
        assert usage is not None and usage.completion_tokens == tokens


def test_llada_presets_are_400_listing_the_valid_names(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    for name in ("dual_cache", "dinfer_blockwise", "llada"):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="tiny-nemotron",
                messages=[{"role": "user", "content": "Copy the list: a b"}],
                max_tokens=8,
                extra_body={"algorithm": name},
            )
        assert err.value.status_code == 400
        body = err.value.response.json()["error"]
        assert body["type"] == "invalid_request_error" and body["param"] == "algorithm", body
        assert name in body["message"] and "valid for this model: nemotron" in body["message"], body


# -- remote code ----------------------------------------------------------------------------------

CONFIG_PY = """
from transformers import PretrainedConfig


class TinyDiffConfig(PretrainedConfig):
    model_type = "tiny_remote_diff"

    def __init__(self, vocab_size=16, hidden_size=16, mask_token_id=3, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)
"""

MODELING_PY = '''
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_tinydiff import TinyDiffConfig


class TinyDiffModel(PreTrainedModel):
    """Walks token ids with one forward per token; records what generate() was given."""

    config_class = TinyDiffConfig
    base_model_prefix = "tinydiff"

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.received = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids):
        return self.diffusion_head(self.embed_tokens(input_ids))

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, steps, block_length=32, threshold=0.9,
                 shift_logits=False, temperature=0.0, eos_token_id=None):
        self.received = dict(max_new_tokens=max_new_tokens, steps=steps, block_length=block_length,
                             threshold=threshold, shift_logits=shift_logits, temperature=temperature,
                             eos_token_id=eos_token_id)
        ids, nfe = prompt_ids, 0
        for _ in range(max_new_tokens):
            nxt = self(ids[:, -1:])[:, -1].argmax(-1, keepdim=True)
            nfe += 1
            ids = torch.cat([ids, nxt], dim=1)
            if eos_token_id is not None and int(nxt) == eos_token_id:
                break
        return ids, nfe
'''


@pytest.fixture(scope="module")
def vocab_size() -> int:
    return len(json.loads((TINY_NEMOTRON / "tokenizer.json").read_text())["model"]["vocab"])


@pytest.fixture(scope="module")
def remote_checkpoint(tmp_path_factory, vocab_size):
    """A checkpoint that ships its own modeling code: token t's successor is t + 1 (mod vocab), with
    the bundled tokenizer (eos <|endoftext|> = 0, stop also on <|im_end|>) and block_size 8."""
    path = tmp_path_factory.mktemp("remote") / "remote-diff"
    path.mkdir()
    (path / "configuration_tinydiff.py").write_text(CONFIG_PY)
    (path / "modeling_tinydiff.py").write_text(MODELING_PY)
    config = {
        "model_type": "tiny_remote_diff",
        "architectures": ["TinyDiffModel"],
        "auto_map": {
            "AutoConfig": "configuration_tinydiff.TinyDiffConfig",
            "AutoModel": "modeling_tinydiff.TinyDiffModel",
        },
        "vocab_size": vocab_size,
        "hidden_size": vocab_size,
        "mask_token_id": 3,
        "eos_token_id": 0,
        "block_size": 8,
        "max_position_embeddings": 256,
    }
    (path / "config.json").write_text(json.dumps(config))
    successor = torch.roll(torch.eye(vocab_size), shifts=1, dims=0)  # head row t+1 reads hidden t
    save_file(
        {"embed_tokens.weight": torch.eye(vocab_size), "diffusion_head.weight": successor.contiguous()},
        str(path / "model.safetensors"),
    )
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_NEMOTRON / name, path / name)
    return path


def test_remote_code_is_refused_without_the_flag(remote_checkpoint, tmp_path):
    with pytest.raises(remote_code.RemoteCodeRefusedError, match="--trust-remote-code"):
        remote_code.load_remote_model(remote_checkpoint, trust_remote_code=False)
    with pytest.raises(ValueError, match="pass --trust-remote-code"):
        build_engine(EngineConfig(model_path=str(remote_checkpoint)))  # the native loader never runs it
    # A known family that also ships code loads natively unless the flag asks for its code.
    auto_map = {"AutoModel": "modeling_missing.Missing"}
    native = build_engine(EngineConfig(model_path=str(copy_checkpoint(tmp_path / "n", auto_map=auto_map))))
    assert isinstance(native, Engine) and native.loaded.family == "nemotron"


def test_remote_engine_runs_the_checkpoints_own_generate(remote_checkpoint, vocab_size):
    engine = build_engine(EngineConfig(model_path=str(remote_checkpoint), trust_remote_code=True))
    assert isinstance(engine, RemoteEngine) and engine.default_algorithm == "nemotron"
    module = engine.model.module
    assert type(module).__name__ == "TinyDiffModel"
    params = engine.resolve_params(8, {"threshold": 0.75, "top_p": 0.5, "remasking": "margin"})
    assert params.block_length == 8  # config.json block_size
    walk = GenerationRequest("walk", [1, 5], params, 8)
    stop = GenerationRequest("stop", [1, vocab_size - 3], params, 8)
    results = engine.run_to_completion([walk, stop])
    assert results["walk"].token_ids == list(range(6, 14)) and results["walk"].finish_reason == "length"
    assert results["walk"].forwards == 8  # the nfe generate returned
    # Its own eos check ends the walk at <|endoftext|> (id 0): a stop, the stop token not returned.
    got = results["stop"]
    assert got.token_ids == [vocab_size - 2, vocab_size - 1] and got.finish_reason == "stop"
    assert got.stopped_on_token and got.forwards == 3
    # Only the arguments its signature names were passed; top_p / remasking were filtered out.
    assert module.received == {
        "max_new_tokens": 8,
        "steps": params.steps,
        "block_length": 8,
        "threshold": 0.75,
        "shift_logits": False,
        "temperature": 0.0,
        "eos_token_id": 0,
    }
    # On its worker thread: a request aborted while waiting ends unrun, the other one runs.
    events: list[SequenceEvent] = []
    engine.add_request(GenerationRequest("gone", [1, 5], params, 8), events.append)
    engine.add_request(GenerationRequest("kept", [1, 5], params, 4), events.append)
    engine.abort("gone")
    engine.start()
    engine.shutdown(drain_timeout=30)
    assert [(e.request_id, e.finish_reason, e.token_ids) for e in events] == [
        ("gone", "abort", []),
        ("kept", "length", [6, 7, 8, 9]),
    ]


def test_remote_code_served_over_the_api(server_factory, remote_checkpoint, vocab_size):
    server = server_factory("--model-path", str(remote_checkpoint), "--trust-remote-code")
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    tok = ChatTokenizer(remote_checkpoint)

    out = client.completions.create(model="remote-diff", prompt=[1, 5], max_tokens=8)
    assert out.choices[0].text == tok.decode(list(range(6, 14))) and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.model_extra["diffusion"]["forwards"] == 8

    out = client.completions.create(model="remote-diff", prompt=[1, vocab_size - 3], max_tokens=8)
    assert out.choices[0].text == tok.decode([vocab_size - 2, vocab_size - 1])
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 3

    messages = [{"role": "user", "content": "Copy the list: a b"}]
    last = chat(tok, messages[0]["content"])[-1]
    walk = [(last + k) % vocab_size for k in range(1, 7)]
    assert not {0, 2} & set(walk)  # no stop token (<|endoftext|>, <|im_end|>) on the way
    stream = client.chat.completions.create(model="remote-diff", messages=messages, max_tokens=6, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == tok.decode(walk)


def test_remote_code_server_refuses_without_the_flag(server_factory, remote_checkpoint):
    server = server_factory("--model-path", str(remote_checkpoint), wait=False)
    assert server.proc.wait(timeout=120) == 2  # refused by the checks before loading (dllm_serve.preflight)
    assert "pass --trust-remote-code" in server.log()


def test_remote_code_that_fails_ends_the_server_with_one_line(server_factory, remote_checkpoint, tmp_path):
    """The checkpoint's own code raising while the model loads: one line naming the directory, exit 1."""
    broken = tmp_path / "broken-remote"
    shutil.copytree(remote_checkpoint, broken)
    modeling = broken / "modeling_tinydiff.py"
    modeling.write_text(
        modeling.read_text() + "\nraise RuntimeError('this revision needs a newer library')\n"
    )
    server = server_factory("--model-path", str(broken), "--trust-remote-code", wait=False)
    assert server.proc.wait(timeout=120) == 1
    log = server.log()
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1, log
    assert f"the modeling code shipped with {broken} failed to load the model" in errors[0], log
    assert "needs a newer library" in errors[0] and "Traceback" not in log, log
