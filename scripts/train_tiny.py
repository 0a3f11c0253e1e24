"""Train a bundled tiny checkpoint in a real published format on the synthetic chat task suites.

The bundled models are two stages (their TRAINING.json records both): the first release, trained
from scratch on the standard suite and canvases of 32-96 tokens by this script as of commit 086d8fb,
then a continuation on both suites (docs/tasks.md) and, for LLaDA, canvases up to 512 tokens, from
the first release's weights and tokenizer (``git archive 086d8fb models | tar -x -C OLD`` restores
them):

    python scripts/train_tiny.py --init OLD/models/tiny-llada \
        --tokenizer-from OLD/models/tiny-llada --steps 900 --schedule wsd --lr 2e-3 \
        --dependent-share 0.5 --threads 1
    python scripts/train_tiny.py --family nemotron --init OLD/models/tiny-nemotron \
        --tokenizer-from OLD/models/tiny-nemotron --steps 700 --schedule wsd --lr 2e-3 \
        --dependent-share 0.5 --threads 1

Both families share the tokenizer recipe (a byte-level BPE trained on task text of both suites, with
the family's special tokens and chat template; or ``--tokenizer-from`` an earlier checkpoint, so its
weights can be continued), the task stream, the response canvases (CANVAS_LENGTHS, cycled per step:
answer, end-of-turn, then EOS padding, exactly as the sampler sees it; fewer rows at long canvases)
and the training loop (AdamW, warm-up + cosine or WSD, clipping, periodic checkpoints). They differ
in model/format and objective:

- ``llada``: LLaDA's masked-diffusion SFT. Only the response is masked, with ratio
  p = (1 - eps) * t + eps, t ~ U(0, 1) per example; the loss is the cross-entropy on masked tokens
  weighted by 1/p and normalised by the response length.
- ``nemotron`` (DiffEncoderModel, Qwen ChatML): block diffusion over a committed context, the way
  the ``nemotron`` preset decodes. Each row is ``[prompt | clean response | noisy response]`` with
  the response positions repeated (BD3LM's two-copy layout). The clean copy attends block-causally
  (the prompt in blocks of ``bs`` from its first token, its last, partial block seeing the whole
  prompt, then response blocks of ``bs`` tokens), which gives exactly the K/V the engine caches for
  the prompt and committed blocks; a noisy block attends to the clean context before it and to
  itself, as the active block does at inference. Inside each noisy block the masking ratio is
  p = (1 - eps) * t + eps with t ~ U(0, 1) per block; the loss is the mean cross-entropy on masked
  tokens. Block sizes are drawn per row from BLOCK_SIZES so each of them decodes well.
- ``nemotron_labs`` (NemotronLabsDiffusionModel): the published model is trained on both objectives
  at once (its modeling code sums a diffusion loss on the noisy copy and a next-token loss on the
  clean copy), and so is the tiny one: the same two-copy rows, but the clean copy attends *causally*
  (the K/V the ``nemotron_labs`` presets cache), and the loss is the mean cross-entropy on the masked
  tokens of the noisy copy plus the mean next-token cross-entropy of the response on the clean copy.
- ``dream`` (DreamModel, Qwen ChatML): LLaDA's objective with the logits right-shifted as Dream
  trains and samples (the output at position i - 1 scores token i). The bundled tiny-dream started
  from tiny-nemotron's weights and tokenizer (``--init models/tiny-nemotron``: names mapped, q/k
  norms dropped, q/k/v biases at zero; see its TRAINING.json):

    python scripts/train_tiny.py --family dream --init models/tiny-nemotron \
        --tokenizer-from models/tiny-nemotron --steps 1500 --schedule wsd --lr 2e-3 \
        --dependent-share 0.5 --threads 1 --save-every 100 --log-every 25

- ``sdar-moe`` (SDARMoeForCausalLM): SDAR's objective on SDAR's MoE variant; ``--init models/tiny-sdar``
  upcycles the trained dense model (``scripts/tiny_sdar_moe.py``), and the trainer logs each sparse
  layer's routing load into TRAINING.json:

    python scripts/train_tiny.py --family sdar-moe --init models/tiny-sdar \
        --tokenizer-from models/tiny-sdar --steps 500 --schedule wsd --lr 1e-3 \
        --dependent-share 0.5 --threads 1 --save-every 100 --log-every 25

Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dllm_serve.bench.tasks import ALL_TASKS, SUITES, make_example, training_stream
from dllm_serve.models import registry
from dllm_serve.models.base import DiffusionLM
from dllm_serve.models.family import TinyFormat, TinyShape
from dllm_serve.models.loader import load_model, read_config
from dllm_serve.models.tokenizer import ChatTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_llada2  # LLaDA2's aligned objective, routing balance and init from tiny-nemotron
import tiny_sdar_moe  # SDAR-MoE's upcycling from tiny-sdar and routing-load log

# Response canvases during training (answer, end-of-turn, EOS padding), cycled per batch so the model
# ends answers cleanly on any canvas a user picks; each family's TinyFormat.canvas_lengths lists them
# (full attention sees the whole canvas, so it needs every max_tokens a client may ask for; block
# diffusion never sees past its block, so short canvases suffice). Long canvases take fewer rows
# (ROW_TOKENS per batch row at --batch-size rows), which keeps the tokens per step, and so the
# seconds per step, about level.
ROW_TOKENS = 96
# Context length written to config.json: a chat prompt plus the longest canvas (512) must fit.
MAX_LENGTH = 1024
# Nemotron: block sizes drawn per row, so any of them decodes well.
BLOCK_SIZES = (8, 16, 32)
BLOCK_WEIGHTS = (0.25, 0.25, 0.5)


# The families a tiny checkpoint can be trained for: those whose spec gives a TinyFormat.
TRAINABLE = {spec.name: spec for spec in registry.FAMILIES if spec.tiny is not None}
OBJECTIVES = {
    "masked_diffusion": "masked diffusion SFT (1/p-weighted, response masked)",
    "block_diffusion": "block diffusion, two-copy (clean block-causal context + noisy block), uniform CE",
    "moe_aligned_block_diffusion": "block diffusion, blocks aligned at position 0, two-copy, uniform CE; "
    "aux-free expert bias (LLaDA2)",
    "joint_ar_block_diffusion": "joint AR + block diffusion, two-copy (clean causal copy: next-token CE; "
    "noisy block over the clean context before it: CE on masked tokens), the two means summed",
    "aligned_block_diffusion": "block diffusion at absolute block positions (prompt block-causal), two-copy, "
    "uniform CE",
}


@dataclass(frozen=True)
class Ids:
    eos: int
    eot: int
    mask: int


def build_tokenizer(out: Path, vocab_size: int, seed: int, fmt: TinyFormat) -> None:
    """Train a byte-level BPE on task-like text and write tokenizer.json + tokenizer_config.json."""
    rng = random.Random(seed)
    corpus = []
    for i in range(6000):
        ex = make_example(rng, ALL_TASKS[i % len(ALL_TASKS)])
        corpus += [ex.prompt, ex.answer]
    corpus += ["system user assistant", "You are a helpful assistant.", "Hello! How are you today?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(fmt.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    write_tokenizer(out, tok, fmt)


def write_tokenizer(out: Path, tok: Tokenizer, fmt: TinyFormat) -> None:
    """tokenizer.json plus the family's tokenizer_config.json (with the trainer's context as its
    ``model_max_length``) and special_tokens_map.json."""
    tok.save(str(out / "tokenizer.json"))
    settings = {**fmt.tokenizer_config, "model_max_length": MAX_LENGTH}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(fmt.special_tokens_map))


def with_specials(tok: Tokenizer, specials: tuple[str, ...]) -> Tokenizer:
    """``tok`` with its special tokens renamed to ``specials``, id for id (the ids 0.. of both lists).

    Lets a family start from another family's tokenizer and weights when only the special-token
    strings differ (tiny-sdar's ``<|MASK|>`` is tiny-nemotron's ``<|mask|>``, both id 3).
    """
    data = json.loads(tok.to_str())
    added = sorted(data["added_tokens"], key=lambda t: t["id"])
    if len(added) != len(specials):
        raise ValueError(f"the tokenizer has {len(added)} special tokens, the format needs {len(specials)}")
    vocab = data["model"]["vocab"]
    for entry, name in zip(added, specials, strict=True):
        if entry["content"] != name:
            vocab[name] = vocab.pop(entry["content"])
            entry["content"] = name
    return Tokenizer.from_str(json.dumps(data))


def encode_rows(
    tok: ChatTokenizer, examples, eos: int, eot: int, canvas: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and ``canvas``-long responses (answer, end-of-turn, EOS padding) per example."""
    prompts, responses = [], []
    for ex in examples:
        answer = [*tok.encode(ex.answer), eot]
        if len(answer) > canvas:
            raise ValueError(f"answer too long for the training canvas: {len(answer)}")
        prompts.append(tok.render_chat([{"role": "user", "content": ex.prompt}]))
        responses.append(answer + [eos] * (canvas - len(answer)))
    return prompts, responses


