"""GPT-2's forward pass over a preallocated slot cache: the engine's batched decoder.

Why not ``model.generate`` or ``model(..., past_key_values=DynamicCache)``: rows in a chat server
have different lengths, arrive at different times and leave when they finish. With Hugging Face
caches a batch must be left-padded to a common length, and every join or leave re-pads (copies)
the whole cache; ``DynamicCache`` also concatenates on every step. Measured on the medium shape
on a 2-core CPU, a batch-8 step took 0.37 s against ~0.1 s that weights and FLOPs allow.

Here each active row owns a *slot* of one preallocated tensor
``[layers, 2 (key/value), slots, heads, capacity, head_dim]``. A row's tokens sit at positions
``0..length-1`` of its slot, so rows of any length share a step: the new key/value of each row is
written at its own position (one indexed write per layer, no copy of the cache). Capacity grows
by doubling (a rare copy of the positions rows hold), so a small load does not pay for the
largest batch. (With the CPU kernel a row that starts from a cached prefix leaves that prefix
where the prefix cache keeps it, and its slot holds only the positions after it, from index 0:
:meth:`SlotDecoder.load_slot`.)

How attention reads the slots depends on the device:

- **CPU**: each row attends over exactly its own positions (one attention call per row). The
  cache is allocated uninitialised, so a slot's pages become resident only as its row writes
  them: one 1,500-token prompt among short rows costs memory for its own slot, not for every
  slot at its length, and growing the cache does not fault gigabytes of zeros in mid-step (the
  ~4 s stall measured before). Reading exact lengths also stops short rows from paying for the
  longest: 8 rows of the medium shape with one at 1,400 positions, 2.4 ms of attention per
  layer instead of 6.2 ms padded; with equal lengths, 1.45 vs 1.46 ms.
- **GPU**: one attention call over ``[:rows, :, :longest]`` with a mask of each row's valid
  positions (a call per row would be bound by kernel launches there); positions nobody wrote
  are zeros, so masked keys/values are finite.

On a CPU, rows of one token (every decoding row, and a decoding row inside a prefill pass) attend
through the compiled kernel of :mod:`bot.engine.cpu_attention` when the engine has it: one call per
layer for all of them, writing their new keys/values as it goes. Rows of several tokens (a
prompt's chunk) use PyTorch's attention over their slot.

Keys and values are kept in the model's dtype, except for a bfloat16 model on a CPU *without*
that kernel: there the slots are float32. PyTorch's CPU attention is fast only in float32: one
row's attention over 300 positions of the medium shape took 350 µs in bfloat16 against 59 µs in
float32 (AVX512_BF16 CPU; batched matrix products in bfloat16 were no better, as they copy the
strided slot first), and a batch-8 step 111 ms against 74 ms. The kernel reads bfloat16 at
memory speed, so with it the slots stay bfloat16 (half the memory); a prompt's chunk then
attends over a float32 copy of its slot's keys/values (exactly the values a float32 slot would
hold: they come out of bfloat16 projections). The copies kept between turns are always in the
model's dtype (:meth:`SlotDecoder.save_slot`).

The model's own modules do the work (embeddings, layer norms, ``c_attn``/``c_proj`` whether
Conv1D, Linear or dynamic int8 Linear, the MLP, ``lm_head``), so weights, dtypes and quantization
are exactly those of the loaded model; only the attention plumbing is ours. It covers the
``gpt2`` architecture (RuGPT-3 is one); :func:`supports` says when the engine must fall back to
``model.generate``. Tests check greedy output token for token against ``model.generate``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

from bot.engine.cpu_attention import DecodeAttention

#: On a GPU, attention reads keys in multiples of this many positions (masked past each row's
#: end), so a growing dialogue does not present a new shape at every step.
KEY_BLOCK = 64
#: Attention kernels without per-shape planning. cuDNN's attention builds an execution plan for
#: every new shape, and every prefill and step here has one.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

Layer = Callable[[torch.Tensor], torch.Tensor]


class _LayerCalls(NamedTuple):
    """A GPT-2 block's operations on ``[rows, width]`` hidden states (``up`` includes the
    activation)."""

    ln_1: Layer
    qkv: Layer
    proj: Layer
    ln_2: Layer
    up: Layer
    down: Layer


def _bare(module: torch.nn.Module) -> Layer:
    """``module`` as a bare call: a projection's own :meth:`direct` kernel call (oneDNN, int8),
    a layer norm's functional form; any other module as it is."""
    direct = getattr(module, "direct", None)
    if callable(direct):
        return direct()
    if type(module) is torch.nn.LayerNorm:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    return module


