"""What the rest of dllm-serve needs to know about a model family, declared once in its model module.

Each ``models/<family>.py`` ends with one ``SPEC = FamilySpec(...)``; ``models/registry.py`` lists
the specs. The loader (recognition, building), the decoding presets (attention kind, default
preset, decoding defaults), the benchmark's cost model (``ModelShape``), the remote-code path and
``scripts/train_tiny.py`` (``TinyFormat``) all read the spec, so a new family is its model module
and one registry line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dllm_serve.models.base import DiffusionLM, StackConfig
    from dllm_serve.models.tokenizer import ChatTokenizer

# Which keys a query may see. "full": every position of the canvas (LLaDA, Dream): the presets with
# a full-canvas, prefix, dual or vicinity cache run it. "block_causal": the committed context and its
# own block, blocks counted from the prompt's end and the prompt one block (Nemotron): the
# committed-context presets run it. "causal": a causal committed context, and the active block or
# draft bidirectionally over it; the same weights also decode autoregressively (Nemotron-Labs):
# engine/causal_modes.py's presets run it. "aligned_block_causal": block_causal with blocks at
# absolute positions, the prompt block-causal too (SDAR, as trained): the aligned presets run it.
# "block_aligned": the same mask for LLaDA2 (its last prompt block decoded with the generation),
# a kind of its own so that LLaDA2's and SDAR's presets stay apart; the llada2* presets run it,
# through the same ``aligned`` cache policy.
Attention = Literal["full", "block_causal", "causal", "aligned_block_causal", "block_aligned"]
ATTENTION_KINDS: tuple[str, ...] = ("full", "block_causal", "causal", "aligned_block_causal", "block_aligned")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that set a forward's cost (bench/hardware.py's FLOP and byte counts).

    ``mlp_hidden`` is one expert's width. A dense MLP is one expert with ``active_experts`` 1; a
    mixture of experts multiplies ``active_experts`` experts per token (plus ``shared_mlp_hidden`` of
    always-on experts) and streams only the experts a forward's tokens hit: ``experts_hit(tokens)``,
    the expected number under uniform routing (what the balancing bias aims at). The router's matmul
    is ``d_model x experts``.
    """

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    vocab_size: int  # rows of the LM head that are multiplied (the padded embedding size)
    max_length: int  # the longest canvas the model takes (prompt + generation)
    attention_bias: bool = False  # q/k/v biases (cost negligible; recorded for the report)
    experts: int = 1  # MoE: routed experts per layer (1: a dense MLP)
    active_experts: int = 1  # MoE: routed experts each token uses
    shared_mlp_hidden: int = 0  # MoE: width of the always-on shared expert(s), 0 for none

    @classmethod
    def of_dense_stack(cls, cfg: StackConfig, *, attention_bias: bool = False) -> ModelShape:
        """The shape of a Llama/Qwen-style dense stack, read from its parsed config (so the config
        class's defaults, e.g. for KV heads and head_dim, apply)."""
        return cls(
            d_model=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            mlp_hidden=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            max_length=cfg.max_position_embeddings,
            attention_bias=attention_bias,
        )

    @property
    def dense_mlp(self) -> bool:
        return self.experts == 1

    @property
    def _attention_params(self) -> int:
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        return self.d_model * (q + 2 * kv) + q * self.d_model

    @property
    def _router_params(self) -> int:
        return 0 if self.dense_mlp else self.d_model * self.experts

    @property
    def layer_matmul_params(self) -> int:
        """Weights one token multiplies in one layer: QKV, output projection, SwiGLU (3 matrices per
        expert it uses), the router."""
        mlp = 3 * self.d_model * (self.mlp_hidden * self.active_experts + self.shared_mlp_hidden)
        return self._attention_params + mlp + self._router_params

    @property
    def layer_stored_params(self) -> int:
        """Weights one layer holds (every expert), what a forward over a large batch streams."""
        mlp = 3 * self.d_model * (self.mlp_hidden * self.experts + self.shared_mlp_hidden)
        return self._attention_params + mlp + self._router_params

    def experts_hit(self, tokens: int) -> float:
        """Expected distinct experts ``tokens`` tokens hit, each choosing ``active_experts`` of
        ``experts`` uniformly: E (1 - (1 - k/E)^T); all of them for a dense MLP."""
        if self.dense_mlp:
            return 1.0
        return self.experts * (1.0 - (1.0 - self.active_experts / self.experts) ** max(0, tokens))

    def streamed_params_for(self, tokens: int) -> float:
        """Weights a forward over ``tokens`` tokens reads: every layer's attention, router and shared
        experts, the routed experts its tokens hit, and the LM head."""
        stored_experts = 3 * self.d_model * self.mlp_hidden * self.experts
        hit = 3 * self.d_model * self.mlp_hidden * self.experts_hit(tokens)
        per_layer = self.layer_stored_params - stored_experts + hit
        return self.n_layers * per_layer + self.head_params

    @property
    def head_params(self) -> int:
        return self.d_model * self.vocab_size

    @property
    def streamed_params(self) -> int:
        """Weights every forward reads in full: all layers and the LM head (embedding rows are gathered)."""
        return self.n_layers * self.layer_stored_params + self.head_params

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "streamed_params": self.streamed_params}


