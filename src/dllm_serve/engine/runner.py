"""One engine iteration over the running sequences: batched forwards, per-row decoding, commits.

Rows are grouped by forward shape (no cache / cache refresh / cached block step) so a short block
step is never padded to a full canvas. Within a group every row keeps its own parameters, its own
random generator and its own span, right-padded; the attention mask hides padding, so a row's
tokens do not depend on its batch. A group that raises is retried row by row, so one bad request
fails alone.

Canvases live on the host. A group's step uploads its inputs, runs the forward and the decoding
rules on the device, and reads back one small tensor (each row's new block, commit count and a
NaN flag): one synchronisation per forward, whatever the batch size. Per-row bookkeeping (block
advance, streaming, stop detection) then runs on host memory without touching the device.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dllm_serve.config import EngineConfig
from dllm_serve.decoding import editing
from dllm_serve.decoding.dream import DREAM_RULES
from dllm_serve.decoding.sampling import gumbel_argmax, never_choosing, top_p_filter, uniform
from dllm_serve.decoding.step import Constraint, NoiseSpan, RowStep, decide
from dllm_serve.engine import causal_modes, denoise, token_logprobs
from dllm_serve.engine.constrained import FrontierGuide
from dllm_serve.engine.cuda_graphs import BlockStepGraphs, key_bucket
from dllm_serve.engine.kv_cache import KVPool, extent_tokens, write_index
from dllm_serve.engine.memory import human_bytes, plan_kv_cache
from dllm_serve.engine.prompt_cache import PromptCache
from dllm_serve.engine.sequence import (
    BLOCK_CACHES,
    ForwardPlan,
    GenerationRequest,
    Sequence,
    SequenceEvent,
    TokenLogprob,
    canvas_length,
)
from dllm_serve.models import registry
from dllm_serve.models.base import DiffusionLM
from dllm_serve.models.loader import LoadedModel
from dllm_serve.tensors import upload

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """What one iteration did, for metrics and benchmarks."""

    batch_size: int
    forwards: int
    refresh_forwards: int
    committed_tokens: int
    finished: int
    duration_s: float


@dataclass(frozen=True)
class ForwardShape:
    """One model forward as run: rows, query tokens per row, keys attended, logits per row."""

    batch: int
    queries: int
    keys: int
    logits: int


@dataclass
class _Row:
    seq: Sequence
    plan: ForwardPlan
    q_start: int
    ids: torch.Tensor | None = None  # query ids when not the canvas's (a speculative draft)
    phase: str = ""  # causal_modes' phase for its policies


class Runner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        if not isinstance(loaded.model, DiffusionLM):
            raise TypeError("the native runner needs a native model (remote code runs in RemoteEngine)")
        self.model: DiffusionLM = loaded.model
        self.config = config
        self.roles = self.model.roles
        self.stop_ids = loaded.tokenizer.stop_ids(self.roles.eos_token_id)
        self.eot_id = loaded.tokenizer.end_of_turn_id
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.max_len = min(config.max_model_len or self.model.max_length, self.model.max_length)
        # The KV cache, sized by the memory budget and allocated now (start-up fails with the
        # numbers if one sequence of max_len tokens cannot fit).
        m = self.model
        # Block-causal models get a prompt cache, carved out of the KV budget; under full
        # attention a prompt's K/V depend on the canvas.
        block_causal = registry.get(loaded.family).attention in (
            "block_causal",
            "aligned_block_causal",
            "block_aligned",
        )
        self.kv_plan = plan_kv_cache(m, config, self.device, self.dtype, self.max_len, block_causal)
        self.pool = KVPool(
            m.num_layers, m.num_kv_heads, m.head_dim, self.kv_plan.capacity, self.dtype, self.device
        )
        self.prompt_cache = PromptCache(self.kv_plan.prompt_cache_bytes, self.pool.bytes_per_token)
        if block_causal:
            budget = self.prompt_cache.budget_bytes
            shown = f"{human_bytes(budget)} for reused prompt blocks" if budget else "off"
            log.info("prompt cache: %s", shown)
        log.info(
            "KV cache: %d tokens x %d B = %s (%s); %d sequences of --max-model-len %d fit",
            self.pool.capacity,
            self.pool.bytes_per_token,
            human_bytes(self.pool.capacity * self.pool.bytes_per_token),
            self.kv_plan.source,
            self.pool.capacity // extent_tokens(self.max_len),
            self.max_len,
        )
        # Static-shape replay of cached block steps (CUDA graphs).
        self.graphs: BlockStepGraphs | None = None
        if config.cuda_graphs:
            self.graphs = BlockStepGraphs(m, self.pool, max_batch=config.max_batch_size, capture=True)
        self.forward_observers: list[Callable[[ForwardShape], None]] = []  # e.g. bench engine's cost

    # -- admission ----------------------------------------------------------------------------

    def can_admit(self, request: GenerationRequest) -> bool:
        """Whether the request's KV memory (its prompt + canvas) is free now."""
        return request.params.cache == "none" or self.pool.fits(self._tokens(request))

    @staticmethod
    def _tokens(request: GenerationRequest) -> int:
        """Canvas length: prompt, gen_length (to a block boundary under ``aligned``), and the slack
        a speculative block needs."""
        p = request.params
        return canvas_length(len(request.prompt_ids), p) + causal_modes.canvas_slack(p.cache, p.block_length)

    def check(self, request: GenerationRequest) -> None:
        """ValueError if the request can never run. Anything up to max_len fits the empty KV
        cache (start-up checked that), so a valid request waits at most for memory to free."""
        total, prompt = self._tokens(request), len(request.prompt_ids)
        if total > self.max_len:
            raise ValueError(
                f"prompt ({prompt}) + canvas ({total - prompt}) tokens exceed the model's {self.max_len}"
            )
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")

    def new_sequence(self, request: GenerationRequest) -> Sequence:
        """Canvas, generator and KV extent for a request (``check`` first; ValueError if invalid)."""
        self.check(request)
        params = request.params
        total = self._tokens(request)
        mask = self.roles.mask_token_id
        canvas = torch.tensor(
            request.prompt_ids + [mask] * (total - len(request.prompt_ids)), dtype=torch.long
        )
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        seq = Sequence(request, canvas, mask, self.stop_ids, generator)
        if request.denoise:
            seq.trace = denoise.DenoiseTrace()
        if params.cache != "none":
            seq.kv = self.pool.allocate(total)
        if params.cache in BLOCK_CACHES:  # block-causal: full prompt blocks may come from the cache
            seq.committed_context = self.prompt_cache.reuse(
                request.prompt_ids, params.block_length, self.pool, seq.extent
            )
        if request.constraint is not None:  # tokens the grammar forces before any forward
            request.constraint.start(seq.prompt_len)
            end = causal_modes.force_end(seq) if params.cache in causal_modes.POLICIES else seq.block_end
            request.constraint.advance(seq.canvas, mask, end, seq.output_end)
        return seq

    def release(self, seq: Sequence) -> None:
        if seq.kv is not None:
            self.pool.release(seq.kv)
            seq.kv = None

    # -- one iteration ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> StepInfo:
        start = time.perf_counter()
        groups: dict[tuple[bool, bool], list[_Row]] = {}
        causal_groups: dict[str, list[_Row]] = {}
        for seq in seqs:
            if seq.params.cache in causal_modes.POLICIES:
                step = causal_modes.plan(seq)
                row = _Row(seq, step.plan, step.plan.q_start, step.ids, step.phase)
                if step.phase == causal_modes.DENOISE:  # an ordinary cached block step
                    groups.setdefault((True, False), []).append(row)
                else:
                    causal_groups.setdefault(step.phase, []).append(row)
                continue
            plan = seq.plan()
            q_start = plan.q_start
            if seq.params.shift_logits:  # position i is predicted by the logits at i - 1
                q_start = min(q_start, plan.logits_start - 1)
            groups.setdefault((seq.params.cache != "none", plan.refresh), []).append(_Row(seq, plan, q_start))
        forwards = refresh = committed = 0
        for (_, is_refresh), rows in groups.items():
            rows.sort(key=lambda r: r.seq.kv.start if r.seq.kv else 0)  # adjacent extents: a view, no copy
            for done_rows, n_committed in self._run_isolated(rows):
                forwards += done_rows
                refresh += done_rows if is_refresh else 0
                committed += n_committed
        for phase, rows in causal_groups.items():
            rows.sort(key=lambda r: r.seq.kv.start if r.seq.kv else 0)
            for done_rows, n_committed in self._run_isolated(rows, self._run_causal_group):
                forwards += done_rows
                refresh += done_rows if phase != causal_modes.DRAFT else 0
                committed += n_committed
        finished = sum(1 for s in seqs if s.finished)
        return StepInfo(len(seqs), forwards, refresh, committed, finished, time.perf_counter() - start)

    def _run_isolated(
        self, rows: list[_Row], run: Callable[[list[_Row]], int] | None = None
    ) -> list[tuple[int, int]]:
        run = run or self._run_group
        try:
            return [(len(rows), run(rows))]
        except Exception:
            if len(rows) == 1:
                log.exception("request %s failed", rows[0].seq.request.request_id)
                self._fail(rows[0].seq, "internal error while generating")
                return [(1, 0)]
        return [r for row in rows for r in self._run_isolated([row], run)]

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.error = message
        self._finish(seq, "error", [])

    def _run_group(self, rows: list[_Row]) -> int:
        block = self._block_view(rows)
        logits = self._forward(rows)
        masked = (block == self.roles.mask_token_id).sum(-1).tolist()
        host_block, block = block, upload(block, self.device)
        candidates = block == self.roles.mask_token_id
        bad = (~torch.isfinite(logits).all(-1) & candidates).any(-1)  # before decoding edits logits
        lp_rows = token_logprobs.wanting([r.seq for r in rows])
        logp = token_logprobs.before_edits(logits, lp_rows)
        seqs = [r.seq for r in rows]
        guide = FrontierGuide.build(
            [s.request.constraint for s in seqs], [s.block_start for s in seqs], block.shape[1], self.device
        )
        step = decide(
            logits,
            block=block,
            rows=[
                self._row_step(r, m, host_block[i], guide.hook(i) if guide is not None else None)
                for i, (r, m) in enumerate(zip(rows, masked, strict=True))
            ],
            mask_id=self.roles.mask_token_id,
            eos_id=self.roles.eos_token_id,
            eot_id=self.eot_id,
        )
        tokens, commit, conf = step.tokens, step.commit, step.conf
        if guide is not None:  # constrained rows commit their frontier (engine/constrained.py)
            commit = guide.force(commit)
        for row, state in zip(rows, step.states, strict=True):
            if state is not None:
                row.seq.rule_state = state
        edits = self._edits(rows, block, tokens, conf, candidates)
        commit = commit | edits
        new_block = torch.where(commit, tokens, block)
        # The step's one device-to-host transfer: new blocks, commit and edit counts, NaN flags.
        counts = torch.stack([commit.sum(-1), edits.sum(-1)], dim=1)
        host = torch.cat([new_block, counts, bad[:, None]], dim=1).cpu()
        provisional = denoise.read_back([r.seq for r in rows], tokens, conf)  # {} unless a row traces
        if logp is not None:  # requests that asked for log-probabilities: one more small copy
            k = max(rows[i].seq.request.logprobs or 0 for i in lp_rows)
            values = dict(zip(lp_rows, token_logprobs.chosen_and_top(logp, tokens[lp_rows], k), strict=True))
        committed = 0
        for i, (row, out) in enumerate(zip(rows, host, strict=True)):
            if out[-1]:
                self._fail(row.seq, "numerical error: the model produced NaN or infinite logits")
            else:
                if logp is not None and i in values:
                    seq = row.seq
                    old = seq.canvas[seq.block_start : seq.block_end]
                    token_logprobs.record(seq, old, out[: seq.params.block_length], values[i])
                committed += self._apply(row, out[:-3], int(out[-3]), provisional.get(i), int(out[-2]))
        return committed

    def _edits(
        self,
        rows: list[_Row],
        block: torch.Tensor,
        tokens: torch.Tensor,
        conf: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """LLaDA2.1 token editing of each editing row's decoded, non-prompt block positions."""
        if not any(r.seq.editing for r in rows):
            return torch.zeros_like(candidates)
        width = block.shape[1]
        editable = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            seq = r.seq
            if seq.editing:
                first = max(0, seq.prompt_len - seq.block_start)  # the prompt's tail is never edited
                editable[i, first : seq.params.block_length] = True
        editable = upload(editable, self.device) & ~candidates
        limit = [r.seq.params.editing_threshold if r.seq.editing else 2.0 for r in rows]
        return editing.edit_mask(block, tokens, conf, editable, upload(limit, self.device, torch.float32))

    def _run_causal_group(self, rows: list[_Row]) -> int:
        """A commit, draft or verify forward of causal_modes' policies (all rows in one phase):
        the token each wanted position predicts (masked by the row's grammar where it has one,
        causal_modes.grammar_masks), then the policy's bookkeeping on the host."""
        phase = rows[0].phase
        seqs = [r.seq for r in rows]
        params = [s.params for s in seqs]
        logits = self._forward(rows)
        width = 1 if phase == causal_modes.COMMIT else logits.shape[1]
        logits = logits[:, :width]
        bad = ~torch.isfinite(logits).all(-1).all(-1)
        lp_rows = token_logprobs.wanting(seqs)
        logp = token_logprobs.before_edits(logits, lp_rows)
        masks = [causal_modes.grammar_masks(r.seq, phase, r.plan.logits_end) for r in rows]
        entries = [(i, j, words) for i, row_masks in enumerate(masks) for j, words in enumerate(row_masks)]
        guide = FrontierGuide.at(entries, self.device)  # uploaded while the forward runs
        if guide is not None:
            logits = guide.mask(logits)
        logits = top_p_filter(logits, [p.top_p for p in params])
        with never_choosing(logits, self.roles.mask_token_id):
            tokens = logits.argmax(dim=-1)
            for i, (seq, p) in enumerate(zip(seqs, params, strict=True)):
                if p.temperature > 0:
                    noise = uniform(seq.generator, tuple(logits[i].shape), self.device)
                    tokens[i] = gumbel_argmax(logits[i], p.temperature, noise)
        conf = logits.softmax(-1).gather(-1, tokens[..., None])[..., 0]
        host = torch.cat([tokens.double(), conf.double(), bad[:, None].double()], dim=1).cpu()
        values = {}
        if logp is not None:
            k = max(seqs[i].request.logprobs or 0 for i in lp_rows)
            values = dict(zip(lp_rows, token_logprobs.chosen_and_top(logp, tokens[lp_rows], k), strict=True))
        committed = 0
        for i, (row, out) in enumerate(zip(rows, host, strict=True)):
            seq = row.seq
            if out[-1]:
                self._fail(seq, "numerical error: the model produced NaN or infinite logits")
                continue
            picked, confidence = out[:width].long(), out[width : 2 * width].float()
            seq.forwards += 1
            if phase == causal_modes.DRAFT:
                causal_modes.apply_draft(seq, picked, confidence)
                continue
            if phase == causal_modes.COMMIT:
                start, count = row.plan.logits_end, 1
                causal_modes.apply_commit(seq, start, int(picked[0]))
            else:
                start, count = causal_modes.apply_verify(seq, picked, len(masks[i]) or None)
            if i in values:
                token_logprobs.record_span(seq, start, seq.canvas[start : start + count].tolist(), values[i])
            committed += count
            self._emit(seq)
            if seq.params.cache != "causal" and seq.pending_finish and not seq.finished:
                seq.block = seq.num_blocks  # nothing is left to denoise: the output is final
                self._emit(seq)
        return committed

    def _forward(self, rows: list[_Row]) -> torch.Tensor:
        """One batched forward; returns float32 logits [B, P, V] for each row's active block.

        Inputs are assembled on the host and uploaded once; key lengths are host integers.
        """
        dev = self.device
        cached = rows[0].seq.params.cache != "none"
        spans = [r.plan.q_end - r.q_start for r in rows]
        q_len = max(spans)
        width = max(r.seq.params.block_length for r in rows)
        cfg_rows = [i for i, r in enumerate(rows) if r.seq.params.cfg_scale > 0]
        n = len(rows) + len(cfg_rows)
        ids = torch.full((n, q_len), self.roles.mask_token_id, dtype=torch.long)
        limits = torch.zeros((n, q_len), dtype=torch.long)
        starts = torch.zeros(n, dtype=torch.long)
        first_logit = torch.zeros(n, dtype=torch.long)
        valid_q = torch.zeros((n, q_len), dtype=torch.bool)
        max_limit = 0
        for i, r in enumerate(rows + [rows[j] for j in cfg_rows]):
            seq, plan, span = r.seq, r.plan, r.plan.q_end - r.q_start
            ids[i, :span] = seq.canvas[r.q_start : plan.q_end] if r.ids is None else r.ids
            if i >= len(rows):  # classifier-free guidance: the prompt replaced by masks
                ids[i, : max(0, seq.prompt_len - r.q_start)] = self.roles.mask_token_id
            lim = plan.key_limit
            if r.q_start < plan.q_start:  # the extra query that shift_logits needs
                extra = plan.logits_start if seq.params.cache in BLOCK_CACHES else int(lim[0])
                lim = torch.cat([lim.new_tensor([extra]), lim])
            limits[i, :span] = lim
            max_limit = max(max_limit, int(lim.max()))
            valid_q[i, :span] = True
            starts[i] = r.q_start
            first_logit[i] = plan.logits_start - r.q_start - int(seq.params.shift_logits)
        positions = starts[:, None] + torch.arange(q_len)
        index = (first_logit[:, None] + torch.arange(width)).clamp(0, q_len - 1)
        extents = [r.seq.extent for r in rows] if cached else []
        write = positions
        if cached:  # each query's arena token; padding queries write to the arena's sink
            write = write_index(extents, positions, self.pool.sink, valid_q)
        # One upload: token ids, positions, key limits, cache write positions, logits index.
        packed = upload(torch.cat([ids, positions, limits, write, index], dim=1), dev)
        ids, positions, limits, write, index = packed.split([q_len, q_len, q_len, q_len, width], dim=1)
        # Cached forwards attend to a key length rounded up to a bucket (masked beyond each
        # row's limit), so eager and graph-replayed steps have the same shapes.
        key_len = key_bucket(max_limit, self.max_len) if cached else q_len
        mask = torch.arange(key_len, device=dev)[None, None, :] < limits[:, :, None]
        for observe in self.forward_observers:
            observe(ForwardShape(n, q_len, key_len, width))
        if not cached:
            hidden = self.model.hidden_states(ids, positions, mask, None, index)
        else:
            replayed = None
            if self.graphs is not None and not rows[0].plan.refresh and not cfg_rows:
                replayed = self.graphs.hidden_states(ids, positions, mask, write, extents, index)
            if replayed is None:
                kv = self.pool.view(extents, write, key_len)
                hidden = self.model.hidden_states(ids, positions, mask, kv, index)
            else:
                hidden = replayed
        logits = self.model.logits(hidden).float()
        if cfg_rows:
            cond = logits[cfg_rows]
            uncond = logits[len(rows) :]
            scale = upload([rows[j].seq.params.cfg_scale for j in cfg_rows], dev, torch.float32)
            scale = scale[:, None, None]
            logits = logits[: len(rows)].clone()
            logits[cfg_rows] = uncond + (scale + 1) * (cond - uncond)
        return logits

    def _block_view(self, rows: list[_Row]) -> torch.Tensor:
        """Active-block tokens [B, P] on the host; padding past a row's block is a non-mask token."""
        width = max(r.seq.params.block_length for r in rows)
        block = torch.full((len(rows), width), self.roles.eos_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            seq = r.seq
            block[i, : seq.params.block_length] = seq.canvas[seq.block_start : seq.block_end]
        return block

    def _row_step(
        self, row: _Row, masked: int, block: torch.Tensor, constraint: Constraint | None
    ) -> RowStep:
        """One row's inputs to the decoding step: its parameters, floor, noise span, rule state, and
        its grammar's mask at the frontier (``constraint``, from this step's ``FrontierGuide``); for
        Dream's rules, which draw per masked position, those positions, from the host ``block``."""
        seq, p = row.seq, row.seq.params
        where = block[: p.block_length] == seq.mask_id
        positions = tuple(where.nonzero()[:, 0].tolist()) if p.rule in DREAM_RULES else ()
        # The reference sampler draws its noise over the whole canvas; mirror its stream exactly.
        length, offset = (seq.length, seq.block_start) if p.canvas_noise else (p.block_length, 0)
        return RowStep(
            params=p,
            width=p.block_length,
            floor=seq.floor_commits(masked),
            noise=NoiseSpan(seq.generator, length, offset),
            state=seq.rule_state,
            constraint=constraint,
            step=seq.step_in_block,
            steps=p.steps_per_block,
            masked=positions,
        )

    # -- state updates ------------------------------------------------------------------------

    def _apply(
        self,
        row: _Row,
        block: torch.Tensor,
        n_committed: int,
        provisional: torch.Tensor | None = None,
        n_edits: int = 0,
    ) -> int:
        """Write the row's new block (host tensor), advance, emit the grown prefix. Returns commits."""
        seq = row.seq
        if seq.trace is not None and provisional is not None:
            step = seq.trace.observe(seq, block, provisional, row.plan.refresh)
            seq.push(SequenceEvent(seq.request.request_id, [], prompt_tokens=seq.prompt_len, denoise=step))
        bl = seq.params.block_length
        had_masks = bool(seq.masked_in_block().any())
        seq.canvas[seq.block_start : seq.block_end] = block[:bl]
        constraint = seq.request.constraint
        if constraint is not None:  # grammar-check the new commits left to right (may re-mask)
            constraint.advance(seq.canvas, seq.mask_id, seq.block_end, seq.output_end)
        seq.forwards += 2 if seq.params.cfg_scale > 0 else 1
        seq.step_in_block += 1
        if seq.params.cache in BLOCK_CACHES:
            if seq.committed_context < seq.prompt_len:  # this forward wrote the prompt's K/V
                self.prompt_cache.store(seq.request.prompt_ids, bl, self.pool, seq.extent)
            seq.committed_context = max(seq.committed_context, seq.block_start)
        if self._block_done(seq, bool(seq.masked_in_block().any()), had_masks, n_edits):
            seq.block += 1
            seq.step_in_block = 0
            seq.post_steps = 0
            seq.rule_state = None
        self._emit(seq)
        return n_committed

    @staticmethod
    def _block_done(seq: Sequence, masks_left: bool, had_masks: bool, n_edits: int) -> bool:
        """Whether the active block is finished after this step.

        Without editing: when no mask is left. With LLaDA2.1's editing: a forward of the filled
        block that edits nothing ends it, and so does the ``max_post_steps``-th such forward.
        """
        if not seq.editing:
            return not masks_left
        if not had_masks:  # a post step (an edit may even have written the mask token back)
            seq.post_steps += 1
            if n_edits == 0:
                return True
        return not masks_left and seq.post_steps >= seq.params.max_post_steps

    def _emit(self, seq: Sequence) -> None:
        """Send the newly committed left-to-right prefix; finish when the output is final.

        With token editing only finished blocks are final, so the prefix stops at the active block.
        """
        p = seq.params
        canvas_done = seq.block >= seq.num_blocks
        grammar_done = seq.request.constraint is not None and seq.request.constraint.done
        final = p.early_stop or canvas_done or grammar_done  # the output can end as soon as it is final
        if seq.pending_finish is None:
            end = min(seq.prompt_len + seq.request.max_new_tokens, seq.final_end)
            region = seq.canvas[seq.prompt_len + seq.emitted : end]
            masked = (region == seq.mask_id).nonzero()
            ready = region[: int(masked[0]) if len(masked) else region.shape[0]].tolist()
            stop_at = next((i for i, t in enumerate(ready) if t in seq.stop_ids), None)
            if stop_at is not None:
                ready = ready[:stop_at]
            logprobs = token_logprobs.take(seq, seq.prompt_len + seq.emitted, len(ready))
            seq.emitted += len(ready)
            if stop_at is not None:
                seq.pending_finish, seq.stopped_on_token = "stop", True
            elif seq.emitted >= seq.request.max_new_tokens:
                seq.pending_finish = "length"
            if ready and not (seq.pending_finish and final):
                seq.push(
                    SequenceEvent(
                        seq.request.request_id, ready, prompt_tokens=seq.prompt_len, logprobs=logprobs
                    )
                )
                ready, logprobs = [], token_logprobs.none(seq)
        else:
            ready, logprobs = [], token_logprobs.none(seq)
        if seq.pending_finish and final:
            self._finish(seq, seq.pending_finish, ready, logprobs)

    def _finish(
        self, seq: Sequence, reason: str, tokens: list[int], logprobs: list[TokenLogprob] | None = None
    ) -> None:
        seq.finish_reason = reason
        seq.push(
            SequenceEvent(
                seq.request.request_id,
                tokens,
                finish_reason=reason,
                stopped_on_token=seq.stopped_on_token,
                error=seq.error,
                forwards=seq.forwards,
                prompt_tokens=seq.prompt_len,
                logprobs=logprobs,
            )
        )
