"""Train the bundled tiny checkpoint in LLaDA's real format on the synthetic chat task set.

    python scripts/train_tiny.py --out models/tiny-llada

Objective: LLaDA's masked-diffusion SFT. Only the response is masked, with ratio
p = (1 - eps) * t + eps, t ~ U(0, 1) per example; the loss is the cross-entropy on masked tokens
weighted by 1/p and normalised by the response length; the response is padded with EOS to a fixed
canvas (end-of-turn, then EOS) exactly as the sampler sees it. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dllm_serve.bench.tasks import TASKS, make_example, training_stream
from dllm_serve.models.llada import LLaDAConfig, LLaDAModel, llada_config_dict
from dllm_serve.models.tokenizer import ChatTokenizer

LLADA_SPECIALS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|mdm_mask|>",
]
# LLaDA-8B-Instruct's template: Llama-3 headers, bos on the first message, content trimmed.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + text | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEN_LENGTH = 64  # response canvas during training: answer, end-of-turn, EOS padding


def build_tokenizer(out: Path, vocab_size: int, seed: int) -> None:
    """Train a byte-level BPE on task-like text and write tokenizer.json + tokenizer_config.json."""
    import random

    rng = random.Random(seed)
    corpus = []
    for _ in range(4000):
        ex = make_example(rng)
        corpus += [ex.prompt, ex.answer]
    corpus += ["system user assistant", "You are a helpful assistant.", "Hello! How are you today?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLADA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "mask_token": "<|mdm_mask|>",
                "model_max_length": 512,
                "clean_up_tokenization_spaces": False,
                "chat_template": LLADA_CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        )
    )


def encode_batch(tok: ChatTokenizer, examples, eos: int, eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of prompt + response; response = answer, eot, EOS to GEN_LENGTH, then EOS to the batch width."""
    rows, starts = [], []
    for ex in examples:
        prompt = tok.render_chat([{"role": "user", "content": ex.prompt}])
        answer = [*tok.encode(ex.answer), eot]
        if len(answer) > GEN_LENGTH:
            raise ValueError(f"answer too long for the training canvas: {len(answer)}")
        rows.append(prompt + answer + [eos] * (GEN_LENGTH - len(answer)))
        starts.append(len(prompt))
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    return ids, torch.tensor(starts)


def save_checkpoint(
    model: LLaDAModel, cfg: LLaDAConfig, args: argparse.Namespace, step: int, seconds: float, loss: float
) -> None:
    """Weights under the official names, config.json, generation_config.json and a training record."""
    save_file(model.export_state_dict(), str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(llada_config_dict(cfg), indent=2))
    roles = {
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "mask_token_id": cfg.mask_token_id,
    }
    (args.out / "generation_config.json").write_text(json.dumps(roles, indent=2))
    record = {
        "script": "scripts/train_tiny.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "tasks": list(TASKS),
        "step": step,
        "train_seconds": round(seconds, 1),
        "final_loss": loss,
    }
    (args.out / "TRAINING.json").write_text(json.dumps(record, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/tiny-llada"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=384)
    ap.add_argument("--vocab-size", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=250, help="write the checkpoint every N steps")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(args.out, args.vocab_size, args.seed)
    tok = ChatTokenizer(args.out)
    vocab = tok.hf.get_vocab()
    eos, eot, mask = vocab["<|endoftext|>"], vocab["<|eot_id|>"], vocab["<|mdm_mask|>"]
    n_vocab = len(vocab)
    cfg = LLaDAConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.heads,
        mlp_hidden_size=args.mlp,
        vocab_size=n_vocab,
        embedding_size=n_vocab,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_sequence_length=512,
        mask_token_id=mask,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = LLaDAModel(cfg, eot_token_id=eot)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(
                p,
                std=0.02
                if "ff_out" not in name and "attn_out" not in name
                else 0.02 / math.sqrt(2 * cfg.n_layers),
            )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    stream = training_stream()
    gen = torch.Generator().manual_seed(args.seed)
    eps = 1e-3
    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        ids, starts = encode_batch(tok, [next(stream) for _ in range(args.batch_size)], eos, eot)
        b, width = ids.shape
        response = torch.arange(width)[None, :] >= starts[:, None]
        t = torch.rand(b, generator=gen)
        p_mask = ((1 - eps) * t + eps)[:, None].expand(b, width)
        masked = (torch.rand(b, width, generator=gen) < p_mask) & response
        noisy = torch.where(masked, torch.full_like(ids, mask), ids)
        positions = torch.arange(width)[None, :].expand(b, width)
        logits = model(noisy, positions)
        ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none") / p_mask[masked]
        row = torch.arange(b)[:, None].expand(b, width)[masked]
        per_row = torch.zeros(b).index_add_(0, row, ce) / response.sum(1)
        loss = per_row.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.save_every == 0 and step < args.steps:
            save_checkpoint(model, cfg, args, step, time.time() - t0, loss.item())
        if step % 50 == 0 or step == 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.time() - t0:7.1f}s",
                flush=True,
            )

    save_checkpoint(model, cfg, args, args.steps, time.time() - t0, loss.item())
    print(f"saved {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
