"""DualCrossAttention: one CrossLMM dual cross-attention layer (DCAL), V2V and T2V together."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_false

from crosslmm_ops.nn.attention import (
    SCOPES,
    KVSource,
    Queries,
    T2VCrossAttention,
    TanhGate,
    V2VCrossAttention,
    cached_plan,
    check_call,
    check_kv_path,
    check_mask,
    check_visual_counts,
    head_shape,
    make_norm,
    scatter_add,
)
from crosslmm_ops.nn.memory import VisionMemory
from crosslmm_ops.ops.validation import flag, positive_int


class DualCrossAttention(nn.Module):
    """One DCAL: V2V at the pooled visual positions, T2V at the text positions, each added back
    through a ``tanh`` gate initialised to 0 (an untrained DCAL is the identity)::

        out = h + tanh(g_v2v) * V2V(h)   at visual positions
              h + tanh(g_t2v) * T2V(h)   at text positions
              h                          elsewhere

    Both branches read the same input ``h`` and the same original tokens ``X`` (the
    :class:`~crosslmm_ops.nn.VisionMemory`). Every choice the paper leaves open is an option, the
    paper's reading the default:

    * ``v2v`` / ``t2v``: each branch on or off (paper stage 1: V2V only; stage 2: both);
    * ``v2v_scope``: ``"global"`` (a pooled token attends to all frames of its sample, the paper)
      or ``"frame"`` (only to its own frame);
    * ``share_kv``: one ``vision_norm``/``k_proj``/``v_proj`` for both branches (K and V are then
      computed once per call); ``share_gate``: one gate for both;
    * ``vision_norm`` / ``query_norm``: ``"rmsnorm"``, ``"layernorm"`` or None, before the K/V and
      the Q projection;
    * ``kv_path``: ``"auto"`` (default), ``"fused"`` or ``"materialized"``, per call and branch:
      projection-fused attention over the normalised tokens (computed once per
      :class:`~crosslmm_ops.nn.VisionMemory` for every DCAL) or projected K/V, as
      :class:`~crosslmm_ops.nn.CrossAttention` describes; settable later for both branches;
    * ``num_kv_heads`` (GQA), ``head_dim``, ``bias``, ``norm_eps``, ``softmax_scale``,
      ``backend`` (of the attention; None = auto).

    Parameters: ``v2v.*`` and ``t2v.*`` (:class:`~crosslmm_ops.nn.V2VCrossAttention` /
    :class:`~crosslmm_ops.nn.T2VCrossAttention`: ``query_norm``, ``q_proj``, ``vision_norm``,
    ``k_proj``, ``v_proj``, ``o_proj``, ``gate.alpha``); what is shared lives on the DCAL itself
    (``vision_norm``, ``k_proj``, ``v_proj`` with ``share_kv``; ``gate`` with ``share_gate``), so
    no tensor has two names in the ``state_dict``. Sharing only applies when both branches are on.
    With ``share_kv``, wrap the whole DCAL (or its decoder layer) as one FSDP unit.

    ``torch.compile(dcal, fullgraph=True)`` traces it: the query counts read from the masks are
    symbolic there, the mask checks become assertions of the graph, and ``kv_path="auto"`` takes
    the materialised path (its cost model reads the counts); ``kv_path="fused"`` traces the fused
    one.
    """

    def __init__(
        self,
        hidden_size: int,
        vision_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        v2v: bool = True,
        t2v: bool = True,
        v2v_scope: str = "global",
        share_kv: bool = False,
        share_gate: bool = False,
        vision_norm: str | None = "rmsnorm",
        query_norm: str | None = "rmsnorm",
        bias: bool = False,
        norm_eps: float = 1e-6,
        softmax_scale: float | None = None,
        gate_init: float = 0.0,
        kv_path: str = "auto",
        backend: str | None = None,
    ):
        super().__init__()
        for name, value in (
            ("v2v", v2v),
            ("t2v", t2v),
            ("share_kv", share_kv),
            ("share_gate", share_gate),
        ):
            flag(name, value)
        if not (v2v or t2v):
            raise ValueError("a DualCrossAttention needs at least one branch: v2v=True or t2v=True")
        if v2v_scope not in SCOPES:
            raise ValueError(f"v2v_scope must be one of {SCOPES}, got {v2v_scope!r}")
        positive_int("hidden_size", hidden_size)
        positive_int("vision_size", vision_size)
        num_heads, num_kv_heads, head_dim = head_shape(
            hidden_size, num_heads, num_kv_heads, head_dim
        )
        both = v2v and t2v
        self.shares_kv = share_kv and both
        self.shares_gate = share_gate and both
        common = dict(
            vision_norm=vision_norm,
            query_norm=query_norm,
            bias=bias,
            norm_eps=norm_eps,
            softmax_scale=softmax_scale,
            gate=not self.shares_gate,
            gate_init=gate_init,
            kv_proj=not self.shares_kv,
            kv_path=kv_path,
            backend=backend,
        )
        self.v2v = (
            V2VCrossAttention(
                hidden_size,
                vision_size,
                num_heads,
                num_kv_heads,
                head_dim,
                scope=v2v_scope,
                **common,
            )
            if v2v
            else None
        )
        self.t2v = (
            T2VCrossAttention(hidden_size, vision_size, num_heads, num_kv_heads, head_dim, **common)
            if t2v
            else None
        )
        branch = self.v2v if self.v2v is not None else self.t2v
        self.hidden_size, self.vision_size = branch.hidden_size, branch.vision_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.v2v_scope = v2v_scope
        self._backend = backend
        self._kv_path = check_kv_path(kv_path)
        if self.shares_kv:
            inner_kv = num_kv_heads * head_dim
            self.vision_norm = make_norm(vision_norm, vision_size, norm_eps, "vision_norm")
            self.k_proj = nn.Linear(vision_size, inner_kv, bias=bias)
            self.v_proj = nn.Linear(vision_size, inner_kv, bias=bias)
        if self.shares_gate:
            self.gate = TanhGate(gate_init)

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self._backend = value
        for branch in (self.v2v, self.t2v):
            if branch is not None:
                branch.backend = value

    @property
    def kv_path(self) -> str:
        return self._kv_path

    @kv_path.setter
    def kv_path(self, value: str) -> None:
        self._kv_path = check_kv_path(value)
        for branch in (self.v2v, self.t2v):
            if branch is not None:
                branch.kv_path = value

    def reset_parameters(self) -> None:
        """Projections as torch initialises ``nn.Linear``, norms to ones/zeros, gates to their
        start value."""
        for m in self.modules():
            if (
                m is not self
                and hasattr(m, "reset_parameters")
                and not isinstance(m, (V2VCrossAttention, T2VCrossAttention))
            ):
                m.reset_parameters()

    def kv_source(self) -> KVSource:
        """The shared norm and K/V projections (``share_kv``): one source for both branches of
        a call, so materialised keys and values are computed once for both."""
        return KVSource(
            self.vision_norm, self.k_proj, self.v_proj, self.num_kv_heads, self.head_dim
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        memory: VisionMemory,
        visual_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        *,
        static_shapes: bool = False,
    ) -> torch.Tensor:
        """``hidden_states (B, L, hidden)`` -> the same shape.

        ``visual_mask (B, L)`` bool: the pooled visual positions, in frame order (sample ``b`` has
        ``T_b * pooled_per_frame`` of them, or none; None: no visual positions, as while
        decoding). ``text_mask (B, L)`` bool: the positions that query T2V (default: every
        position that is not visual; pass ``attention_mask & ~visual_mask`` to skip padding). The
        two must not overlap.

        ``static_shapes=True`` (decode steps captured in a CUDA graph): nothing is read back to
        the host and no shape depends on the masks' values. There is no V2V (``visual_mask``
        must be None, as while decoding); every position queries T2V, and ``text_mask`` (None:
        all) selects on the device which positions keep the update. Equal to the default form
        for the same masks.
        """
        check_call(hidden_states, memory, self.hidden_size, self.vision_size)
        visual_mask = check_mask("visual_mask", visual_mask, hidden_states)
        text_mask = check_mask("text_mask", text_mask, hidden_states)
        flag("static_shapes", static_shapes)
        if static_shapes:
            return self._forward_static(hidden_states, memory, visual_mask, text_mask)
        visual, text = _dcal_queries(memory, hidden_states, visual_mask, text_mask)
        kv = self.kv_source() if self.shares_kv else None
        out = hidden_states
        for branch, queries in ((self.v2v, visual), (self.t2v, text)):
            # Under torch.compile the count is symbolic: the branch then runs (on no rows if so).
            if branch is None or guard_or_false(queries.total == 0):
                continue
            # Both branches read the original hidden_states; their rows are disjoint, so adding
            # the updates one after the other is the same as adding both to the input.
            out = scatter_add(
                out, queries.index, self._update(branch, hidden_states, memory, queries, kv)
            )
        return out

    def _update(self, branch, hidden_states, memory, queries, kv) -> torch.Tensor:
        """One branch's gated update of its query rows."""
        delta = branch.attend(hidden_states, memory, queries, kv)
        return self.gate(delta) if self.shares_gate else delta

    def _forward_static(self, hidden_states, memory, visual_mask, text_mask) -> torch.Tensor:
        if visual_mask is not None:
            raise ValueError(
                "static_shapes=True takes no visual_mask: V2V queries come with a prefill, whose "
                "shapes depend on the video; a static-shape call is a decode step"
            )
        if self.t2v is None:
            return hidden_states
        # Every position, in order: no mask is read (the plan is memoised on the memory, so a
        # CUDA graph captures a call whose offsets were built before the capture).
        _, every = _dcal_queries(memory, hidden_states, None, None)
        kv = self.kv_source() if self.shares_kv else None
        delta = self._update(self.t2v, hidden_states, memory, every, kv)
        if text_mask is not None:
            # h + 0 is h: a position outside the mask passes through unchanged, as in the
            # default form, where it is not gathered at all.
            delta = delta.masked_fill(~text_mask.reshape(-1, 1), 0)
        return scatter_add(hidden_states, every.index, delta)

    def plan(
        self,
        hidden_states: torch.Tensor,
        memory: VisionMemory,
        visual_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple:
        """How ``forward`` would run each branch's attention (path, back end, kernel, why), one
        plan per branch that is on (:func:`crosslmm_ops.explain` of this module)."""
        check_call(hidden_states, memory, self.hidden_size, self.vision_size)
        visual_mask = check_mask("visual_mask", visual_mask, hidden_states)
        text_mask = check_mask("text_mask", text_mask, hidden_states)
        visual, text = _dcal_queries(memory, hidden_states, visual_mask, text_mask)
        kv = self.kv_source() if self.shares_kv else None
        return tuple(
            branch.plan_queries(hidden_states, memory, queries, kv)
            for branch, queries in ((self.v2v, visual), (self.t2v, text))
            if branch is not None
        )

    def extra_repr(self) -> str:
        parts = [f"v2v_scope={self.v2v_scope!r}"]
        if self.kv_path != "auto":
            parts.append(f"kv_path={self.kv_path!r}")
        if self.shares_kv:
            parts.append("share_kv=True")
        if self.shares_gate:
            parts.append("share_gate=True")
        return ", ".join(parts)


def _dcal_queries(memory: VisionMemory, hidden_states: torch.Tensor, visual_mask, text_mask):
    """The V2V and T2V query rows of one call, checked (memoised per forward: ``cached_plan``)."""
    B, L = hidden_states.shape[:2]

    def build():
        text = text_mask
        if text is None and visual_mask is not None:
            text = ~visual_mask
        # One host read for every count this call needs.
        columns = []
        if visual_mask is not None:
            columns.append(visual_mask.sum(1))
        if text is not None:
            columns.append(text.sum(1))
        if visual_mask is not None and text is not None:
            columns.append((visual_mask & text).sum(1))
        values = torch.stack(columns).tolist() if columns else []
        # Counts of positions: telling torch.compile so (they are symbolic there) lets the ops'
        # own checks (max_seqlen >= 0, ...) hold without a branch on the data.
        for count in (c for row in values for c in row):
            torch._check(count >= 0)
            torch._check(count <= L)
        visual_counts = values.pop(0) if visual_mask is not None else [0] * B
        text_counts = values.pop(0) if text is not None else [L] * B
        # A check, not a branch: torch.compile traces it (the counts are then symbolic) as an
        # assertion at run time instead of breaking the graph on it.
        for overlap in values[0] if values else ():
            torch._check_value(
                overlap == 0,
                lambda: (
                    "visual_mask and text_mask overlap: a position is either a pooled visual token "
                    "(V2V) or a text token (T2V)"
                ),
            )
        check_visual_counts("visual_mask", visual_counts, memory)
        visual = Queries(
            visual_counts, None if visual_mask is None else visual_mask.nonzero(as_tuple=True)
        )
        text_q = Queries(text_counts, None if text is None else text.nonzero(as_tuple=True))
        return visual, text_q

    return cached_plan(memory, ("dcal", B, L), (visual_mask, text_mask), build)
