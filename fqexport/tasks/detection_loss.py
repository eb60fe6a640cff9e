"""A detector's own training loss on its decoded output, for fine-tuning when the data has boxes.

Any model whose output is in a :mod:`~fqexport.tasks.detection` layout is trained the same way,
without knowing its anchors or strides: positives and their soft targets are assigned once, from
the float model's own detections of the fitted images (YOLOv8's task-aligned assigner, on decoded
boxes).

Assignment, per image and ground-truth box g of class c (xyxy pixels), over the anchors k of the
float model's output with box b_k and class-c score s_kc (YOLOv5: objectness · p_c):

    candidates: anchors whose box centre lies inside g;
    alignment:  a_kg = s_kc^α · IoU(b_k, g)^β        (α = 0.5, β = 6, YOLOv8's);
    positives:  the ``topk`` candidates of largest a_kg > 0 (the anchor of largest IoU when
                none is a candidate); an anchor positive for two boxes keeps the larger IoU;
    target:     YOLOv8 layout: t_k = a_kg / max_j a_jg · max_j IoU(b_j, g) (over g's positives j);
                YOLOv5 layout: t_k = IoU(b_k, g) (YOLOv5's objectness target),

so the float model's positives aim at what it already does well (its best anchor of a box at
that box's IoU), not at a new assignment to learn: fine-tuning the float model itself with this
loss keeps its mAP (``benchmarks/detection_bench.py --part finetune``).

Loss per image, over positives P (box g_k of class c_k, target t_k) and the student's output
(box b_k, class probabilities p_kc, YOLOv5's objectness o_k), BCE of probabilities, T = max(Σ_P t_k, 1):

    ℓ = 5 · Σ_{k∈P} t_k (1 − DIoU(b_k, g_k)) / Σ_{k∈P} t_k
        + [v8] Σ_k Σ_c BCE(p_kc, t_k · 1[k∈P, c=c_k]) / T
        + [v5] (Σ_{k∈P} t_k Σ_c BCE(p_kc, 1[c=c_k]) + Σ_k BCE(o_k, t_k · 1[k∈P])) / T,

DIoU = IoU − ρ²/c² (centre distance over the enclosing box's diagonal: it still moves a box that
no longer overlaps its target): YOLOv8's loss with DIoU for CIoU and without its DFL term (the
decoded output has no bin distribution), and YOLOv5's with its objectness target t_k.

The targets of an image are one ``[K, 6]`` array (class or −1, t_k, then the assigned box's cx,
cy, w, h in pixels), so a batch's are ``targets[index]`` like a classifier's labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fqexport.metrics.boxes import box_iou, paired_diou_xywh, xywh_to_xyxy

ALPHA, BETA = 0.5, 6.0  # the alignment's exponents (YOLOv8's task-aligned assigner)
TOPK = 10
BOX_GAIN = 5.0
_EPS = 1e-6


def _xywh(b: torch.Tensor) -> torch.Tensor:
    return torch.cat(((b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]), -1)


def assign(pred_xywh: torch.Tensor, pred_scores: torch.Tensor, gt_xyxy: torch.Tensor, gt_labels: torch.Tensor,
           topk: int = TOPK, objectness: bool = False) -> torch.Tensor:
    """One image's targets ``[K, 6]`` (module docstring) from the float model's boxes ``[K, 4]``
    (cx, cy, w, h) and class scores ``[K, C]`` and the ground truth ``[G, 4]`` xyxy, ``[G]``."""
    k = pred_xywh.shape[0]
    targets = torch.full((k, 6), -1.0)
    targets[:, 1] = 0.0
    if gt_xyxy.numel() == 0 or k == 0:
        return targets
    iou = torch.from_numpy(box_iou(gt_xyxy.numpy(), xywh_to_xyxy(pred_xywh.numpy()))).float()  # [G, K]
    cx, cy = pred_xywh[:, 0], pred_xywh[:, 1]
    inside = ((cx[None] > gt_xyxy[:, 0:1]) & (cx[None] < gt_xyxy[:, 2:3])
              & (cy[None] > gt_xyxy[:, 1:2]) & (cy[None] < gt_xyxy[:, 3:4]))
    score = pred_scores[:, gt_labels].T.clamp_min(0)  # [G, K]: s_kc of each box's class
    align = torch.where(inside & (iou > 0), score.pow(ALPHA) * iou.pow(BETA), torch.zeros_like(iou))
    top = align.topk(min(topk, k), dim=1)
    positive = torch.zeros_like(iou, dtype=torch.bool)
    positive.scatter_(1, top.indices, top.values > 0)
    lonely = ~positive.any(1)  # no candidate: the anchor of largest IoU
    positive[lonely, iou[lonely].argmax(1)] = True
    # an anchor positive for several boxes keeps the one it overlaps most
    owner = torch.where(positive, iou, torch.full_like(iou, -1.0)).argmax(0)  # [K]
    taken = positive.any(0)
    positive &= torch.arange(len(gt_xyxy))[:, None] == owner[None, :]
    # t_k = a_kg / max_j a_jg · max_j IoU_jg over g's positives (a lonely box's anchor: its IoU)
    a = torch.where(positive, align, torch.zeros_like(align))
    best_iou = torch.where(positive, iou, torch.zeros_like(iou)).amax(1, keepdim=True)
    soft = torch.where(a.amax(1, keepdim=True) > 0, a / a.amax(1, keepdim=True).clamp_min(1e-12), positive.float())
    # YOLOv5's objectness aims at each positive's own IoU; YOLOv8's scores at the aligned target
    t = torch.where(positive, iou, torch.zeros_like(iou)) if objectness else soft * best_iou
    t = t.amax(0)  # [K]: each positive anchor has one owner
    targets[taken, 0] = gt_labels[owner[taken]].float()
    targets[taken, 1] = t[taken]
    targets[taken, 2:] = _xywh(gt_xyxy[owner[taken]])
    return targets


def _bce(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(p.clamp(_EPS, 1 - _EPS), target, reduction="none")


def train_loss(rows: torch.Tensor, targets: torch.Tensor, objectness: bool) -> torch.Tensor:
    """ℓ per image, ``[B]`` (module docstring), of outputs as rows ``[B, K, 4 + …]`` (cx, cy, w,
    h, [objectness,] classes) and targets ``[B, K, 6]``; ``objectness``: YOLOv5's layout."""
    label = targets[..., 0]
    pos = label >= 0
    t = torch.where(pos, targets[..., 1], torch.zeros_like(targets[..., 1]))  # t_k, 0 off the positives
    total = t.sum(-1)
    box = (t * (1 - paired_diou_xywh(rows[..., :4], targets[..., 2:]))).sum(-1) / total.clamp_min(_EPS)
    probs = rows[..., 5:] if objectness else rows[..., 4:]
    onehot = F.one_hot(label.clamp_min(0).long(), probs.shape[-1]).to(probs.dtype) * pos[..., None]
    if objectness:  # classes at the positives (one-hot, weighted by t_k), objectness everywhere (t_k)
        cls = (_bce(probs, onehot).sum(-1) * t).sum(-1) + _bce(rows[..., 4], t).sum(-1)
    else:  # classes everywhere (t_k at the positive's class)
        cls = _bce(probs, onehot * t[..., None]).sum((-1, -2))
    return BOX_GAIN * box + cls / total.clamp_min(1.0)
