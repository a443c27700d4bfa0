"""Loss functions as plain functions of tensors, reusable outside the engine.

One module per family (``logit``: KD and CKD; the others hold the relational, contrastive,
mixing and feature losses); everything public is re-exported here, so ``from ftikd.losses import
ckd_loss`` works whatever file a loss lives in.
"""

from ftikd.losses.logit import (
    ckd_group_loss,
    ckd_inbatch_loss,
    ckd_terms,
    compare_groups,
    comparison_weights,
    group_split_sizes,
    kd_loss,
    logit_offset_loss,
)

__all__ = [
    "ckd_group_loss",
    "ckd_inbatch_loss",
    "ckd_terms",
    "compare_groups",
    "comparison_weights",
    "group_split_sizes",
    "kd_loss",
    "logit_offset_loss",
]
