"""What a cache did, as plain numpy data: the single source the app and viz read.

A :class:`Trace` is built from a cache after (or during) generation. It holds one
:class:`LayerTrace` per compressed decoder layer -- every full-attention layer; a hybrid
decoder's sliding, chunked, linear-attention and conv layers are not traced (the policy
does not touch them) and :attr:`Trace.layer_ids` gives each traced layer's decoder index --
and the decode-time evictions of those layers. Positions are always *original* token positions: prompt tokens
are ``0..T-1`` and the token fed at decode step ``s`` (1-based) sits at ``T + s - 1``.

Nothing here recomputes the algorithm: the replay helpers only combine what the cache
recorded (kept positions, appended tokens, evictions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerTrace:
    """The prefill decision of one layer.

    Attributes
    ----------
    scores : np.ndarray or None
        ``[T]`` importance of each prompt position (attention received, summed over prompt
        queries, mean over heads); None for methods that do not score.
    kept : np.ndarray
        Ascending original positions of the entries kept after the prefill.
    group : np.ndarray
        ``[T]`` for each prompt position, the original position of the entry that now holds
        it: itself if kept, its anchor if merged, -1 if evicted.
    budget : float or None
        The budget this layer held: the policy's, or the layer's own for a policy with one
        budget per layer (PrefixKV, VL-Cache).
    budget_entries : int or None
        ``ceil(budget * T)`` for this layer's budget: the entries it may keep after the prefill.
    fixed_point : int or None
        This layer's fixed eviction slot N_tl (Elastic, PrefixKV), None for other rules; it
        differs between layers only when their budgets do.
    """

    scores: np.ndarray | None
    kept: np.ndarray
    group: np.ndarray
    budget: float | None = None
    budget_entries: int | None = None
    fixed_point: int | None = None

    @property
    def merged(self) -> np.ndarray:
        """Positions folded into another entry (not kept, not evicted)."""
        return np.flatnonzero((self.group >= 0) & (self.group != np.arange(len(self.group))))

    @property
    def evicted(self) -> np.ndarray:
        """Prompt positions dropped at the prefill without merging."""
        return np.flatnonzero(self.group < 0)

    def group_sizes(self) -> dict[int, int]:
        """Number of prompt positions held by each kept entry (itself included)."""
        held = self.group[self.group >= 0]
        values, counts = np.unique(held, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))


@dataclass
class Trace:
    """Everything one sequence's cache decided.

    Attributes
    ----------
    method, budget, start_size, distance : the policy and its parameters.
    prompt_length : int
        T, the number of prompt tokens.
    protected : np.ndarray
        Prompt positions that are never merged at the prefill (sinks and the last prompt
        token for Elastic; sinks for Local; empty for H2O and Full).
    layers : list[LayerTrace]
        One per compressed (full-attention) decoder layer, in decoder order.
    evictions : np.ndarray
        ``[E, 3]`` int rows ``(step, layer, position)`` of decode-time removals; ``layer``
        indexes :attr:`layers`.
    lengths : list[int]
        Cache length (entries per layer) after each forward: ``lengths[0]`` after the
        prefill, ``lengths[s]`` after decode step ``s``. With one budget per layer the
        layers differ in length: then the mean over layers (a float).
    tokens_seen : int
        Tokens fed through the model so far (prompt plus decoded inputs).
    fixed_point : int or None
        Elastic's eviction index N_tl (slot index in the cache) of layer 0, None for other
        methods (each layer's own: ``layers[l].fixed_point``).
    bytes_per_entry : int
        Bytes of K and V, all traced (full-attention) layers, for one cache entry of this sequence.
    budget_entries : int or None
        ``ceil(budget * T)``, the entries the budget alone allows after the prefill; a layer
        keeps more when the policy's minimum (protected tokens plus one) is larger.
    layer_lengths : np.ndarray or None
        ``[forwards, layers]`` entries each layer held after each forward.
    spans : dict
        Token-type spans ``name -> (start, end)`` (end exclusive) over prompt positions,
        e.g. ``system``, ``image``, ``instruction``; filled by :func:`elastic.generate`.
    image_grid : tuple or None
        ``(rows, cols)`` of image patches when the prompt has exactly one patch grid.
    image_tiles : list[elastic.spans.ImageTile]
        Every grid of image tokens (one per image, tile, global or base view), each with its
        ``rows``, ``cols`` and the row-major prompt ``positions`` of its cells: with tiles,
        row markers or breaks the ``image`` span holds more than the cells (see
        :mod:`elastic.spans`).
    tokens : list[str] or None
        Text of every position (prompt and generated) for hover labels.
    options : dict
        Every parameter of the policy that ran (which variant: e.g. Elastic's
        ``importance``, ``scope``, ``prefill``, ``decode``, ``protect``).
    variant : dict
        The options that differ from the method's defaults (``{}``: the paper's method).
    head : int or None
        For a policy that selects per KV head, the KV head this trace describes.
    heads : list[Trace] or None
        For such a policy, one trace per KV head (``heads[0]`` is this trace).
    layer_ids : list[int]
        The decoder layer index of each entry of :attr:`layers` (default ``0..L-1``: every
        decoder layer is full attention); label layers with it.
    """

    method: str
    budget: float
    start_size: int
    distance: int | None
    prompt_length: int
    protected: np.ndarray
    layers: list[LayerTrace]
    evictions: np.ndarray
    lengths: list[int]
    tokens_seen: int
    fixed_point: int | None
    bytes_per_entry: int
    budget_entries: int | None = None
    layer_lengths: np.ndarray | None = None
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    image_grid: tuple[int, int] | None = None
    image_tiles: list = field(default_factory=list)
    tokens: list[str] | None = None
    options: dict = field(default_factory=dict)
    variant: dict = field(default_factory=dict)
    head: int | None = None
    heads: list["Trace"] | None = field(default=None, repr=False)
    layer_ids: list[int] | None = None

    def __post_init__(self):
        if self.layer_ids is None:
            self.layer_ids = list(range(len(self.layers)))
        self.layer_ids = [int(i) for i in self.layer_ids]
        if len(self.layer_ids) != len(self.layers):
            raise ValueError(f"layer_ids names {len(self.layer_ids)} layers for {len(self.layers)} traced layers")

    @property
    def per_head(self) -> bool:
        """True if every KV head kept its own entries (see :attr:`heads`)."""
        return self.heads is not None

    def of_head(self, head: int) -> "Trace":
        """The trace of KV head ``head`` (this trace itself when the policy does not select per head)."""
        if self.heads is None:
            return self
        if not 0 <= head < len(self.heads):
            raise ValueError(f"head must be in [0, {len(self.heads) - 1}], got {head}")
        return self.heads[head]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def decode_steps(self) -> int:
        """Number of decode forwards recorded after the prefill."""
        return len(self.lengths) - 1

    @property
    def image_span(self) -> tuple[int, int] | None:
        return self.spans.get("image")

    def full_lengths(self) -> np.ndarray:
        """Length a full cache would have after each recorded forward."""
        return self.prompt_length + np.arange(len(self.lengths))

    def kv_bytes(self) -> np.ndarray:
        """Bytes of K/V held after each recorded forward (all traced, full-attention layers)."""
        return np.rint(np.asarray(self.lengths, dtype=np.float64) * self.bytes_per_entry).astype(np.int64)

    def lengths_of(self, layer: int) -> np.ndarray:
        """Entries ``layer`` held after each recorded forward."""
        if self.layer_lengths is None or not len(self.layer_lengths):
            return np.asarray(self.lengths)
        return self.layer_lengths[:, layer]

    @property
    def budgets_per_layer(self) -> bool:
        """True if the layers held different budgets."""
        return len({layer.budget for layer in self.layers}) > 1

    def layer_budget_entries(self) -> np.ndarray:
        """``[layers]`` entries each layer's budget allowed after the prefill."""
        return np.array([self.budget_entries if layer.budget_entries is None else layer.budget_entries
                         for layer in self.layers])

    def scores_matrix(self) -> np.ndarray | None:
        """``[layers, T]`` importance scores, or None if the method does not score."""
        if not self.layers or self.layers[0].scores is None:
            return None
        return np.stack([layer.scores for layer in self.layers])

    def positions_at(self, layer: int, step: int) -> np.ndarray:
        """Ascending original positions held by ``layer`` after decode step ``step``.

        Replays the record: prefill survivors, plus every token fed up to ``step``, minus
        every eviction up to ``step``.
        """
        if not 0 <= step <= self.decode_steps:
            raise ValueError(f"step must be in [0, {self.decode_steps}], got {step}")
        fed = np.arange(self.prompt_length, self.prompt_length + step)
        held = np.concatenate([self.layers[layer].kept, fed])
        rows = self.evictions
        gone = rows[(rows[:, 0] <= step) & (rows[:, 1] == layer), 2]
        return held[~np.isin(held, gone)]

    def evictions_of(self, layer: int) -> np.ndarray:
        """``[E, 2]`` rows ``(step, position)`` evicted from ``layer`` while decoding."""
        rows = self.evictions[self.evictions[:, 1] == layer]
        return rows[:, [0, 2]]

    def token_type(self, position: int) -> str:
        """Name of the span holding ``position`` ("generated" past the prompt)."""
        if position >= self.prompt_length:
            return "generated"
        for name, (start, end) in self.spans.items():
            if start <= position < end:
                return name
        return "text"