# Qwen's ChatML as the bundled tiny checkpoints of the Qwen-style families carry it:
# <|im_start|>role\n content <|im_end|>\n, generation prompt <|im_start|>assistant\n.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    """The bundled tiny checkpoint's dimensions and special-token ids, as scripts/train_tiny.py sets them."""

    d_model: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab_size: int
    max_length: int
    eos: int
    eot: int
    mask: int
    block_size: int = 32  # block-diffusion families: config.json's block size

    def qwen_fields(self) -> dict[str, Any]:
        """Constructor fields a Llama/Qwen-style config class takes alike (the pad token is EOS);
        each family's ``tiny_config`` adds its own (head_dim, RoPE, norm eps, block size)."""
        return dict(
            hidden_size=self.d_model,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.mlp,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_length,
            mask_token_id=self.mask,
            eos_token_id=self.eos,
            pad_token_id=self.eos,
        )


@dataclass(frozen=True)
class TinyFormat:
    """What scripts/train_tiny.py needs to write a tiny checkpoint in the family's published format.

    ``objective`` names the trainer's loss: "masked_diffusion" (LLaDA's SFT: the response masked at
    one ratio per row, full attention), "block_diffusion" (two-copy BD3LM layout: clean
    block-causal context + noisy block), "joint_ar_block_diffusion" (the same rows with a causal
    clean copy that also carries a next-token loss), "aligned_block_diffusion" (two copies with
    blocks at absolute positions, the prompt block-causal too: SDAR) or "moe_aligned_block_diffusion"
    (the same layout for LLaDA2's mixture of experts, with its expert-balancing bias:
    scripts/tiny_llada2.py).
    """

    specials: tuple[str, ...]  # special-token strings, added to the trained BPE at the first ids
    eos: str
    eot: str
    mask: str
    tokenizer_config: dict[str, Any]  # tokenizer_config.json, chat template included
    special_tokens_map: dict[str, Any]
    config: Callable[[TinyShape], dict[str, Any]]  # config.json in the published format
    objective: Literal[
        "masked_diffusion",
        "block_diffusion",
        "joint_ar_block_diffusion",
        "aligned_block_diffusion",
        "moe_aligned_block_diffusion",
    ]
    canvas_lengths: tuple[int, ...]  # response canvases the trainer cycles through
    default_kv_heads: int | None = None  # None: as many as --heads
    generation_eos_both: bool = False  # generation_config.json lists [eos, end-of-turn], not eos alone
    block_size: int = 32  # config.json block_size (block diffusion), unless --block-size says otherwise


@dataclass(frozen=True)
class FamilySpec:
    """One model family: how to recognise, build, decode, cost and train it."""

    name: str  # the family's id: LoadedModel.family, `dllm-serve models`, train_tiny --family
    title: str  # for messages: "LLaDA", "Nemotron diffusion"
    model_types: tuple[str, ...]  # config.json model_type values (lower case)
    architectures: tuple[str, ...]  # lower-case substrings of config.json architectures
    build: Callable[[dict[str, Any], ChatTokenizer], DiffusionLM]  # config.json dict, its tokenizer
    attention: Attention
    default_preset: str  # the preset `--engine auto` serves (engine/algorithms.py PRESETS)
    cost_shape: Callable[[dict[str, Any]], ModelShape]  # config.json -> the benchmark's shape
    # Decoding defaults the checkpoint's config implies, as DecodeParams field names (Nemotron's
    # block_size -> block_length, shift_logits); precedence: preset < these < the request.
    decode_defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # The family predicts position i from the logits at i - 1 (Dream): shift_logits defaults to true.
    shift_logits: bool = False
    tiny: TinyFormat | None = None  # None: no bundled tiny checkpoint is trained for it
    # Under --trust-remote-code, a checkpoint whose native model does not fit runs its own generate()
    # with this family's presets (the family whose knobs such generate() functions take).
    remote_code: bool = False

    def matches(self, config: dict[str, Any]) -> bool:
        """Whether config.json names this family (model_type or architectures), never the path."""
        model_type = str(config.get("model_type", "")).lower()
        archs = [str(a).lower() for a in config.get("architectures") or []]
        return model_type in self.model_types or any(h in a for a in archs for h in self.architectures)

    def defaults_for(self, config: dict[str, Any]) -> dict[str, Any]:
        """The decoding defaults of a checkpoint of this family."""
        out: dict[str, Any] = {"shift_logits": True} if self.shift_logits else {}
        if self.decode_defaults is not None:
            out.update(self.decode_defaults(config))
        return out
