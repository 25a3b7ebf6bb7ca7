"""Evaluation: medpy-equal metrics, batched whole-case inference and reports."""

from semiseg.evaluation.inference import (
    LA_PATCH,
    LA_STRIDE,
    SliceInferer,
    SlidingWindowInferer,
    inference_mode,
    predict_slices,
    sliding_window,
)
from semiseg.evaluation.metrics import (
    asd,
    binary_metrics,
    case_metrics,
    dice,
    hd95,
    jaccard,
    summarize,
    surface_distances,
)
from semiseg.evaluation.report import evaluate_cases

__all__ = [
    "LA_PATCH",
    "LA_STRIDE",
    "SliceInferer",
    "SlidingWindowInferer",
    "asd",
    "binary_metrics",
    "case_metrics",
    "dice",
    "evaluate_cases",
    "hd95",
    "inference_mode",
    "jaccard",
    "predict_slices",
    "sliding_window",
    "summarize",
    "surface_distances",
]
