"""Inference and explanation: running models on images and looking inside them."""

from detrkit.data.coco_names import COCO_NAMES, class_names_for
from detrkit.data.images import to_uint8_image
from detrkit.inference.capture import AttentionRecord, Internals, SamplingRecord, capture_internals
from detrkit.inference.detector import Detector
from detrkit.models.postprocess import Detections, PanopticResult, Segment

__all__ = [
    "COCO_NAMES",
    "AttentionRecord",
    "Detections",
    "Detector",
    "Internals",
    "PanopticResult",
    "SamplingRecord",
    "Segment",
    "capture_internals",
    "class_names_for",
    "to_uint8_image",
]
