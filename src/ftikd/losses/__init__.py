"""Loss functions as plain functions of tensors, reusable outside the engine.

One module per family: ``logit`` (KD, CKD), ``relational`` (RKD, RKD_d, DIST, SP, PKT, CC),
``contrastive`` (CRD), ``mixing`` (Mixup, CutMix with a fixed teacher), ``regression`` (logit MSE),
``feature`` (FitNets, VID, AT, FSP), ``online`` (DML, ONE) and ``vrm`` (VRM's edge sets).
Everything public is re-exported here, so ``from ftikd.losses import ckd_group_loss`` works
whatever file a loss lives in.
"""

from ftikd.losses.contrastive import (
    contrast_log_scores,
    crd_nce_loss,
    momentum_rows,
    nce_log_normalizer,
)
from ftikd.losses.feature import (
    at_loss,
    attention_map,
    fsp_loss,
    fsp_matrix,
    hint_loss,
    match_spatial,
    vid_loss,
)
from ftikd.losses.logit import (
    CKD_REDUCTIONS,
    REF_CLASSES,
    ckd_group_loss,
    ckd_inbatch_loss,
    ckd_terms,
    class_count_scale,
    class_scaled_mse,
    compare_groups,
    comparison_weights,
    group_split_sizes,
    kd_loss,
    logit_offset_loss,
)
from ftikd.losses.mixing import (
    cutmix_images,
    draw_cutmix_box,
    draw_mixing_weights,
    mix_images,
    mixed_label_ce,
    mixed_teacher_target,
    mixing_loss,
    soft_cross_entropy,
)
from ftikd.losses.online import (
    ensemble_kl_loss,
    gated_ensemble,
    mutual_kl_loss,
    sigmoid_rampup,
)
from ftikd.losses.regression import (
    logit_mse_loss,
)
from ftikd.losses.relational import (
    cc_loss,
    dist_loss,
    orthonormal_projection,
    pkt_loss,
    rkd_angle_loss,
    rkd_d_inbatch_loss,
    rkd_d_pair_loss,
    rkd_distance_loss,
    sp_loss,
)
from ftikd.losses.vrm import (
    edge_mse,
    icv_edges,
    isv_edges,
    joint_entropy_keep,
    two_view_cross_entropy,
    unit_differences,
    vrm_relation_losses,
    zscore_logits,
)

__all__ = [
    "CKD_REDUCTIONS",
    "REF_CLASSES",
    "class_count_scale",
    "class_scaled_mse",
    "at_loss",
    "attention_map",
    "cc_loss",
    "ckd_group_loss",
    "ckd_inbatch_loss",
    "ckd_terms",
    "compare_groups",
    "comparison_weights",
    "contrast_log_scores",
    "crd_nce_loss",
    "cutmix_images",
    "dist_loss",
    "ensemble_kl_loss",
    "draw_cutmix_box",
    "draw_mixing_weights",
    "fsp_loss",
    "fsp_matrix",
    "gated_ensemble",
    "group_split_sizes",
    "hint_loss",
    "kd_loss",
    "logit_mse_loss",
    "logit_offset_loss",
    "match_spatial",
    "mix_images",
    "mixed_label_ce",
    "mixed_teacher_target",
    "mixing_loss",
    "momentum_rows",
    "mutual_kl_loss",
    "nce_log_normalizer",
    "orthonormal_projection",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_d_inbatch_loss",
    "rkd_d_pair_loss",
    "rkd_distance_loss",
    "sigmoid_rampup",
    "soft_cross_entropy",
    "sp_loss",
    "vid_loss",
    "edge_mse",
    "icv_edges",
    "isv_edges",
    "joint_entropy_keep",
    "two_view_cross_entropy",
    "unit_differences",
    "vrm_relation_losses",
    "zscore_logits",
]
