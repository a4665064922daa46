"""A synthetic long-video question-answering task whose answer needs detail that pooling destroys
(the data of ``synthetic_task.py`` and ``train_distributed.py``, which import it from this folder).

Each video is ``T`` frames of random texture; one token of one frame holds a small *marker*. A
question asks for the marker's colour, its cell in the frame, or which frame holds it, and the
answer is a single token. The frames are rendered directly as the vision encoder's output tokens
(``vision_features (B, T, N, Dv)``, a ``grid x grid`` token grid of width ``Dv`` per frame), so a
model can be trained on a CPU in minutes without a vision tower. Every token of a frame is::

    x[t, i] = texture_scale * a[t]        the frame's texture (random, shared by its tokens)
            + noise_scale * e[t, i]       per-token noise
            + position_scale * p[i]       the cell's position embedding (fixed, like SigLIP's)

and the marker token additionally carries ``marker_scale * m + colour_scale * c[k]``: a marker
direction ``m`` and one of ``colours`` colour directions ``c[k]`` (``m`` and the ``c[k]`` are
orthonormal; ``p`` and the directions are fixed by ``basis_seed``, the same for every video, as a
frozen encoder would be). The frame index is *not* in the tokens: a frame-wise encoder does not
know where its frame sits in the video, so the order of frames reaches a model only through the
LLM's positions (and, for the DCAL's keys, through the frame's texture).

Why pooling loses it: averaging a frame's ``N`` tokens to one leaves ``1/N`` of the marker
(``colour_scale / N`` along ``c[k]``) under a texture of standard deviation ``texture_scale`` per
channel, while in the original tokens the marker stands ``marker_scale`` out of the background.
:meth:`MarkerVideoTask.pooled_snr` gives both ratios.

The text side: ``[bos] [video placeholders: T * pooled_per_frame] [question] [answer]``, the
labels -100 everywhere but the answer, so a causal-LM loss trains the answer only and the answer is
read (argmax of the LM head) at the question's position. Token ids: ``pad_id``, ``bos_id``, three
question tokens, then the answers (colours, cells, frames) in one contiguous range below
``video_token_id``; :attr:`MarkerVideoTask.vocab` lists them.
"""

from __future__ import annotations

import dataclasses
import math

import torch

