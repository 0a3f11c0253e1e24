"""Prompt-cache reuse across requests for block-causal models: K/V of full prompt blocks, by prefix.

Under the committed-context policy (``engine/sequence.py``) the prompt is cut into blocks of
``block_length`` tokens from position 0, and a prompt token attends only to keys up to the end of
its own block. The K/V of a full prompt block [j*bl, (j+1)*bl) therefore depend on the tokens
[0, (j+1)*bl) and nothing else (positions are absolute and keys are stored after RoPE), so a later
request whose prompt starts with the same tokens, decoded with the same block length, can take them
instead of recomputing them: exactly the same numbers. Under full attention every prompt token sees
the whole canvas (prompt and masks), so no prompt K/V can be reused across requests; such models
never use this cache.

Entries are single blocks keyed by a hash chain: a block's key hashes its parent's key (the block
before it, or the block length for the first), so one lookup walks the prompt block by block and
stops at the first miss. Each entry keeps its tokens and its parent's key, and a lookup checks both,
so a hash collision can only cause a miss, never a wrong reuse. Eviction is least-recently-used, and
a hit touches a chain from its last block back to its first, so a prefix shared by several chains
is always newer than its descendants: leaves go first, and no reachable block is ever evicted
while a descendant that needs it stays.

Reuse copies the blocks into the new sequence's own extent at admission (the copy is of K/V that
took a forward to compute: for Nemotron-4B a 1,024-token prefix is 144 MiB, read once at memory
bandwidth, against a forward of ~8 TFLOPs). Sharing instead would put a row's keys in two places,
which breaks the single strided view of adjacent extents that batched reads rely on
(``kv_cache.py``). A copy also means that nothing holds an entry once the copy is issued (the cache
and every sequence live on the engine thread), so eviction and cancellation need no reference
counts: an aborted request only loses its own extent.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from dllm_serve.engine.kv_cache import Extent, KVPool


@dataclass
class _Block:
    parent: bytes
    tokens: tuple[int, ...]
    kv: torch.Tensor  # [layers, 2, block_length, kv_heads, head_dim], keys after RoPE


@dataclass(frozen=True)
class PromptCacheStats:
    """Counters since start-up (lookups: requests that asked; hits: those that reused a block)."""

    budget_bytes: int = 0
    used_bytes: int = 0
    blocks: int = 0
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0


def block_keys(prompt: list[int], block_length: int) -> list[tuple[bytes, bytes, tuple[int, ...]]]:
    """(key, parent key, tokens) of each full block of ``prompt``, first block first."""
    parent = f"block_length={block_length}".encode()
    out = []
    for start in range(0, len(prompt) - block_length + 1, block_length):
        tokens = tuple(prompt[start : start + block_length])
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", tokens).tobytes())
        key = digest.digest()
        out.append((key, parent, tokens))
        parent = key
    return out


class PromptCache:
    """A bounded LRU store of full prompt blocks' K/V; engine thread only."""

    def __init__(self, budget_bytes: int, bytes_per_token: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self.bytes_per_token = bytes_per_token
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self.used_bytes = 0
        self.lookups = self.hits = self.reused_tokens = self.stored_blocks = self.evicted_blocks = 0

    def enabled_for(self, block_length: int) -> bool:
        """Whether one block of this length fits the budget at all."""
        return block_length * self.bytes_per_token <= self.budget_bytes

    def reuse(self, prompt: list[int], block_length: int, pool: KVPool, extent: Extent) -> int:
        """Copy the longest cached run of ``prompt``'s full blocks into the start of ``extent``;
        returns the prompt tokens reused (a multiple of ``block_length``, possibly 0)."""
        if not self.enabled_for(block_length):
            return 0
        self.lookups += 1
        chain: list[tuple[bytes, _Block]] = []
        for key, parent, tokens in block_keys(prompt, block_length):
            block = self._blocks.get(key)
            if block is None or block.parent != parent or block.tokens != tokens:
                break
            chain.append((key, block))
        for i, (_, block) in enumerate(chain):
            start = extent.start + i * block_length
            pool.cache[:, :, start : start + block_length].copy_(block.kv)
        for key, _ in reversed(chain):  # leaves older than their prefixes: evicted first
            self._blocks.move_to_end(key)
        reused = len(chain) * block_length
        if reused:
            self.hits += 1
            self.reused_tokens += reused
        return reused

    def store(self, prompt: list[int], block_length: int, pool: KVPool, extent: Extent) -> None:
        """Keep the K/V of ``prompt``'s full blocks, computed in ``extent``, that are not cached
        yet (the caller has run the forward that wrote them)."""
        if not self.enabled_for(block_length):
            return
        size = block_length * self.bytes_per_token
        keys = block_keys(prompt, block_length)
        for i, (key, parent, tokens) in reversed(list(enumerate(keys))):  # the first block ends newest
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            while self.used_bytes + size > self.budget_bytes:
                self._evict()
            start = extent.start + i * block_length
            kv = pool.cache[:, :, start : start + block_length].clone()
            self._blocks[key] = _Block(parent, tokens, kv)
            self.used_bytes += size
            self.stored_blocks += 1

    def _evict(self) -> None:
        _, block = self._blocks.popitem(last=False)
        self.used_bytes -= block.kv.shape[2] * self.bytes_per_token
        self.evicted_blocks += 1

    def stats(self) -> PromptCacheStats:
        return PromptCacheStats(
            self.budget_bytes,
            self.used_bytes,
            len(self._blocks),
            self.lookups,
            self.hits,
            self.reused_tokens,
            self.stored_blocks,
            self.evicted_blocks,
        )