def _then(first: Layer, second: Layer) -> Layer:
    return lambda x: second(first(x))


def supports(model: PreTrainedModel) -> bool:
    """Whether this model is a GPT-2 whose forward pass :class:`SlotDecoder` reproduces."""
    config = model.config
    return (
        getattr(config, "model_type", None) == "gpt2"
        and not getattr(config, "add_cross_attention", False)
        and hasattr(model, "transformer")
    )


class SlotDecoder:
    """Prefill one row into its slot; decode one token for every active row at once."""

    def __init__(
        self,
        model: PreTrainedModel,
        window: int,
        initial_capacity: int = 128,
        attention: DecodeAttention | None = None,
    ) -> None:
        config = model.config
        self.model = model
        self.window = window
        self.blocks = list(model.transformer.h)
        self.heads = config.n_head
        self.width = config.n_embd
        self.head_dim = self.width // self.heads
        base = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        inverse = getattr(config, "scale_attn_by_inverse_layer_idx", False)
        self.scales = [base / (i + 1) if inverse else base for i in range(len(self.blocks))]
        self.device = model.transformer.wte.weight.device
        self.dtype = model.transformer.wte.weight.dtype
        #: The compiled CPU kernel for one-token rows (bot.engine.cpu_attention), if any.
        self.attention = attention if self.device.type == "cpu" else None
        #: What keys/values are stored in (see the module docstring).
        self.cache_dtype = (
            torch.float32 if self.device.type == "cpu" and attention is None else self.dtype
        )
        self.cache = torch.empty(0, device=self.device, dtype=self.cache_dtype)
        #: Each layer's ``(keys, values)`` views of :attr:`cache`, made once per allocation
        #: (two indexing operations a layer and step less).
        self._layer_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._initial_capacity = min(initial_capacity, window)
        #: Attention over each row's own positions (CPU), else one masked call for all rows.
        self.exact_keys = self.device.type == "cpu"
        #: How many leading positions of each slot hold a row's keys/values (what a growing
        #: cache copies, and on a CPU all that was ever written there).
        self._filled: list[int] = []
        #: Each slot's attached prefix chunks (see :attr:`paged`) and the positions they hold.
        self._prefix: list[tuple[torch.Tensor, ...]] = []
        self._start: list[int] = []

    # -- the cache -------------------------------------------------------------------------------
    @property
    def paged(self) -> bool:
        """With the kernel, a row's cached prefix is read where the prefix cache keeps it: each
        slot's attached chunks hold its first ``_start`` positions, never copied in, and the
        slot holds position p at index p - start (so every turn reuses the slot's first pages,
        whatever its position in the dialogue)."""
        return self.attention is not None

    @property
    def slots(self) -> int:
        return self.cache.shape[2] if self.cache.dim() == 6 else 0

    @property
    def capacity(self) -> int:
        return self.cache.shape[4] if self.cache.dim() == 6 else 0

    def reserve(self, slots: int, length: int) -> None:
        """Make room for ``slots`` rows of ``length`` tokens, doubling (and copying) if needed."""
        if slots <= self.slots and length <= self.capacity:
            return
        new_slots = self.slots  # never shrinks: rows live in the slots it has
        if slots > self.slots:
            new_slots = max(slots, min(2 * self.slots, self.slots + 8))
        new_capacity = self.capacity or self._initial_capacity
        while new_capacity < length:
            new_capacity *= 2
        new_capacity = max(min(new_capacity, self.window), length)
        shape = (len(self.blocks), 2, new_slots, self.heads, new_capacity, self.head_dim)
        # On a CPU attention never reads a position no row wrote, so the cache starts
        # uninitialised: its pages are touched (made resident) only as rows fill them.
        allocate = torch.empty if self.exact_keys else torch.zeros
        grown = allocate(shape, device=self.device, dtype=self.cache_dtype)
        for slot, (start, filled) in enumerate(zip(self._start, self._filled, strict=True)):
            if filled > start:
                kept = filled - start
                grown[:, :, slot, :, :kept] = self.cache[:, :, slot, :, :kept]
        self.cache = grown
        self._layer_caches = [(layer[0], layer[1]) for layer in grown]
        added = new_slots - len(self._filled)
        self._filled += [0] * added
        self._start += [0] * added
        self._prefix += [()] * added

    def load_slot(self, slot: int, chunks: tuple[torch.Tensor, ...]) -> None:
        """Start ``slot`` from saved ``[layers, 2, heads, n, head_dim]`` chunks, in order.

        With the kernel (:attr:`paged`) the chunks are attached, not copied: attention reads
        them where they are, so a dialogue's history is held once (by the prefix cache's
        entry, which its row owns while it runs) instead of once more in the slot, whose
        pages for those positions are never touched. Otherwise they are copied in."""
        length = sum(chunk.shape[3] for chunk in chunks)
        if self.paged:
            self._prefix[slot], self._start[slot] = tuple(chunks), length
        else:
            start = 0
            for chunk in chunks:
                end = start + chunk.shape[3]
                self.cache[:, :, slot, :, start:end] = chunk
                start = end
            self._prefix[slot], self._start[slot] = (), 0
        self._filled[slot] = length

    def save_slot(self, slot: int, start: int, end: int) -> torch.Tensor:
        """A compact copy of positions ``start..end-1`` of ``slot`` (kept between turns), in
        the model's dtype: a bfloat16 model's keys/values come out of its bfloat16
        projections, so keeping them in bfloat16 loses nothing and halves what the dialogues'
        cached prefixes hold (:meth:`load_slot` widens them again)."""
        held = self._start[slot]
        pieces = []
        offset = 0
        for chunk in self._prefix[slot]:  # positions an attached prefix holds (rarely asked)
            n = chunk.shape[3]
            if start < offset + n and end > offset:
                pieces.append(chunk[:, :, :, max(start - offset, 0) : min(end - offset, n)])
            offset += n
        if end > held:
            pieces.append(self.cache[:, :, slot, :, max(start, held) - held : end - held])
        if len(pieces) == 1:
            return pieces[0].to(self.dtype, copy=True)
        return torch.cat([piece.to(self.dtype) for piece in pieces], dim=3)

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Keep active rows in slots ``0..n-1``: the last row takes the place of one that left."""
        if source != target:
            held = self._start[source]
            kept = length - held
            self.cache[:, :, target, :, :kept] = self.cache[:, :, source, :, :kept]
            self._filled[target] = length
            self._prefix[target], self._start[target] = self._prefix[source], held

    def swap_slots(self, first: int, second: int, first_length: int, second_length: int) -> None:
        """Exchange two slots' rows (a prompt that finished encoding takes its place in the
        batch from one still being encoded)."""
        held, prefix = self._start[second], self._prefix[second]
        kept = self.cache[:, :, second, :, : second_length - held].clone()
        self.move_slot(first, second, first_length)
        self.cache[:, :, first, :, : second_length - held] = kept
        self._filled[first] = second_length
        self._prefix[first], self._start[first] = prefix, held

    # -- the forward passes ------------------------------------------------------------------------
    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, steps, _ = qkv.shape
        q, k, v = qkv.split(self.width, dim=2)
        shape = (rows, steps, self.heads, self.head_dim)
        return (t.view(shape).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def _merge(self, attended: torch.Tensor) -> torch.Tensor:
        rows, _, steps, _ = attended.shape
        return attended.transpose(1, 2).reshape(rows, steps, self.width)

    def _qkv(self, block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """A block's queries, keys and values side by side, in the cache's dtype."""
        return block.attn.c_attn(block.ln_1(hidden)).to(self.cache_dtype)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        transformer = self.model.transformer
        return transformer.wte(ids) + transformer.wpe(positions)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.transformer.ln_f(hidden)).float()

    def prefill(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Encode ``ids`` at positions ``start..`` of ``slot`` (its first ``start`` positions
        already hold this row's prefix) and return the logits after the last one ``[vocab]``."""
        return self.prefill_many([(slot, ids, start)])[0]

    def prefill_many(
        self, rows: list[tuple[int, list[int], int]], wanted: list[bool] | None = None
    ) -> torch.Tensor:
        """:meth:`prefill` for several ``(slot, ids, start)`` rows; logits ``[rows, vocab]``
        after each row's last token (only for the rows ``wanted`` says, when given).

        The rows' new tokens are packed into one sequence, so every projection multiplies all of
        them by the weights in one go (a few large matrix products instead of one small product
        per row: the weights are read once and the kernels run at full speed); only attention
        runs per row, each row over its own slot. A decoding row is a row of one token, which is
        how the engine decodes and encodes a prompt's next chunk in the same pass.
        """
        ids = [token for _, row_ids, _ in rows for token in row_ids]
        positions = torch.cat(
            [torch.arange(start, start + len(row_ids)) for _, row_ids, start in rows]
        ).to(self.device)
        hidden = self._embed(torch.tensor([ids], device=self.device), positions[None])
        spans, offset = [], 0
        for slot, row_ids, start in rows:
            end = start + len(row_ids)
            if start == 0:  # a new row in this slot: whatever was attached there has gone
                self._prefix[slot], self._start[slot] = (), 0
            if start < self._start[slot]:
                raise ValueError(f"slot {slot} holds its first {self._start[slot]} positions")
            self._filled[slot] = end
            keys_end = end if self.exact_keys else self._padded(end)
            # Query i (at position start+i) sees keys 0..start+i of its own slot; one query
            # reading exactly its row's keys sees them all.
            mask = None
            if len(row_ids) > 1 or keys_end > end:
                mask = (
                    torch.arange(keys_end, device=self.device)[None, :]
                    <= positions[offset : offset + len(row_ids), None]
                )
            spans.append((slot, start, end, keys_end, offset, offset + len(row_ids), mask))
            offset += len(row_ids)
        # Rows of one token go through the kernel together (their query index in the packed
        # sequence, slot and end); the others through PyTorch's attention below.
        singles = [i for i, span in enumerate(spans) if span[5] - span[4] == 1]
        if self.attention is None or not singles:
            singles = []
        single_slots = [spans[i][0] for i in singles]
        single_starts = [self._start[slot] for slot in single_slots]
        single_ends = [spans[i][2] for i in singles]
        single_prefixes = [list(self._prefix[slot]) for slot in single_slots]
        single_index = torch.tensor([spans[i][4] for i in singles], dtype=torch.long)
        with sdpa_kernel(_BACKENDS):
            for layer, (block, scale) in enumerate(zip(self.blocks, self.scales, strict=True)):
                q, k, v = self._split(self._qkv(block, hidden))
                attended: list[torch.Tensor | None] = [None] * len(spans)
                if singles:
                    picked = [t[0, :, single_index].transpose(0, 1) for t in (q, k, v)]
                    out = self.attention(  # type: ignore[misc]
                        *picked,
                        *self._layer_caches[layer],
                        single_slots,
                        single_starts,
                        single_ends,
                        single_prefixes,
                        layer,
                        scale,
                    )
                    for j, i in enumerate(singles):
                        attended[i] = out[j][None, :, None, :]
                for i, (slot, start, end, keys_end, first, last, mask) in enumerate(spans):
                    if attended[i] is not None:
                        continue
                    held = self._start[slot]
                    self.cache[layer, 0, slot, :, start - held : end - held] = k[0, :, first:last]
                    self.cache[layer, 1, slot, :, start - held : end - held] = v[0, :, first:last]
                    attended[i] = self._attend_span(
                        q[:, :, first:last],
                        self._row_keys(layer, 0, slot, keys_end),
                        self._row_keys(layer, 1, slot, keys_end),
                        mask,
                        scale,
                    )
                merged = self._merge(torch.cat(attended, dim=2)).to(self.dtype)  # type: ignore[arg-type]
                hidden = hidden + block.attn.c_proj(merged)
                hidden = hidden + block.mlp(block.ln_2(hidden))
        keep = wanted if wanted is not None else [True] * len(spans)
        last = [span[5] - 1 for span, wants in zip(spans, keep, strict=True) if wants]
        return self._logits(hidden[0, torch.tensor(last, dtype=torch.long, device=self.device)])

    def _row_keys(self, layer: int, kind: int, slot: int, end: int) -> torch.Tensor:
        """``[1, heads, end, head_dim]``: a slot's keys (``kind`` 0) or values (1) at positions
        ``0..end-1``; joined from its attached prefix and the slot where it has one (a copy, for
        a prompt's chunk: PyTorch's attention wants them in one tensor)."""
        held = self._start[slot]
        if not held:
            return self.cache[layer, kind, slot : slot + 1, :, :end]
        pieces = [chunk[layer, kind] for chunk in self._prefix[slot]]
        pieces.append(self.cache[layer, kind, slot, :, : end - held])
        return torch.cat(pieces, dim=1)[None]

    def _attend_span(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """PyTorch's attention for one row's queries; over float32 copies where the slot is
        bfloat16 on a CPU (its attention is slow in bfloat16, see the module docstring)."""
        if self.device.type == "cpu" and self.cache_dtype != torch.float32:
            q, keys, values = q.float(), keys.float(), values.float()
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

    def _padded(self, length: int) -> int:
        """``length`` rounded up to whole :data:`KEY_BLOCK` s, within the capacity."""
        return min(-(-length // KEY_BLOCK) * KEY_BLOCK, self.capacity)

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One step for rows ``0..n-1``: row i feeds ``tokens[i]`` at position ``lengths[i]``.

        Returns logits ``[n, vocab]``. The caller advances each length by one.
        """
        ends = [length + 1 for length in lengths.tolist()]
        self._filled[: len(ends)] = ends
        hidden = self._embed(tokens, lengths)[:, None, :]
        mask = None
        if not self.exact_keys:
            keys = torch.arange(self._padded(max(ends)), device=self.device)
            mask = (keys[None, :] <= lengths[:, None])[:, None, None, :]
        if self.attention is not None:
            return self._decode_with_kernel(hidden, ends)
        with sdpa_kernel(_BACKENDS):
            for layer, (block, scale) in enumerate(zip(self.blocks, self.scales, strict=True)):
                q, k, v = self._split(self._qkv(block, hidden))
                attended = self._attend_decoding(layer, q, k, v, lengths, ends, mask, scale)
                hidden = hidden + block.attn.c_proj(self._merge(attended).to(self.dtype))
                hidden = hidden + block.mlp(block.ln_2(hidden))
        return self._logits(hidden[:, 0])

    def _decode_with_kernel(self, hidden: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """:meth:`decode` through the CPU kernel, with no more plumbing than it needs (for one
        row the step is a few milliseconds of fixed costs on top of reading the weights):
        ``[rows, width]`` hidden states, each layer's operations as bare calls
        (:attr:`_layer_calls`), queries, keys and values to the kernel as views of the
        projection's output, whose ``[rows, heads, head_dim]`` result is the merged heads."""
        rows, width, dtype = len(ends), self.width, self.dtype
        slots, starts = list(range(rows)), self._start[:rows]
        prefixes = [list(prefix) for prefix in self._prefix[:rows]]
        shape = (rows, 3, self.heads, self.head_dim)
        attention = self.attention
        assert attention is not None
        hidden = hidden.view(rows, width)
        layers = zip(self._layer_calls, self._layer_caches, self.scales, strict=True)
        for layer, (calls, (keys, values), scale) in enumerate(layers):
            q, k, v = calls.qkv(calls.ln_1(hidden)).view(shape).unbind(1)
            attended = attention(q, k, v, keys, values, slots, starts, ends, prefixes, layer, scale)
            hidden = hidden + calls.proj(attended.view(rows, width).to(dtype))
            hidden = hidden + calls.down(calls.up(calls.ln_2(hidden)))
        return self._logits(hidden)

    @functools.cached_property
    def _layer_calls(self) -> list[_LayerCalls]:
        """Each block's operations as bare calls of their kernels, for :meth:`_decode_with_kernel`.

        The same weights and kernels as the modules' ``forward`` (logits tested equal), without
        the module calls, reshapes and operator lookups around them: a decoding step makes ~170
        such calls, ~5 µs each. Measured on the medium shape, alternating in one process (median
        steps): one row 21.9 -> 20.6 ms in bfloat16, 16.0 -> 14.0 ms in int8; eight rows 35.2 ->
        31.8 ms in bfloat16; 24 layers 256 wide (fixed costs are most of a step): 7.7 -> 4.7 ms.
        """
        calls = []
        for block in self.blocks:
            up, act = _bare(block.mlp.c_fc), block.mlp.act
            if not isinstance(act, torch.nn.Identity):  # not fused into c_fc
                up = _then(up, act)
            calls.append(
                _LayerCalls(
                    _bare(block.ln_1),
                    _bare(block.attn.c_attn),
                    _bare(block.attn.c_proj),
                    _bare(block.ln_2),
                    up,
                    _bare(block.mlp.c_proj),
                )
            )
        return calls

    def _attend_decoding(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor,
        ends: list[int],
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Write each row's new key/value at its position, then attend: ``[rows, heads, 1, d]``
        (over each row's ``ends`` positions, or, given the ``mask``, all rows in one call)."""
        rows = len(ends)
        keys_all, values_all = self.cache[layer, 0], self.cache[layer, 1]
        index = torch.arange(rows, device=self.device)
        keys_all[index, :, lengths] = k[:, :, 0]
        values_all[index, :, lengths] = v[:, :, 0]
        if mask is None:
            return torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[row : row + 1],
                        keys_all[row : row + 1, :, :end],
                        values_all[row : row + 1, :, :end],
                        scale=scale,
                    )
                    for row, end in enumerate(ends)
                ]
            )
        longest = mask.shape[-1]
        return F.scaled_dot_product_attention(
            q,
            keys_all[:rows, :, :longest],
            values_all[:rows, :, :longest],
            attn_mask=mask,
            scale=scale,
        )
