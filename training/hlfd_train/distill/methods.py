"""The registered distillation methods.

Common rules (see the "Distillation design" section of ARCHITECTURE.md):

* Adapters (1x1 projections, auxiliary class heads) are created once, in ``__init__``, on the
  student side; teacher tensors are detached and never pass through a trainable layer.
* A method's ``weight`` is its total weight: terms over several stages share it equally.
* Generic methods (``kd``, ``at``, ``fitnet``, ``deep``, ``cwd``) resize the student tensor to
  the teacher's grid when they differ. The feedback methods (``ifd``, ``hifd``, ``hlfd``)
  compare at the student tap's own resolution instead: the teacher targets (attention maps,
  class logits) are resized there with parameter-free interpolation, because a deep teacher
  stage is much smaller than the shallow student stage it supervises.

Baselines follow the authors' code (vangorade/RethinkingKD_ISBI24, ``train_kd.py``): ``kd``
(alpha 0.1 x T**2), ``at`` (``attn_kd``: p=4 on e5), ``deep`` (``deep_kd``, their DKD), ``ifd``
(``cat_feedback_ours``, labelled IFD there), ``hifd`` (``indv_feedback``, labelled HIFD there),
``fitnet`` (Romero et al.: hint stage, then task stage). Two defects of that code are fixed
everywhere, not copied: its 1x1 projections are new random convolutions at every call (never
trained), and its KL is taken over ``.view(-1, 2)`` of many-channel tensors (pairs of
neighbouring values, not the class or channel distribution). Variants that are not the
published baselines are registered under names that say so (``deep_mse``, ``flfd_individual``,
``flfd_unified``) or are options (``at`` with ``p``/``stages``, ``fitnet`` with
``schedule: joint``); ``docs/reproduce.md`` lists every difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .losses import (
    at_loss,
    attention_distance,
    attention_map,
    cwd_loss,
    kl_from_probs,
    kl_pixelwise,
    normalize_map,
    resize_to,
)
from .method_registry import DistillMethod, register_method

ENCODER = ("e1", "e2", "e3", "e4", "e5")
DECODER = ("d5", "d4", "d3", "d2")


def _nonempty(method: DistillMethod, key: str) -> tuple[str, ...]:
    stages = method.config[key]
    if not stages:
        raise ValueError(f"distillation method {method.name!r}: {key!r} must not be empty")
    return stages


def unified_attention_target(
    teacher_feats: Sequence[torch.Tensor], size: Sequence[int], p: float
) -> torch.Tensor:
    """One-channel attention target (N,1,*size) from several teacher stages.

    Each stage's map ``mean_c |F|**p`` is resized to ``size``, normalised to unit L2 norm, the
    maps are stacked along the channel axis (N,k,*size) and reduced by their mean, which is
    normalised again: every stage contributes equally, whatever its activation scale.
    """
    maps = [
        normalize_map(resize_to(attention_map(f, p, normalize=False), size)) for f in teacher_feats
    ]
    return normalize_map(torch.cat(maps, dim=1).mean(dim=1, keepdim=True))


def feedback_attention_target(
    teacher_feat: torch.Tensor, size: Sequence[int], p: float
) -> torch.Tensor:
    """Teacher attention map resized (parameter-free, usually upsampled) to ``size``, normalised."""
    return normalize_map(resize_to(attention_map(teacher_feat, p, normalize=False), size))


def _student_attention(student_feat: torch.Tensor, p: float) -> torch.Tensor:
    return attention_map(student_feat, p, normalize=True)


@register_method("none")
class NoDistillation(DistillMethod):
    """Plain student training: no distillation term."""

    def compute(self, student, teacher, student_logits, teacher_logits):
        return {}


@register_method("kd")
class PixelwiseKD(DistillMethod):
    """Hinton KD on every voxel: ``weight * T**2 * KL(p_t || p_s)`` over the class channel.

    Defaults are the authors' (``alpha = 0.1``, T = 4, the ``T**2`` factor inside the KL term).
    A weight of 1 (x T**2 = 16 against the task loss) made the student copy the teacher's
    background-heavy soft labels and lose the tumour.
    """

    defaults: ClassVar[dict[str, Any]] = {"weight": 0.1, "temperature": 4.0}

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        self.positive("temperature")
        self.non_negative("weight")

    def needs_logits(self) -> bool:
        return True

    def compute(self, student, teacher, student_logits, teacher_logits):
        loss = kl_pixelwise(student_logits, teacher_logits, self.config["temperature"])
        return {"kd": self.config["weight"] * loss}


@register_method("at")
class AttentionTransfer(DistillMethod):
    """Attention transfer (Zagoruyko & Komodakis 2017) on matched stages, exponent ``p``.

    Defaults are the authors' baseline (``attn_kd``: ``L_seg + AT(s_e5, t_e5)``, p = 4). The
    former default, p = 2 on e1..e5 (``p: 2.0, stages: [e1, e2, e3, e4, e5]``), is an ablation.
    """

    defaults: ClassVar[dict[str, Any]] = {"weight": 1.0, "p": 4.0, "stages": ("e5",)}

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        self.positive("p")
        self.non_negative("weight")
        self.stages = _nonempty(self, "stages")

    def required_taps(self):
        return self.stages, self.stages

    def compute(self, student, teacher, student_logits, teacher_logits):
        w = self.config["weight"] / len(self.stages)
        return {
            f"at_{s}": w * at_loss(student[s], teacher[s], self.config["p"]) for s in self.stages
        }


class _ProjectedMSE(DistillMethod):
    """Student feature -> 1x1 conv adapter (student -> teacher channels) -> MSE to teacher."""

    prefix: ClassVar[str] = ""

    def _build(self, stages: tuple[str, ...]) -> None:
        self.non_negative("weight")
        self.stages = stages
        self.adapters = nn.ModuleDict(
            {
                s: self.conv1x1(self.channels("student", s), self.channels("teacher", s))
                for s in stages
            }
        )

    def required_taps(self):
        return self.stages, self.stages

    def compute(self, student, teacher, student_logits, teacher_logits):
        w = self.config["weight"] / len(self.stages)
        terms = {}
        for s in self.stages:
            t = teacher[s]
            projected = resize_to(self.adapters[s](student[s]), t.shape[2:])
            terms[f"{self.prefix}_{s}"] = w * F.mse_loss(projected, t)
        return terms


@register_method("fitnet")
class FitNet(_ProjectedMSE):
    """FitNets (Romero et al. 2015): hint at one middle stage through a trained 1x1 regressor.

    ``schedule: two-stage`` (default, as published): the hint term is on for the first
    ``hint_steps`` training steps (stage 1) and off afterwards (stage 2: the task loss alone).
    The step count is a buffer saved with the run, so a resumed run stays in its stage.
    Difference from Romero: the engine adds the task loss in stage 1 too (theirs trains the
    layers up to the hint with the hint alone). ``schedule: joint`` keeps the hint at every
    step (this project's earlier ``fitnet``): an ablation.
    """

    defaults: ClassVar[dict[str, Any]] = {
        "weight": 1.0,
        "hint": "e3",
        "schedule": "two-stage",
        "hint_steps": 1000,
    }
    prefix = "fitnet"

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        if self.config["schedule"] not in ("two-stage", "joint"):
            raise ValueError("distillation method 'fitnet': 'schedule' is two-stage or joint")
        self.non_negative("hint_steps")
        self._build((self.config["hint"],))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def in_hint_stage(self) -> bool:
        """Whether the next call belongs to stage 1 (always, for the joint schedule)."""
        c = self.config
        return c["schedule"] == "joint" or int(self.steps_done) < c["hint_steps"]

    def compute(self, student, teacher, student_logits, teacher_logits):
        hint = self.in_hint_stage()
        self.steps_done += 1
        terms = super().compute(student, teacher, student_logits, teacher_logits)
        # stage 2: the term stays in the graph at zero weight (same log columns, DDP-safe)
        return terms if hint else {k: 0.0 * v for k, v in terms.items()}


@register_method("deep_mse")
class LayerToLayerMSE(_ProjectedMSE):
    """Ablation (this project's earlier ``deep``): MSE at every stage through 1x1 adapters.

    Not the authors' DKD (see ``deep``).
    """

    defaults: ClassVar[dict[str, Any]] = {"weight": 1.0, "stages": ENCODER + DECODER}
    prefix = "deep_mse"

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        self._build(_nonempty(self, "stages"))


class _AuthorsComposite(DistillMethod):
    """Base of the authors' composite baselines: ``kl_weight * sum(KL terms at T) + at_weight *
    sum(AT terms, exponent p)`` (their ``alpha = 0.1``, ``beta1 = 0.9``; terms summed, as in
    ``train_kd.py``). KL terms compare student-side 1x1 projections (created once, trained) with
    teacher tensors over the whole channel axis; the student side is resized to the teacher's
    grid, as the authors do."""

    defaults: ClassVar[dict[str, Any]] = {
        "kl_weight": 0.1,
        "at_weight": 0.9,
        "p": 4.0,
        "temperature": 4.0,
    }

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        self.positive("p", "temperature")
        self.non_negative("kl_weight", "at_weight")

    def needs_logits(self) -> bool:
        return True

    def classes(self) -> int:
        return self.channels("teacher", "out")

    def kl(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Weighted ``T**2`` KL of the channel softmaxes at T (per voxel, voxel mean)."""
        t = self.config["temperature"]
        return self.config["kl_weight"] * kl_pixelwise(student, teacher, t)

    def at(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Weighted attention transfer, the student map resized to the teacher's grid."""
        return self.config["at_weight"] * at_loss(student, teacher, self.config["p"])


def concat_at_smallest(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Features resized (parameter-free) to the smallest grid among them, concatenated."""
    size = min((f.shape[2:] for f in feats), key=math.prod)
    return torch.cat([resize_to(f, size) for f in feats], dim=1)


@register_method("deep")
class DeepKD(_AuthorsComposite):
    """DKD as the authors ran it (``deep_kd``): AT on e1..e5 and KL on out, d5, d4, d3, d2.

    KL terms: student vs teacher logits; each student decoder stage through a trained 1x1
    projection to the teacher stage's channels, against that teacher stage (channel softmax at
    T). Their code compares the student's d5 with *itself* (``prediction_map_distillation(s_d5,
    s_d5)``, a term without signal); here it is compared with the teacher's d5.
    """

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        self.projections = nn.ModuleDict(
            {
                d: self.conv1x1(self.channels("student", d), self.channels("teacher", d))
                for d in DECODER
            }
        )

    def required_taps(self):
        return ENCODER + DECODER, ENCODER + DECODER

    def compute(self, student, teacher, student_logits, teacher_logits):
        terms = {"dkd_kl_out": self.kl(student_logits, teacher_logits)}
        for d in DECODER:
            terms[f"dkd_kl_{d}"] = self.kl(self.projections[d](student[d]), teacher[d])
        for e in ENCODER:
            terms[f"dkd_at_{e}"] = self.at(student[e], teacher[e])
        return terms


@register_method("ifd")
class ConcatFeedback(_AuthorsComposite):
    """IFD as the authors ran it (``cat_feedback_ours``, labelled IFD in ``train_kd.py``).

    Pixel level: KL(student logits, teacher logits) + KL(student d5..d2 resized to the
    smallest of them, concatenated, through a trained 1x1 projection to the classes; teacher
    logits). Feature level: AT(s_e5, t_e5) + AT(student e1..e4 resized to the smallest and
    concatenated; teacher e5). Their projection is a new random conv at every call. The
    concatenated attention map is taken before the resize to the teacher e5 grid (theirs
    after; both parameter-free).
    """

    ENCODERS = ("e1", "e2", "e3", "e4")

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        width = sum(self.channels("student", d) for d in DECODER)
        self.projection = self.conv1x1(width, self.classes())

    def required_taps(self):
        return (*self.ENCODERS, "e5", *DECODER), ("e5",)

    def compute(self, student, teacher, student_logits, teacher_logits):
        joined = concat_at_smallest([student[d] for d in DECODER])
        encoders = concat_at_smallest([student[e] for e in self.ENCODERS])
        return {
            "ifd_kl_out": self.kl(student_logits, teacher_logits),
            "ifd_kl_decoders": self.kl(self.projection(joined), teacher_logits),
            "ifd_at_e5": self.at(student["e5"], teacher["e5"]),
            "ifd_at_encoders": self.at(encoders, teacher["e5"]),
        }


@register_method("hifd")
class IndividualFeedbackKD(_AuthorsComposite):
    """HIFD as the authors ran it (``indv_feedback``, labelled HIFD in ``train_kd.py``).

    Pixel level: KL of the student logits, and of student d4 and d2 through trained 1x1 class
    heads, each against the teacher logits. Feature level: AT of student e5, e2 and e4 against
    the teacher's e5 (student maps resized to the teacher e5 grid). Their heads are new random
    convs at every call.
    """

    HEADS = ("d4", "d2")
    RECEIVERS = ("e5", "e2", "e4")

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        self.heads = nn.ModuleDict(
            {d: self.conv1x1(self.channels("student", d), self.classes()) for d in self.HEADS}
        )

    def required_taps(self):
        return (*self.RECEIVERS, *self.HEADS), ("e5",)

    def compute(self, student, teacher, student_logits, teacher_logits):
        terms = {"hifd_kl_out": self.kl(student_logits, teacher_logits)}
        for d, head in self.heads.items():
            terms[f"hifd_kl_{d}"] = self.kl(head(student[d]), teacher_logits)
        for e in self.RECEIVERS:
            terms[f"hifd_at_{e}"] = self.at(student[e], teacher["e5"])
        return terms


@register_method("cwd")
class ChannelWise(DistillMethod):
    """Channel-wise distillation (Shu et al. 2021), applied where Shu et al. apply it.

    Their segmentation logits come from a head at 1/8 of the input resolution (PSPNet,
    DeepLab): by default both logit maps are area-pooled to ``logits_scale`` (1/8) of their
    size before each class channel becomes a spatial distribution (tau 1, weight 3: their
    setting; the benchmark tunes the weight). At full resolution on 3-class logits the loss is
    blind to the class balance and drove the tumour channel to zero. Feature ``stages`` may be
    added, each with a trained 1x1 adapter from student to teacher channels.
    """

    defaults: ClassVar[dict[str, Any]] = {
        "weight": 3.0,
        "temperature": 1.0,
        "logits": True,
        "logits_scale": 0.125,
        "stages": (),
    }

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        self.positive("temperature", "logits_scale")
        self.non_negative("weight")
        if self.config["logits_scale"] > 1:
            raise ValueError("distillation method 'cwd': 'logits_scale' must be <= 1")
        self.stages = self.config["stages"]
        if not self.stages and not self.config["logits"]:
            raise ValueError("distillation method 'cwd': set 'logits' or give 'stages'")
        self.adapters = nn.ModuleDict(
            {
                s: self.conv1x1(self.channels("student", s), self.channels("teacher", s))
                for s in self.stages
            }
        )

    def required_taps(self):
        return self.stages, self.stages

    def needs_logits(self) -> bool:
        return self.config["logits"]

    def pooled(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits area-pooled to ``logits_scale`` of their size (at least one voxel a side)."""
        scale = self.config["logits_scale"]
        return resize_to(logits, [max(1, round(n * scale)) for n in logits.shape[2:]])

    def compute(self, student, teacher, student_logits, teacher_logits):
        tau = self.config["temperature"]
        w = self.config["weight"] / (len(self.stages) + int(self.config["logits"]))
        terms = {
            f"cwd_{s}": w * cwd_loss(self.adapters[s](student[s]), teacher[s], tau)
            for s in self.stages
        }
        if self.config["logits"]:
            t = self.pooled(teacher_logits)
            terms["cwd_logits"] = w * cwd_loss(resize_to(student_logits, t.shape[2:]), t, tau)
        return terms


@register_method("flfd_individual")
class IndividualFeedback(DistillMethod):
    """Ablation (this project's earlier ``ifd``): HLFD's individual feature-level branch alone.

    The deepest teacher stage's attention -> each student stage, the teacher map upsampled
    (parameter-free) to each student stage's size. Not the authors' IFD (see ``ifd``).
    """

    defaults: ClassVar[dict[str, Any]] = {
        "weight": 1.0,
        "p": 4.0,
        "source": "e5",
        "targets": ("e2", "e3", "e4"),
    }

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        self.positive("p")
        self.non_negative("weight")
        self.targets = _nonempty(self, "targets")

    def required_taps(self):
        return self.targets, (self.config["source"],)

    def compute(self, student, teacher, student_logits, teacher_logits):
        p, w = self.config["p"], self.config["weight"] / len(self.targets)
        src = teacher[self.config["source"]]
        terms = {}
        for s in self.targets:
            target = feedback_attention_target(src, student[s].shape[2:], p)
            terms[f"flfd_individual_{s}"] = w * attention_distance(
                _student_attention(student[s], p), target
            )
        return terms


@register_method("flfd_unified")
class HierarchicalFeedback(DistillMethod):
    """Ablation (this project's earlier ``hifd``): HLFD's unified feature-level branch alone.

    The teacher stages' combined attention -> one student stage. Not the authors' HIFD (see
    ``hifd``).
    """

    defaults: ClassVar[dict[str, Any]] = {
        "weight": 1.0,
        "p": 4.0,
        "sources": ("e2", "e3", "e4"),
        "target": "e1",
    }

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        self.positive("p")
        self.non_negative("weight")
        self.sources = _nonempty(self, "sources")

    def required_taps(self):
        return (self.config["target"],), self.sources

    def compute(self, student, teacher, student_logits, teacher_logits):
        p = self.config["p"]
        s = student[self.config["target"]]
        target = unified_attention_target([teacher[t] for t in self.sources], s.shape[2:], p)
        return {
            "flfd_unified": self.config["weight"]
            * attention_distance(_student_attention(s, p), target)
        }


@register_method("hlfd")
class HLFD(DistillMethod):
    """Hierarchical Layer-selective Feedback Distillation (ISBI 2024) = FLFD + PLFD.

    FLFD (attention maps, exponent ``p``): unified teacher e2,e3,e4 -> student e1 (see
    :func:`unified_attention_target`); individual teacher e5 -> student e2, e3, e4.
    PLFD (KL at temperature ``T``): unified teacher d5,d4,d3 -> student d5: the three teacher
    decoder features are resized to the student d5 grid and concatenated (channels c5+c4+c3);
    a learned student-side 1x1 projection maps the student d5 to those channels, and the KL of
    the channel softmaxes at T compares them, so every teacher middle layer shapes the loss.
    Individual teacher output -> student d4, d3, d2 through student-side 1x1 auxiliary heads to
    class logits (the teacher's logits resized to each head's grid). Teacher targets never pass
    through a trainable layer.

    The authors' code builds its 1x1 projections anew (random, untrained) at every call and
    computes the KL over ``.view(-1, 2)`` of many-channel tensors; both are bugs not copied here.

    Every comparison is made at the student tap's resolution. Terms: ``flfd_unified``,
    ``flfd_individual``, ``plfd_unified``, ``plfd_individual``, each already multiplied by
    level weight x branch weight; ``individual_reduction`` "sum" (the authors': 0.5 x (L_e2 +
    L_e3 + L_e4)) or "mean" over the individual branches' three stages.
    Ablations: ``feature_level`` / ``pixel_level`` / ``unified`` / ``individual`` switches
    drop terms (and their taps and heads) without renormalising the remaining weights.
    ``num_classes`` 0 means "the channel count of the ``out`` tap".
    """

    LAYER_MAP: ClassVar[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
        # term: (teacher sources, student receivers)
        "flfd_unified": (("e2", "e3", "e4"), ("e1",)),
        "flfd_individual": (("e5",), ("e2", "e3", "e4")),
        "plfd_unified": (("d5", "d4", "d3"), ("d5",)),
        "plfd_individual": (("out",), ("d4", "d3", "d2")),
    }

    defaults: ClassVar[dict[str, Any]] = {
        "flfd_weight": 0.9,
        "plfd_weight": 0.1,
        "unified_weight": 0.5,
        "individual_weight": 0.5,
        "p": 4.0,
        "temperature": 4.0,
        "feature_level": True,
        "pixel_level": True,
        "unified": True,
        "individual": True,
        "num_classes": 0,
        "individual_reduction": "sum",
    }

    def __init__(self, teacher_channels, student_channels, spatial_dims, **cfg):
        super().__init__(teacher_channels, student_channels, spatial_dims, **cfg)
        c = self.config
        self.positive("p", "temperature")
        self.non_negative("flfd_weight", "plfd_weight", "unified_weight", "individual_weight")
        if not (c["feature_level"] or c["pixel_level"]) or not (c["unified"] or c["individual"]):
            raise ValueError(
                "distillation method 'hlfd': the ablation switches leave no term; use 'none'"
            )
        self.terms = tuple(
            term
            for term in self.LAYER_MAP
            if c["feature_level" if term.startswith("flfd") else "pixel_level"]
            and c["unified" if term.endswith("unified") else "individual"]
        )
        heads = sorted(
            {s for t in self.terms if t == "plfd_individual" for s in self.LAYER_MAP[t][1]},
            key=DECODER.index,
        )
        self.num_classes = 0
        if heads:
            self.num_classes = c["num_classes"] or self.channels("teacher", "out")
            if self.num_classes < 1:
                raise ValueError("distillation method 'hlfd': 'num_classes' must be >= 1")
        if c["individual_reduction"] not in ("sum", "mean"):
            raise ValueError("distillation method 'hlfd': 'individual_reduction' is sum or mean")
        self.aux_heads = nn.ModuleDict(
            {d: self.conv1x1(self.channels("student", d), self.num_classes) for d in heads}
        )
        self.unified_projection = None
        if "plfd_unified" in self.terms:
            sources, (receiver,) = self.LAYER_MAP["plfd_unified"]
            width = sum(self.channels("teacher", t) for t in sources)
            self.unified_projection = self.conv1x1(self.channels("student", receiver), width)

    def required_taps(self):
        student: list[str] = []
        teacher: list[str] = []
        for term in self.terms:
            sources, receivers = self.LAYER_MAP[term]
            student += [s for s in receivers if s not in student]
            teacher += [t for t in sources if t != "out" and t not in teacher]
        return tuple(student), tuple(teacher)

    def needs_logits(self) -> bool:
        return "plfd_individual" in self.terms

    def aux_logits(self, student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Class logits of the student decoder stages through the auxiliary heads."""
        return {d: head(student[d]) for d, head in self.aux_heads.items()}

    def targets(
        self,
        student: dict[str, torch.Tensor],
        teacher: dict[str, torch.Tensor],
        teacher_logits: torch.Tensor | None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Teacher-side targets per term and receiving student tap (no trainable op).

        FLFD targets are unit-norm attention maps (N,1,*student size); unified PLFD targets
        are channel softmaxes at temperature T of the concatenated teacher d5, d4, d3 features
        (N,c5+c4+c3,*student size); individual PLFD targets are class probabilities at T.
        """
        p, tau = self.config["p"], self.config["temperature"]
        out: dict[str, dict[str, torch.Tensor]] = {}
        for term in self.terms:
            sources, receivers = self.LAYER_MAP[term]
            out[term] = {}
            for r in receivers:
                size = student[r].shape[2:]
                if term == "flfd_unified":
                    tgt = unified_attention_target([teacher[t] for t in sources], size, p)
                elif term == "flfd_individual":
                    tgt = feedback_attention_target(teacher[sources[0]], size, p)
                elif term == "plfd_unified":
                    joined = torch.cat([resize_to(teacher[t].float(), size) for t in sources], 1)
                    tgt = F.softmax(joined / tau, dim=1)
                else:
                    tgt = F.softmax(resize_to(teacher_logits, size) / tau, dim=1)
                out[term][r] = tgt
        return out

    def compute(self, student, teacher, student_logits, teacher_logits):
        c = self.config
        if (
            teacher_logits is not None
            and self.needs_logits()
            and teacher_logits.shape[1] != self.num_classes
        ):
            raise ValueError(
                f"distillation method 'hlfd': teacher logits have {teacher_logits.shape[1]} "
                f"channels, the auxiliary heads {self.num_classes}"
            )
        targets = self.targets(student, teacher, teacher_logits)
        aux = self.aux_logits(student)
        terms = {}
        for term, per_tap in targets.items():
            level = c["flfd_weight"] if term.startswith("flfd") else c["plfd_weight"]
            branch = c["unified_weight"] if term.endswith("unified") else c["individual_weight"]
            losses = []
            for r, tgt in per_tap.items():
                if term.startswith("flfd"):
                    losses.append(attention_distance(_student_attention(student[r], c["p"]), tgt))
                elif term == "plfd_unified":
                    projected = self.unified_projection(student[r])
                    losses.append(kl_from_probs(projected, tgt, c["temperature"]))
                else:
                    losses.append(kl_from_probs(aux[r], tgt, c["temperature"]))
            stacked = torch.stack(losses)
            summed = term.endswith("individual") and c["individual_reduction"] == "sum"
            terms[term] = level * branch * (stacked.sum() if summed else stacked.mean())
        return terms
