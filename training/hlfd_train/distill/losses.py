"""Loss primitives for segmentation and distillation; all accept 2D (N,C,H,W) and 3D (N,C,D,H,W).

Conventions: every distance is a mean over the batch, so loss scales do not depend on batch
size; whenever two maps differ in size, the *first* (student) argument is resized to the second
(teacher) argument's grid unless a caller resizes beforehand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss

_LINEAR_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}


def _check_dense(x: torch.Tensor, what: str) -> None:
    if x.ndim not in _LINEAR_MODES:
        raise ValueError(
            f"{what}: expected (N, C, *spatial) with 1-3 spatial dims, got {tuple(x.shape)}"
        )


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``x`` (N,C,*spatial) to ``size``: area averaging when shrinking, else (bi/tri)linear.

    Parameter-free and differentiable; a no-op when the size already matches.
    """
    _check_dense(x, "resize_to")
    size = tuple(int(s) for s in size)
    if len(size) != x.ndim - 2:
        raise ValueError(f"resize_to: size {size} does not match spatial dims of {tuple(x.shape)}")
    if tuple(x.shape[2:]) == size:
        return x
    if all(t <= s for t, s in zip(size, x.shape[2:], strict=True)):
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=_LINEAR_MODES[x.ndim], align_corners=False)


def normalize_map(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide each sample's map by its L2 norm over all non-batch elements."""
    norm = m.flatten(1).norm(p=2, dim=1).clamp_min(eps)
    return m / norm.view(-1, *([1] * (m.ndim - 1)))


def attention_map(feat: torch.Tensor, p: float = 2.0, normalize: bool = True) -> torch.Tensor:
    """Spatial attention map (N,1,*spatial) = mean over channels of ``|F|**p``.

    With ``normalize`` the map of each sample has unit L2 norm (Zagoruyko & Komodakis 2017).
    """
    _check_dense(feat, "attention_map")
    m = feat.abs().pow(p).mean(dim=1, keepdim=True)
    return normalize_map(m) if normalize else m


def attention_distance(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between normalised maps of equal shape, summed per sample, batch mean.

    For unit-norm maps it lies in [0, 4] at any resolution (it is Zagoruyko's
    ``(a - b).pow(2).mean()`` multiplied by the number of positions).
    """
    if student_map.shape != teacher_map.shape:
        raise ValueError(
            f"attention maps differ in shape: student {tuple(student_map.shape)}, "
            f"teacher {tuple(teacher_map.shape)}"
        )
    return (student_map - teacher_map).pow(2).flatten(1).sum(dim=1).mean()


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer between two feature maps (channel counts may differ).

    The student's raw map is resized to the teacher's grid before both are normalised.
    """
    s = attention_map(student_feat, p, normalize=False)
    t = attention_map(teacher_feat, p, normalize=False)
    s = resize_to(s, t.shape[2:])
    return attention_distance(normalize_map(s), normalize_map(t))


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str) -> torch.Tensor:
    _check_dense(student, what)
    _check_dense(teacher, what)
    if student.shape[:2] != teacher.shape[:2] or student.ndim != teacher.ndim:
        raise ValueError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "must agree in batch size, channels and number of spatial dims"
        )
    return resize_to(student, teacher.shape[2:])


def kl_from_probs(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T**2 * mean over voxels of KL(teacher || softmax(student / T))`` over the class axis.

    ``teacher_probs`` are already-softened class probabilities (they sum to 1 over dim 1).
    """
    s = _check_pair(student_logits, teacher_probs, "kl_from_probs")
    log_ps = F.log_softmax(s / temperature, dim=1)
    kl = torch.special.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_ps
    return kl.sum(dim=1).mean() * temperature**2


def kl_pixelwise(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Pixel-wise Hinton KD: KL over the class channel of every voxel, ``* T**2``, voxel mean."""
    _check_dense(teacher_logits, "kl_pixelwise")
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)
    return kl_from_probs(student_logits, teacher_probs, temperature)


def cwd_loss(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Channel-wise distillation (Shu et al. 2021).

    Each channel becomes a distribution over spatial positions (softmax of ``F / T``);
    the loss is ``T**2 * KL(teacher || student)`` averaged over batch and channels.
    Channel counts must match (project the student first).
    """
    s = _check_pair(student_feat, teacher_feat, "cwd_loss").flatten(2)
    t = teacher_feat.flatten(2)
    log_ps = F.log_softmax(s / temperature, dim=2)
    log_pt = F.log_softmax(t / temperature, dim=2)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=2)
    return kl.mean() * temperature**2


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    focal_gamma: float = 2.0,
    focal_weight: float = 0.5,
    dice_weight: float = 0.5,
    include_background: bool = False,
) -> torch.Tensor:
    """``focal_weight * focal + dice_weight * soft Dice`` (MONAI losses).

    ``logits``: (N,C,*spatial); ``target``: integer labels (N,*spatial) or (N,1,*spatial).
    C > 1: softmax focal loss summed over classes, averaged over voxels (the usual per-voxel
    focal loss; MONAI's own mean would also divide by C), and soft Dice on softmax
    probabilities, without the background channel unless ``include_background``.
    C == 1: sigmoid focal and sigmoid Dice on a binary target.
    """
    _check_dense(logits, "segmentation_loss logits")
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if (
        target.ndim != logits.ndim
        or target.shape[1] != 1
        or (target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:])
    ):
        raise ValueError(
            f"segmentation_loss target: shape {tuple(target.shape)} does not match logits "
            f"{tuple(logits.shape)} (expected (N,*spatial) or (N,1,*spatial) labels)"
        )
    n_classes = logits.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= max(n_classes, 2)):
        raise ValueError(
            f"segmentation_loss target: labels span [{int(target.min())}, {int(target.max())}] "
            f"but logits have {n_classes} channel(s)"
        )
    target = target.to(logits.dtype)
    if n_classes == 1:
        focal = FocalLoss(gamma=focal_gamma, reduction="mean")(logits, target)
        dice = DiceLoss(sigmoid=True)(logits, target)
    else:
        focal_map = FocalLoss(
            gamma=focal_gamma, to_onehot_y=True, use_softmax=True, reduction="none"
        )(logits, target)
        focal = focal_map.sum(dim=1).mean()
        dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=include_background)(
            logits, target
        )
    return focal_weight * focal + dice_weight * dice