QUESTIONS = ("colour", "cell", "frame")
IGNORE_INDEX = -100


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _non_negative(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class MarkerTaskConfig:
    """The task's shape and its signal levels (all scales are per-channel standard deviations or
    amplitudes along a unit direction).

    * ``frames`` ``T``, ``grid`` (a ``grid x grid`` token grid, ``N = grid**2`` tokens per frame),
      ``width`` ``Dv`` (the encoder's token width), ``colours`` (``K``, at most ``width - 1``);
    * ``questions``: which questions are asked (a subset of ``("colour", "cell", "frame")``), in
      equal shares;
    * ``texture_scale``, ``noise_scale``, ``position_scale``, ``marker_scale``, ``colour_scale``:
      see the module docstring;
    * ``basis_seed``: fixes the position embeddings and the marker/colour directions (the
      "encoder"); the videos themselves come from the generator given to :meth:`sample`.
    """

    frames: int = 8
    grid: int = 6
    width: int = 32
    colours: int = 8
    questions: tuple[str, ...] = QUESTIONS
    texture_scale: float = 1.0
    noise_scale: float = 0.5
    position_scale: float = 1.0
    marker_scale: float = 8.0
    colour_scale: float = 6.0
    basis_seed: int = 0

    def __post_init__(self):
        _positive_int("frames", self.frames)
        _positive_int("grid", self.grid)
        _positive_int("width", self.width)
        _positive_int("colours", self.colours)
        if self.colours + 1 > self.width:
            raise ValueError(
                f"colours ({self.colours}) + the marker direction need that many "
                f"orthonormal directions, more than width ({self.width})"
            )
        questions = (
            tuple(self.questions) if not isinstance(self.questions, str) else (self.questions,)
        )
        if (
            not questions
            or any(q not in QUESTIONS for q in questions)
            or len(set(questions)) != len(questions)
        ):
            raise ValueError(
                f"questions must be distinct names from {QUESTIONS}, got {self.questions!r}"
            )
        object.__setattr__(self, "questions", questions)
        for name in (
            "texture_scale",
            "noise_scale",
            "position_scale",
            "marker_scale",
            "colour_scale",
        ):
            _non_negative(name, getattr(self, name))
        if isinstance(self.basis_seed, bool) or not isinstance(self.basis_seed, int):
            raise ValueError(f"basis_seed must be an int, got {self.basis_seed!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid


@dataclasses.dataclass(frozen=True)
class MarkerVocab:
    """Token ids of the task (answers of each question in one contiguous range)."""

    pad_id: int
    bos_id: int
    video_token_id: int
    question_ids: dict[str, int]
    answer_offsets: dict[str, int]
    answer_counts: dict[str, int]

    def answer_id(self, question: str, index: int) -> int:
        return self.answer_offsets[question] + index

    @property
    def size_needed(self) -> int:
        """The smallest vocabulary (``video_token_id`` included) these ids fit in."""
        return (
            max(
                self.video_token_id,
                *(self.answer_offsets[q] + self.answer_counts[q] for q in self.answer_offsets),
            )
            + 1
        )


@dataclasses.dataclass
class MarkerBatch:
    """One batch of videos and questions.

    * ``vision_features (B, T, N, Dv)`` float32 - the encoder tokens;
    * ``input_ids``, ``labels`` ``(B, 3 + T * pooled_per_frame)`` - see the module docstring;
    * ``answer_ids (B,)`` - the answer token (``labels[:, -1]``); the model's prediction for it is
      the argmax of the logits at position ``-2`` (the question);
    * ``question (B,)`` - index into ``config.questions``; ``colour``, ``cell``, ``frame`` ``(B,)``
      - the marker's ground truth, whatever was asked.
    """

    vision_features: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_ids: torch.Tensor
    question: torch.Tensor
    colour: torch.Tensor
    cell: torch.Tensor
    frame: torch.Tensor

    def to(self, device, dtype: torch.dtype | None = None) -> "MarkerBatch":
        """The batch on ``device`` (``dtype``: of ``vision_features`` only)."""
        out = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        if dtype is not None:
            out["vision_features"] = out["vision_features"].to(dtype)
        return MarkerBatch(**out)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class MarkerVideoTask:
    """The task: :meth:`sample` draws batches; :attr:`vocab` says the token ids.

    ``video_token_id`` is the model's placeholder id (every other id of the task is below it);
    ``pad_id`` / ``bos_id`` the model's. ``first_free_id`` is the first id the task may use for
    its question and answer tokens (after the model's special tokens).
    """

    def __init__(
        self,
        config: MarkerTaskConfig | None = None,
        *,
        video_token_id: int,
        pad_id: int = 0,
        bos_id: int = 1,
        first_free_id: int = 3,
    ):
        self.config = config = config if config is not None else MarkerTaskConfig()
        if not isinstance(config, MarkerTaskConfig):
            raise ValueError(f"config must be a MarkerTaskConfig, got {type(config).__name__}")
        for name, value in (
            ("video_token_id", video_token_id),
            ("pad_id", pad_id),
            ("bos_id", bos_id),
            ("first_free_id", first_free_id),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        counts = {"colour": config.colours, "cell": config.tokens_per_frame, "frame": config.frames}
        question_ids = {q: first_free_id + i for i, q in enumerate(QUESTIONS)}
        offsets, nxt = {}, first_free_id + len(QUESTIONS)
        for q in QUESTIONS:
            offsets[q] = nxt
            nxt += counts[q]
        if nxt > video_token_id:
            raise ValueError(
                f"the task's {nxt - first_free_id} question and answer tokens "
                f"(from id {first_free_id}) run into video_token_id "
                f"({video_token_id}): use fewer frames, cells or colours, or a "
                "larger vocabulary"
            )
        if pad_id >= first_free_id or bos_id >= first_free_id or pad_id == bos_id:
            raise ValueError(
                f"pad_id ({pad_id}) and bos_id ({bos_id}) must be distinct ids below "
                f"first_free_id ({first_free_id})"
            )
        self.vocab = MarkerVocab(
            pad_id=pad_id,
            bos_id=bos_id,
            video_token_id=video_token_id,
            question_ids=question_ids,
            answer_offsets=offsets,
            answer_counts=counts,
        )
        # The fixed "encoder": orthonormal marker and colour directions, position embeddings.
        gen = torch.Generator().manual_seed(config.basis_seed)
        basis, _ = torch.linalg.qr(
            torch.randn(config.width, config.width, generator=gen, dtype=torch.float64)
        )
        self.marker_direction = basis[:, 0].float()
        self.colour_directions = basis[:, 1 : 1 + config.colours].T.contiguous().float()  # (K, Dv)
        self.position_embeddings = torch.randn(
            config.tokens_per_frame, config.width, generator=gen
        )  # (N, Dv)

    # ------------------------------------------------------------------------------------------

    def sequence_length(self, pooled_per_frame: int) -> int:
        """``input_ids``' length for a model that puts ``pooled_per_frame`` tokens per frame."""
        return 3 + self.config.frames * _positive_int("pooled_per_frame", pooled_per_frame)

    def pooled_snr(self) -> dict[str, float]:
        """How far the marker's colour stands out of the background along its colour direction
        (amplitude / background standard deviation along that direction), in one original token
        and in the mean of a frame's ``N`` tokens (pooling to one token per frame)."""
        c = self.config
        N = c.tokens_per_frame
        # Along a unit direction: texture and noise contribute their per-channel std; the
        # position embeddings are fixed per cell (a standard normal per channel, so spread 1 over
        # cells) and their mean over the frame is the same in every frame.
        token_std = math.sqrt(c.texture_scale**2 + c.noise_scale**2 + c.position_scale**2)
        pooled_std = math.sqrt(c.texture_scale**2 + c.noise_scale**2 / N)
        return {
            "token": c.colour_scale / token_std,
            "pooled_1_per_frame": c.colour_scale / N / max(pooled_std, 1e-30),
        }

    def sample(
        self,
        batch_size: int,
        pooled_per_frame: int,
        generator: torch.Generator,
        question: str | None = None,
    ) -> MarkerBatch:
        """``batch_size`` videos and questions drawn with ``generator`` (a CPU
        ``torch.Generator``: the same seed gives the same batch on any machine, whatever device
        the batch is moved to). ``question``: ask only this one (default: the config's questions
        in equal shares, shuffled). ``pooled_per_frame``: placeholders per frame in
        ``input_ids``."""
        _positive_int("batch_size", batch_size)
        _positive_int("pooled_per_frame", pooled_per_frame)
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(
                "generator must be a CPU torch.Generator (so the data do not depend on the device)"
            )
        c, v = self.config, self.vocab
        if question is not None and question not in c.questions:
            raise ValueError(f"question must be one of {c.questions}, got {question!r}")
        B, T, N, D = batch_size, c.frames, c.tokens_per_frame, c.width
        # Draw in a fixed order so every field is reproducible from the seed alone.
        textures = torch.randn(B, T, 1, D, generator=generator)
        noise = torch.randn(B, T, N, D, generator=generator)
        colour = torch.randint(0, c.colours, (B,), generator=generator)
        cell = torch.randint(0, N, (B,), generator=generator)
        frame = torch.randint(0, T, (B,), generator=generator)
        if question is None:
            # Equal shares, then shuffled: every batch holds every question.
            reps = -(-B // len(c.questions))
            asked = torch.arange(len(c.questions)).repeat(reps)[:B]
            asked = asked[torch.randperm(B, generator=generator)]
        else:
            asked = torch.full((B,), c.questions.index(question), dtype=torch.long)

        x = (
            c.texture_scale * textures
            + c.noise_scale * noise
            + c.position_scale * self.position_embeddings
        )
        marker = (
            c.marker_scale * self.marker_direction + c.colour_scale * self.colour_directions[colour]
        )  # (B, D)
        rows = torch.arange(B)
        x[rows, frame, cell] += marker

        # Answer token of each sample for the question it was asked.
        names = [c.questions[i] for i in asked.tolist()]
        truth = {"colour": colour, "cell": cell, "frame": frame}
        answer_ids = torch.tensor(
            [v.answer_id(q, int(truth[q][b])) for b, q in enumerate(names)], dtype=torch.long
        )
        question_ids = torch.tensor([v.question_ids[q] for q in names], dtype=torch.long)
        L = self.sequence_length(pooled_per_frame)
        input_ids = torch.full((B, L), v.video_token_id, dtype=torch.long)
        input_ids[:, 0] = v.bos_id
        input_ids[:, -2] = question_ids
        input_ids[:, -1] = answer_ids
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        labels[:, -1] = answer_ids
        return MarkerBatch(
            vision_features=x,
            input_ids=input_ids,
            labels=labels,
            answer_ids=answer_ids,
            question=asked,
            colour=colour,
            cell=cell,
            frame=frame,
        )

    def chance(self, question: str) -> float:
        """The accuracy of a uniform guess among the answers of ``question``."""
        return 1.0 / self.vocab.answer_counts[question]


__all__ = [
    "IGNORE_INDEX",
    "QUESTIONS",
    "MarkerBatch",
    "MarkerTaskConfig",
    "MarkerVideoTask",
    "MarkerVocab",
]
