"""Per-sample feature shapes of a resnet8 student on 1x8x8 digits, for tests that fake teacher maps."""

SHAPES = {
    "stem": (16, 8, 8),
    "stage1": (16, 8, 8),
    "stage2": (32, 4, 4),
    "stage3": (64, 2, 2),
    "embedding": (64,),
}