def encode_batch(
    tok: ChatTokenizer, examples, eos: int, eot: int, canvas: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of prompt + response; response = answer, eot, EOS to ``canvas``, then EOS to the batch width."""
    prompts, responses = encode_rows(tok, examples, eos, eot, canvas)
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    return ids, torch.tensor([len(p) for p in prompts])


# -- objectives ---------------------------------------------------------------------------------


def llada_loss(
    model: DiffusionLM,
    tok: ChatTokenizer,
    examples,
    canvas: int,
    ids_: Ids,
    gen: torch.Generator,
    shift: bool = False,
) -> torch.Tensor:
    """LLaDA's masked-diffusion SFT loss on one batch (see the module docstring). ``shift``: the
    family's logits are right-shifted (Dream): the output at position i - 1 scores token i."""
    eps = 1e-3
    ids, starts = encode_batch(tok, examples, ids_.eos, ids_.eot, canvas)
    b, width = ids.shape
    response = torch.arange(width)[None, :] >= starts[:, None]
    # Stratified mask ratios: each t is still U(0, 1), but a batch covers the range evenly.
    t = (torch.arange(b) + torch.rand(b, generator=gen)) / b
    p_mask = ((1 - eps) * t + eps)[:, None].expand(b, width)
    masked = (torch.rand(b, width, generator=gen) < p_mask) & response
    noisy = torch.where(masked, torch.full_like(ids, ids_.mask), ids)
    positions = torch.arange(width)[None, :].expand(b, width)
    logits = model(noisy, positions)
    if shift:  # responses never start at position 0, so the first position's own logits are unused
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none") / p_mask[masked]
    row = torch.arange(b)[:, None].expand(b, width)[masked]
    per_row = torch.zeros(b).index_add_(0, row, ce) / response.sum(1)
    return per_row.mean()


def block_diffusion_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    block_sizes: list[int],
    mask_id: int,
    pad_id: int,
    gen: torch.Generator,
    eps: float = 1e-3,
    causal_context: bool = False,
) -> dict[str, torch.Tensor]:
    """Inputs, positions, [B, W, W] attention mask, noisy-copy indices, targets and mask ratios.

    All responses have the same length; a block size need not divide it (the last block is short).
    ``causal_context``: the clean copy attends causally (Nemotron-Labs) instead of block-causally.
    """
    b, rl = len(prompts), len(responses[0])
    plen = torch.tensor([len(p) for p in prompts])
    width = int(plen.max()) + 2 * rl
    idx = torch.arange(width)[None, :].expand(b, width)
    clean_end = plen[:, None] + rl
    is_clean = idx < clean_end  # prompt and clean response
    is_noisy = (idx >= clean_end) & (idx < clean_end + rl)
    bs = torch.tensor(block_sizes)[:, None]
    offset = torch.where(is_noisy, idx - clean_end, idx - plen[:, None])  # response offset
    # Prompt blocks get negative ids (in order) so that every response block comes after them.
    block = torch.where(idx < plen[:, None], idx // bs - (width + 1), offset // bs)
    blk_q, blk_k = block[:, :, None], block[:, None, :]
    order = idx[:, None, :] <= idx[:, :, None] if causal_context else blk_k <= blk_q
    clean_q = is_clean[:, :, None] & is_clean[:, None, :] & order
    noisy_q = is_noisy[:, :, None] & (
        (is_clean[:, None, :] & (blk_k < blk_q)) | (is_noisy[:, None, :] & (blk_k == blk_q))
    )
    mask = clean_q | noisy_q

    targets = torch.tensor(responses)
    # One masking ratio per (row, block), stratified over the batch for each block slot.
    n_blocks = -(-rl // min(block_sizes))
    t = (torch.arange(b)[:, None] + torch.rand(b, n_blocks, generator=gen)) / b
    t = torch.gather(t, 0, torch.rand(b, n_blocks, generator=gen).argsort(0))
    resp_block = torch.arange(rl)[None, :] // bs
    p_mask = (1 - eps) * torch.gather(t, 1, resp_block) + eps
    masked = torch.rand(b, rl, generator=gen) < p_mask
    noisy = torch.where(masked, torch.full_like(targets, mask_id), targets)

    ids = torch.full((b, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    noisy_index = clean_end + torch.arange(rl)[None, :]
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n = len(p)
        ids[i, : n + rl] = torch.tensor(p + r)
        ids[i, n + rl : n + 2 * rl] = noisy[i]
        positions[i, : n + rl] = torch.arange(n + rl)
        positions[i, n + rl : n + 2 * rl] = torch.arange(n, n + rl)
    return {
        "ids": ids,
        "positions": positions,
        "mask": mask,
        "noisy_index": noisy_index,
        "clean_index": plen[:, None] + torch.arange(rl)[None, :],
        "targets": targets,
        "masked": masked,
        "p_mask": p_mask,
    }


def block_diffusion_loss(
    model: DiffusionLM,
    tok: ChatTokenizer,
    examples,
    canvas: int,
    ids_: Ids,
    gen: torch.Generator,
    rng: random.Random,
) -> torch.Tensor:
    """Mean cross-entropy on the masked tokens of the noisy copy (see the module docstring)."""
    prompts, responses = encode_rows(tok, examples, ids_.eos, ids_.eot, canvas)
    sizes = rng.choices(BLOCK_SIZES, weights=BLOCK_WEIGHTS, k=len(examples))
    batch = block_diffusion_batch(prompts, responses, sizes, ids_.mask, ids_.eos, gen)
    logits = model(batch["ids"], batch["positions"], batch["mask"], None, batch["noisy_index"])
    masked = batch["masked"]
    return F.cross_entropy(logits[masked].float(), batch["targets"][masked])


def aligned_block_diffusion_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    bs: int,
    mask_id: int,
    pad_id: int,
    gen: torch.Generator,
    eps: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """SDAR's layout: blocks of ``bs`` at absolute positions over prompt + response.

    Each row is ``[clean prompt + response | noisy copy]``; the clean part attends block-causally
    (the prompt too, as the engine's ``aligned`` cache policy caches it), the noisy copy starts at the
    first block holding a response token (so it may begin with the prompt's last tokens, never
    masked) and each of its blocks attends to the clean blocks before it and to itself. Returns what
    ``block_diffusion_batch`` returns; ``noisy_index`` points at the noisy copy's response positions.
    """
    b, rl = len(prompts), len(responses[0])
    plen = torch.tensor([len(p) for p in prompts])
    first = plen // bs * bs  # start of the first block with a response token
    clean_len = plen + rl
    noisy_len = clean_len - first
    width = int((clean_len + noisy_len).max())
    idx = torch.arange(width)[None, :].expand(b, width)
    is_clean = idx < clean_len[:, None]
    is_noisy = ~is_clean & (idx < (clean_len + noisy_len)[:, None])
    pos = torch.where(is_clean, idx, idx - clean_len[:, None] + first[:, None])
    pos = torch.where(is_clean | is_noisy, pos, torch.zeros_like(pos))
    block = pos // bs
    blk_q, blk_k = block[:, :, None], block[:, None, :]
    clean_q = is_clean[:, :, None] & is_clean[:, None, :] & (blk_k <= blk_q)
    noisy_q = is_noisy[:, :, None] & (
        (is_clean[:, None, :] & (blk_k < blk_q)) | (is_noisy[:, None, :] & (blk_k == blk_q))
    )
    mask = clean_q | noisy_q

    targets = torch.tensor(responses)
    # One masking ratio per (row, block), stratified over the batch for each block slot.
    resp_block = (plen[:, None] + torch.arange(rl)[None, :]) // bs - (first // bs)[:, None]
    n_blocks = int(resp_block.max()) + 1
    t = (torch.arange(b)[:, None] + torch.rand(b, n_blocks, generator=gen)) / b
    t = torch.gather(t, 0, torch.rand(b, n_blocks, generator=gen).argsort(0))
    p_mask = (1 - eps) * torch.gather(t, 1, resp_block) + eps
    masked = torch.rand(b, rl, generator=gen) < p_mask
    noisy = torch.where(masked, torch.full_like(targets, mask_id), targets)

    ids = torch.full((b, width), pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n, a, c = len(p), int(first[i]), int(clean_len[i])
        ids[i, :c] = torch.tensor(p + r)
        ids[i, c : c + n - a] = torch.tensor(p[a:], dtype=torch.long)
        ids[i, c + n - a : c + n - a + rl] = noisy[i]
    noisy_index = (clean_len + plen - first)[:, None] + torch.arange(rl)[None, :]
    return {
        "ids": ids,
        "positions": pos,
        "mask": mask,
        "noisy_index": noisy_index,
        "targets": targets,
        "masked": masked,
        "p_mask": p_mask,
    }


def aligned_block_diffusion_loss(
    model: DiffusionLM,
    tok: ChatTokenizer,
    examples,
    canvas: int,
    ids_: Ids,
    gen: torch.Generator,
    block_size: int,
) -> torch.Tensor:
    """Mean cross-entropy on the masked tokens of SDAR's noisy copy (blocks of ``block_size``)."""
    prompts, responses = encode_rows(tok, examples, ids_.eos, ids_.eot, canvas)
    batch = aligned_block_diffusion_batch(prompts, responses, block_size, ids_.mask, ids_.eos, gen)
    logits = model(batch["ids"], batch["positions"], batch["mask"], None, batch["noisy_index"])
    masked = batch["masked"]
    return F.cross_entropy(logits[masked].float(), batch["targets"][masked])


def joint_ar_diffusion_loss(
    model: DiffusionLM,
    tok: ChatTokenizer,
    examples,
    canvas: int,
    ids_: Ids,
    gen: torch.Generator,
    rng: random.Random,
) -> torch.Tensor:
    """Nemotron-Labs' two objectives on one forward of ``[prompt | clean response | noisy response]``:
    CE on the masked tokens of the noisy blocks plus next-token CE on the causal clean copy (the
    logits at position i - 1 predict response token i); see the module docstring."""
    prompts, responses = encode_rows(tok, examples, ids_.eos, ids_.eot, canvas)
    sizes = rng.choices(BLOCK_SIZES, weights=BLOCK_WEIGHTS, k=len(examples))
    batch = block_diffusion_batch(prompts, responses, sizes, ids_.mask, ids_.eos, gen, causal_context=True)
    rl = batch["targets"].shape[1]
    index = torch.cat([batch["noisy_index"], batch["clean_index"] - 1], dim=1)
    logits = model(batch["ids"], batch["positions"], batch["mask"], None, index)
    masked, targets = batch["masked"], batch["targets"]
    diffusion = F.cross_entropy(logits[:, :rl][masked].float(), targets[masked])
    ar = F.cross_entropy(logits[:, rl:].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    return diffusion + ar


# -- models and checkpoints ---------------------------------------------------------------------


def tiny_config(fmt: TinyFormat, args: argparse.Namespace, n_vocab: int, ids: Ids) -> dict[str, Any]:
    """config.json of the tiny checkpoint in the family's published format, with the trainer's shapes."""
    shape = TinyShape(
        d_model=args.d_model,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads or args.heads,
        mlp=args.mlp,
        vocab_size=n_vocab,
        max_length=MAX_LENGTH,
        eos=ids.eos,
        eot=ids.eot,
        mask=ids.mask,
        block_size=args.block_size,
    )
    return fmt.config(shape)


def init_weights(model: torch.nn.Module, n_layers: int) -> None:
    """Matrices at std 0.02, output projections of the residual branches scaled by 1/sqrt(2 layers)."""
    residual_out = ("ff_out", "attn_out", "o_proj.weight", "down.weight")
    for name, p in model.named_parameters():
        if p.dim() > 1:
            scaled = any(key in name for key in residual_out)
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers) if scaled else 0.02)


def init_tensors(family: str, init: Path) -> dict[str, torch.Tensor]:
    """The ``--init`` checkpoint's tensors under ``family``'s names.

    A Dream model may start from the bundled Nemotron checkpoint (the same Qwen-style special tokens
    and layer shapes): ``encoder.*`` becomes ``model.*``, ``diffusion_head`` the ``lm_head``, the q/k
    norms Dream lacks are dropped and its q/k/v biases start at zero."""
    tensors = load_file(str(init / "model.safetensors"))
    if (
        family != "dream"
        or registry.detect_family(json.loads((init / "config.json").read_text())) != "nemotron"
    ):
        return tensors
    out = {}
    for name, t in tensors.items():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            continue
        name = name.replace("encoder.", "model.", 1).replace("diffusion_head.", "lm_head.")
        out[name] = t
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            out[name.replace(".weight", ".bias")] = torch.zeros(t.shape[0])
    return out


def init_weights_from(model: DiffusionLM, path: Path, family: str) -> None:
    """Start from ``path``'s weights: under its official names when they fit (the same family, or a
    Nemotron checkpoint's names in a Nemotron-Labs model, whose q/k norms it lacks are dropped);
    otherwise through the native modules (a Nemotron checkpoint seeds an SDAR model: the same Qwen3
    stack of ``DecoderLayer``s, only the published names differ)."""
    tensors = init_tensors(family, path)
    if model.layers[0].q_norm is None:
        tensors = {k: v for k, v in tensors.items() if not k.endswith(("q_norm.weight", "k_norm.weight"))}
    try:
        model.load_official(tensors)
    except KeyError:
        if registry.detect_family(read_config(path)) == family:
            raise
        model.load_state_dict(load_model(path).model.state_dict())


def save_checkpoint(
    model: DiffusionLM,
    config: dict[str, Any],
    args: argparse.Namespace,
    step: int,
    seconds: float,
    loss: float,
    routing_log: dict[int, list[float]] | None = None,
) -> None:
    """Weights under the official names, config.json, generation_config.json and a training record."""
    save_file(model.export_state_dict(), str(args.out / "model.safetensors"), metadata={"format": "pt"})
    fmt = TRAINABLE[args.family].tiny
    roles_ = model.roles
    eos_ids = [roles_.eos_token_id, roles_.eot_token_id] if fmt.generation_eos_both else roles_.eos_token_id
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    roles = {
        "eos_token_id": eos_ids,
        "pad_token_id": roles_.pad_token_id,
        "mask_token_id": roles_.mask_token_id,
    }
    (args.out / "generation_config.json").write_text(json.dumps(roles, indent=2))
    record = {
        "script": "scripts/train_tiny.py",
        "family": args.family,
        "objective": OBJECTIVES[fmt.objective]
        + (
            ", logits right-shifted (position i - 1 scores token i)"
            if TRAINABLE[args.family].shift_logits
            else ""
        ),
        "args": {k: str(v) for k, v in vars(args).items()},
        "suites": {name: list(tasks) for name, tasks in SUITES.items()},
        "canvas_lengths": list(args.canvases),
        "rows_per_canvas": {c: rows_for(c, args.batch_size) for c in sorted(set(args.canvases))},
        "step": step,
        "train_seconds": round(seconds, 1),
        "final_loss": loss,
    }
    if fmt.objective == "aligned_block_diffusion":
        record["block_sizes"] = [args.block_size]
    elif fmt.objective != "masked_diffusion":
        record["block_sizes"] = list(BLOCK_SIZES)
    if fmt.objective == "moe_aligned_block_diffusion":
        record["block_size"] = tiny_llada2.BLOCK
        record["routing"] = tiny_llada2.RoutingBalance.record()
    if routing_log:
        record["routing_load_log"] = {
            "meaning": "busiest expert's tokens / mean tokens per expert since the previous entry, "
            "per sparse layer (1.00 = even)",
            **{f"step_{k}": v for k, v in routing_log.items()},
        }
    if getattr(args, "init_record", None):
        record["init"] = args.init_record
    elif args.init is not None:
        record["init"] = str(args.init)
    (args.out / "TRAINING.json").write_text(json.dumps(record, indent=2))


def _is_nemotron(path: Path) -> bool:
    """Whether a checkpoint directory holds tiny-nemotron (an init source for tiny-llada2)."""
    return json.loads((path / "config.json").read_text()).get("model_type") == "nvrdiff"


def rows_for(canvas: int, batch_size: int) -> int:
    """Batch rows at a canvas: ``batch_size`` up to ROW_TOKENS tokens, fewer (at least 4) beyond."""
    return max(4, min(batch_size, round(batch_size * ROW_TOKENS / canvas)))


def lr_factor(schedule: str, steps: int, step: int) -> float:
    """Warm-up over the first 1/30 of the steps, then ``cosine`` decay to 0, or ``wsd``: hold the
    peak until 80 % of the steps and decay linearly to 0. The tiny models learn their alignment
    tasks in a sudden transition that needs a high learning rate; ``wsd`` keeps it high for longer
    in a short run."""
    warmup = min(1.0, (step + 1) / max(1, steps // 30))
    progress = min(1.0, step / steps)
    if schedule == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))
    return warmup * min(1.0, (1 - progress) / 0.2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(TRAINABLE), default="llada", help="checkpoint format")
    ap.add_argument("--out", type=Path, default=None, help="default: models/tiny-<family>")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end after this many steps of the --steps schedule (the bundled tiny-llada: 1000 of 3000)",
    )
    ap.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine", help="learning-rate schedule")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument(
        "--kv-heads",
        type=int,
        default=None,
        help="default: the family's TinyFormat.default_kv_heads, else --heads",
    )
    ap.add_argument("--mlp", type=int, default=384)
    ap.add_argument("--vocab-size", type=int, default=384)
    ap.add_argument(
        "--block-size", type=int, default=None, help="config.json block_size (default: the family's)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=250, help="write the checkpoint every N steps")
    ap.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint's weights")
    ap.add_argument(
        "--tokenizer-from",
        type=Path,
        default=None,
        help="reuse this checkpoint's tokenizer.json instead of training one (needed with --init)",
    )
    ap.add_argument(
        "--canvases",
        type=int,
        nargs="+",
        default=None,
        help="default: the family's TinyFormat.canvas_lengths",
    )
    ap.add_argument(
        "--dependent-share", type=float, default=1 / 3, help="share of examples from the dependent suite"
    )
    ap.add_argument("--skip-examples", type=int, default=0, help="skip this many training examples first")
    args = ap.parse_args(argv)
    fmt = TRAINABLE[args.family].tiny
    args.canvases = tuple(args.canvases or fmt.canvas_lengths)
    if args.out is None:
        args.out = Path(f"models/tiny-{args.family}")
    if args.kv_heads is None:
        args.kv_heads = fmt.default_kv_heads
    if args.block_size is None:
        args.block_size = fmt.block_size
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = TRAINABLE[args.family]
    fmt = spec.tiny
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer_from is None:
        build_tokenizer(args.out, args.vocab_size, args.seed, fmt)
    elif args.family == "llada2" and _is_nemotron(args.tokenizer_from):
        converted = tiny_llada2.tokenizer_json_from_nemotron(args.tokenizer_from)
        write_tokenizer(args.out, Tokenizer.from_str(json.dumps(converted)), fmt)
    else:
        source = Tokenizer.from_file(str(args.tokenizer_from / "tokenizer.json"))
        write_tokenizer(args.out, with_specials(source, fmt.specials), fmt)
    tok = ChatTokenizer(args.out)
    vocab = tok.hf.get_vocab()
    ids = Ids(eos=vocab[fmt.eos], eot=vocab[fmt.eot], mask=vocab[fmt.mask])
    config = tiny_config(fmt, args, len(vocab), ids)
    model = spec.build(config, tok)
    init_weights(model, args.layers)
    if args.init is not None and args.family == "llada2" and _is_nemotron(args.init):
        copied = tiny_llada2.init_from_nemotron(model, load_file(str(args.init / "model.safetensors")))
        args.init_record = {"from": str(args.init), "copied": copied, "rest": "init_weights (std 0.02)"}
    elif (
        args.init is not None
        and args.family == "sdar-moe"
        and registry.detect_family(read_config(args.init)) == "sdar"
    ):
        dense = load_model(args.init).model
        args.init_record = tiny_sdar_moe.upcycle(model, dense, torch.Generator().manual_seed(args.seed))
    elif args.init is not None:
        init_weights_from(model, args.init, args.family)
    balance: tiny_llada2.RoutingBalance | tiny_sdar_moe.RoutingLoad | None = None
    if fmt.objective == "moe_aligned_block_diffusion":
        balance = tiny_llada2.RoutingBalance(model)
    elif hasattr(model, "moe_blocks"):
        balance = tiny_sdar_moe.RoutingLoad(model)
    routing_log = balance.history if isinstance(balance, tiny_sdar_moe.RoutingLoad) else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, args.schedule, args.steps))
    stream = training_stream(dependent_share=args.dependent_share)
    for _ in range(args.skip_examples):
        next(stream)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    model.train()
    last = args.stop_after or args.steps
    for step in range(1, last + 1):
        canvas = args.canvases[step % len(args.canvases)]
        examples = [next(stream) for _ in range(rows_for(canvas, args.batch_size))]
        if fmt.objective == "masked_diffusion":
            loss = llada_loss(model, tok, examples, canvas, ids, gen, shift=spec.shift_logits)
        elif fmt.objective == "moe_aligned_block_diffusion":
            prompts, responses = encode_rows(tok, examples, ids.eos, ids.eot, canvas)
            loss = tiny_llada2.loss(model, prompts, responses, ids.mask, ids.eos, gen)
        elif fmt.objective == "joint_ar_block_diffusion":
            loss = joint_ar_diffusion_loss(model, tok, examples, canvas, ids, gen, rng)
        elif fmt.objective == "aligned_block_diffusion":
            loss = aligned_block_diffusion_loss(model, tok, examples, canvas, ids, gen, args.block_size)
        else:
            loss = block_diffusion_loss(model, tok, examples, canvas, ids, gen, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if balance is not None:
            balance.update()
        if step % args.save_every == 0 and step < last:
            save_checkpoint(model, config, args, step, time.time() - t0, loss.item(), routing_log)
        if step % args.log_every == 0 or step == 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.time() - t0:7.1f}s" + (f"  {balance.report()}" if balance else ""),
                flush=True,
            )

    save_checkpoint(model, config, args, last, time.time() - t0, loss.item(), routing_log)
    print(f"saved {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
