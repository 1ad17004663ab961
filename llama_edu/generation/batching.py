"""Continuous batching: one decode loop serves many requests (Orca's iteration-level scheduling).

``generate`` decodes a batch that starts together and ends together: a request that arrives a
moment later waits for the whole batch, and a row that finished early rides along as padding.
Orca (Yu et al., OSDI 2022) schedules at the level of *one iteration* instead: between two decode
steps the scheduler frees the rows whose requests finished and admits waiting requests into them,
so the batch is always as full as the traffic allows.

    loop:  free finished rows -> admit waiting requests (prefill each into a free row)
           -> ONE forward pass for every active row -> pick each row's next token

The KV memory is a fixed number of *slots*: one preallocated :class:`~llama_edu.cache.StaticCache`
of shape (slots, kv_heads, max_len, head_dim) per layer, where row ``s`` belongs to one request at
a time and holds its keys/values at positions 0, 1, ... of that request. Requests in different
rows are at different positions, which is the one thing the batch-wide ``cache_position`` of the
model's forward cannot say. Everything else in the forward is already per row, so the positions go
there and nothing in the core changes:

- ``position_ids`` (rows, 1): each row's own position, for RoPE;
- ``attention_mask`` (rows, max_len): row r sees its slots 0..pos[r], i.e. the causal mask of
  each row, written as a padding mask. ``cache_position`` is then the last slot, so the mask's
  shared causal test (key <= cache_position) lets the per-row mask decide alone;
- the cache write: :class:`SlotView` is a StaticCache over some rows of the shared buffers (a
  view, no copy) whose ``update`` writes row r's new key/value at ``positions[r]`` instead of at
  the shared ``cache_position``. That is the Cache protocol's job anyway (transformers passes
  the same hook ``cache_kwargs``), so the layers never learn that rows differ.

A new request's prompt is prefilled alone (batch 1) through a plain StaticCache view of its row,
exactly as ``generate`` prefills it; then it joins the decode batch. Each decode step runs the
rows 0..highest-active (a basic slice, so again a view), and requests take the lowest free slot,
so the batch stays compact. Greedy outputs equal ``generate`` run on each prompt alone (tested):
the rows never see each other, only the floating-point summation order of a bigger matrix
product can differ.

Use it directly (a notebook, a test) by stepping it::

    batcher = ContinuousBatcher(model, slots=4, eos_token_id=tokenizer.eos_token_id)
    a = batcher.submit(tokenizer.encode("ROMEO:"), max_new_tokens=20)
    batcher.step(); batcher.step()
    b = batcher.submit(tokenizer.encode("JULIET:"), max_new_tokens=20)   # joins mid-flight
    batcher.run_until_idle()
    a.tokens, a.finish_reason, batcher.timeline    # (step, slot, request_id, kind) events
    occupancy(batcher.timeline, batcher.slots)     # (slots, steps) request ids, -1 = free: imshow it

or in a background thread (what :mod:`llama_edu.generation.server` does): ``batcher.start()``,
``submit`` from any thread, read ``handle.stream()`` (blocking) or pass ``listener=``,
``batcher.close()``.

Deeper dive: paged attention. A slot reserves ``max_len`` positions for every request, however
short; with many slots most of that memory holds nothing. vLLM (Kwon et al., SOSP 2023) cuts the
cache into fixed-size *blocks* (say 16 positions) in one shared pool and gives each request a
*block table*, the list of its blocks in order, like a process's page table: position p of a
request lives in block ``table[p // 16]`` at offset ``p % 16``. Memory is taken one block at a
time as a request grows and returned when it ends, so nearly none is wasted and more requests fit
at once; requests that share a prompt prefix can even share its blocks (copy-on-write). The cost
is an attention kernel that gathers keys through the table instead of reading one contiguous row.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch

from ..cache import StaticCache
from .decode import context_limit, forward_step
from .sampling import build_logits_processors, next_tokens

#: What a listener receives: a token id, then ``None`` once the request has finished.
Listener = Callable[["int | None"], None]


class SlotView(StaticCache):
    """Rows ``rows`` of a slot cache's buffers as a StaticCache (views: writes land in the
    shared memory). With ``positions`` (rows,), ``update`` writes row r's one new token at
    ``positions[r]`` (a decode step of requests at different positions); without, it writes at
    the shared ``cache_position`` as a StaticCache does (the prefill of one request)."""

    def __init__(self, buffers: StaticCache, rows: slice, positions: torch.Tensor | None = None):
        # No super().__init__(): a view allocates nothing, it shares the buffers' memory.
        self.key_cache = [k[rows] for k in buffers.key_cache]
        self.value_cache = [v[rows] for v in buffers.value_cache]
        self.max_batch_size = self.key_cache[0].shape[0]
        self.max_cache_len = buffers.max_cache_len
        self.length = torch.zeros((), dtype=torch.long, device=buffers.length.device)
        self.positions = positions

    def update(self, key, value, layer_idx, cache_position=None):
        """key/value (rows, kv_heads, 1, head_dim) -> the whole rows (rows, kv_heads, max_len, head_dim)."""
        if self.positions is None:
            return super().update(key, value, layer_idx, cache_position)
        if key.shape[2] != 1:
            raise ValueError(f"a per-row decode step writes one token per row, got {key.shape[2]}")
        rows = torch.arange(key.shape[0], device=key.device)
        # Advanced indexing on dims 0 and 2: element [r, :, positions[r]] for each row r.
        self.key_cache[layer_idx][rows, :, self.positions] = key[:, :, -1]
        self.value_cache[layer_idx][rows, :, self.positions] = value[:, :, -1]
        return self.key_cache[layer_idx], self.value_cache[layer_idx]


class Event(NamedTuple):
    """One line of the scheduler's record: at loop iteration ``step``, row ``slot`` ran
    ``kind`` ("prefill": the request's prompt, alone; "decode": one token, in the batch)."""

    step: int
    slot: int
    request_id: int
    kind: str


@dataclass
class RequestHandle:
    """A submitted request, as its caller sees it. ``tokens`` grows as tokens are generated
    (end-of-sequence excluded); ``finish_reason`` is set when it is over: "stop" (end of
    sequence), "length" (max_new_tokens or the context is full), "cancelled", or "error"
    (then ``error`` says why)."""

    request_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    listener: Listener | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _queue: "queue.Queue[int | None]" = field(default_factory=queue.Queue)
    _cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (a stop sequence was found, the client left): the row is freed before
        the next step. Safe from any thread."""
        self._cancelled = True

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Yield token ids as they are generated (blocking; for callers without a listener)."""
        while True:
            token = self._queue.get(timeout=timeout)
            if token is None:
                return
            yield token

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until the request is over; its tokens."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self.tokens

    def _emit(self, token: int | None) -> None:
        if self.listener is None:
            self._queue.put(token)
            return
        try:
            self.listener(token)
        except Exception:  # noqa: BLE001 - a listener that went away (closed event loop) must not stop the loop
            self._cancelled = True


class _Active:
    """A request in a row: its ids so far (prompt + new) and how to pick its next token."""

    def __init__(self, handle: RequestHandle, device: torch.device):
        self.handle = handle
        self.ids = list(handle.prompt_ids)
        self.sample = handle.temperature > 0
        self.processors = None
        if self.sample:  # temperature, then top-p (top-k off: OpenAI's API has none)
            self.processors = build_logits_processors(True, handle.temperature, None, handle.top_p)
        self.generator = None
        if self.sample:
            self.generator = torch.Generator(device=device)
            if handle.seed is None:
                self.generator.seed()  # a fresh random seed
            else:
                self.generator.manual_seed(int(handle.seed))


class ContinuousBatcher:
    """Decode many requests together, admitting and freeing them between steps.

    ``slots`` rows of KV cache of ``max_len`` positions each (default: the model's context); a
    request needs prompt + new tokens <= ``max_len``. Tokens in ``eos_token_id`` (default
    ``model.config.eos_token_id``) end a request. ``temperature`` 0 is greedy, else sampling with
    ``top_p`` from the request's own generator (seeded by ``seed``, so a seeded request draws the
    same tokens whatever else is in the batch). ``timeline`` records the last
    ``timeline_size`` (step, slot, request_id, kind) events.
    """

    def __init__(
        self,
        model,
        slots: int = 8,
        max_len: int | None = None,
        eos_token_id: int | list[int] | None = None,
        timeline_size: int = 100_000,
    ):
        config = model.config
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots must be a positive integer (rows of KV cache), got {slots!r}")
        limit = context_limit(config)
        max_len = limit if max_len is None else max_len
        if not isinstance(max_len, int) or not 2 <= max_len <= limit:
            raise ValueError(f"max_len must be an integer in [2, {limit}] (the model's context), got {max_len!r}")
        if (getattr(config, "rope_scaling", None) or {}).get("type") == "dynamic":
            raise ValueError("continuous batching does not support dynamic NTK RoPE scaling (its angles depend on "
                             "one shared length); use a model without it or generate()")
        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos_ids = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        self.model = model
        self.slots = slots
        self.max_len = max_len
        self.device = model.device
        self.buffers = StaticCache(config, slots, max_len, device=self.device, dtype=model.dtype)
        # visible[r, j] = 1: row r's current request has a token at slot j (its causal mask).
        self.visible = torch.zeros((slots, max_len), dtype=torch.long, device=self.device)
        self.last_slot = torch.tensor([max_len - 1], device=self.device)
        self.rows: list[_Active | None] = [None] * slots
        self.waiting: deque[RequestHandle] = deque()
        self.timeline: deque[Event] = deque(maxlen=timeline_size)
        self.steps = 0
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- submitting ------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        listener: Listener | None = None,
    ) -> RequestHandle:
        """Queue a request; it is admitted at the next step with a free slot. ``max_new_tokens``
        None means until the context (``max_len``) is full. ``listener`` (called from the decode
        thread with each token id, then None) replaces the handle's own queue."""
        prompt_ids = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token (e.g. the BOS id)")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}): encode the text with this model's tokenizer")
        room = self.max_len - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens but the context holds {self.max_len}: "
                             "shorten the prompt")
        if max_new_tokens is None:
            max_new_tokens = room
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= room:
            raise ValueError(f"max_new_tokens must be an integer in [1, {room}] (context {self.max_len} - prompt "
                             f"{len(prompt_ids)} tokens), got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        handle = RequestHandle(next(self._ids), prompt_ids, max_new_tokens, float(temperature), float(top_p), seed, listener)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self.waiting.append(handle)
            self._lock.notify()
        return handle

    # -- the loop --------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: free finished rows, admit waiting requests (prefill), one decode step
        for every active row. Returns whether work remains."""
        self._free_cancelled()
        self._admit()
        active = [s for s, r in enumerate(self.rows) if r is not None]
        if active:
            self._decode(active)
        self.steps += 1
        return self.has_work()

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until nothing is waiting or running (when driving the batcher by hand)."""
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError(f"still busy after {max_steps} steps")

    def start(self) -> "ContinuousBatcher":
        """Run the loop in a background thread (one thread: the only one that touches the model)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llama_edu-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still waiting or running finish as "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for slot, row in enumerate(self.rows):
            if row is not None:
                self._finish(slot, "cancelled")
        while self.waiting:
            self._end(self.waiting.popleft(), "cancelled")

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self.has_work():
                    self._lock.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                for slot, row in enumerate(self.rows):
                    if row is not None:
                        row.handle.error = f"{type(e).__name__}: {e}"
                        self._finish(slot, "error")

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, lowest row first, and pick their first token."""
        while True:
            with self._lock:
                free = next((s for s, r in enumerate(self.rows) if r is None), None)
                if free is None or not self.waiting:
                    return
                handle = self.waiting.popleft()
            if handle._cancelled:
                self._end(handle, "cancelled")
                continue
            row = _Active(handle, self.device)
            self.rows[free] = row
            n = len(row.ids)
            ids = torch.tensor([row.ids], device=self.device)  # (1, n): the prompt alone, as generate prefills it
            positions = torch.arange(n, device=self.device)
            view = SlotView(self.buffers, slice(free, free + 1))  # its row, a StaticCache written at 0..n-1
            try:
                logits = forward_step(self.model, view, ids, positions[None], positions, None)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: this request fails, the others go on
                handle.error = f"{type(e).__name__}: {e}"
                self._finish(free, "error")
                continue
            self.visible[free].zero_()
            self.visible[free, :n] = 1
            self.timeline.append(Event(self.steps, free, handle.request_id, "prefill"))
            self._accept(free, self._pick([row], logits)[0])

    def _decode(self, active: list[int]) -> None:
        """One forward pass for rows 0..max(active): each row's newest token at its own position."""
        hi = active[-1] + 1
        tokens = [0] * hi  # rows without a request compute on a dummy token; nothing reads them
        positions = [0] * hi
        for s in active:
            tokens[s] = self.rows[s].ids[-1]
            positions[s] = len(self.rows[s].ids) - 1
        pos = torch.tensor(positions, device=self.device)
        rows = torch.arange(hi, device=self.device)
        self.visible[rows, pos] = 1  # each row now also sees the token it writes
        view = SlotView(self.buffers, slice(0, hi), pos)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        logits = forward_step(self.model, view, ids, pos[:, None], self.last_slot, self.visible[:hi])
        picked = self._pick([self.rows[s] for s in active], logits[active])
        for s, token in zip(active, picked):
            self.timeline.append(Event(self.steps, s, self.rows[s].handle.request_id, "decode"))
            self._accept(s, token)

    def _pick(self, rows: list[_Active], logits: torch.Tensor) -> list[int]:
        """Next token of each row from its logits (len(rows), vocab): argmax, or its own draw."""
        picked = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.sample:
                ids = torch.tensor([row.ids], device=logits.device)
                scores = row.processors(ids, logits[i : i + 1].clone())
                picked[i] = int(next_tokens(scores, True, row.generator)[0])
        return picked

    def _accept(self, slot: int, token: int) -> None:
        row = self.rows[slot]
        if token in self.eos_ids:
            self._finish(slot, "stop")
            return
        row.ids.append(token)
        row.handle.tokens.append(token)
        row.handle._emit(token)
        if len(row.handle.tokens) >= row.handle.max_new_tokens or len(row.ids) >= self.max_len:
            self._finish(slot, "length")

    def _free_cancelled(self) -> None:
        for slot, row in enumerate(self.rows):
            if row is not None and row.handle._cancelled:
                self._finish(slot, "cancelled")

    def _finish(self, slot: int, reason: str) -> None:
        row = self.rows[slot]
        self.rows[slot] = None  # the slot is free for the next admission
        self._end(row.handle, reason)

    @staticmethod
    def _end(handle: RequestHandle, reason: str) -> None:
        handle.finish_reason = reason
        handle.done.set()
        handle._emit(None)


def occupancy(timeline: "list[Event] | deque[Event]", slots: int) -> torch.Tensor:
    """The timeline as a picture: (slots, steps) request ids, -1 where a slot is free, for
    ``plt.imshow``. Steps count from the first event recorded."""
    events = list(timeline)
    if not events:
        return torch.full((slots, 0), -1, dtype=torch.long)
    first = events[0].step
    grid = torch.full((slots, events[-1].step - first + 1), -1, dtype=torch.long)
    for e in events:
        grid[e.slot, e.step - first] = e.request_id
    return grid
