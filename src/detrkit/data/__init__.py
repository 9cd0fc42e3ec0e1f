"""Data: datasets (COCO, Pascal VOC, YOLO), augmentations and batching, COCO names and results,
drawing detections."""

from detrkit.data.batching import collate_fn, pad_images, unpadded_sizes
from detrkit.data.check import Problem, Report, check_dataset, check_format, check_panoptic
from detrkit.data.coco import (
    CocoDetection,
    ImageReadError,
    read_coco_json,
    read_image,
    require_trainable,
    to_coco_results,
)
from detrkit.data.coco_names import COCO_NAMES, class_names_for
from detrkit.data.digits import DigitsDetection, make_scene, write_digits_coco
from detrkit.data.drawing import draw_detections
from detrkit.data.formats import convert_to_coco, format_dataset
from detrkit.data.images import (
    MAX_SIZE,
    SHORT_SIDE,
    ImageInput,
    image_list,
    prepare_images,
    resize_image,
    scaled_image_size,
    to_uint8_image,
)
from detrkit.data.panoptic import CocoPanoptic, pq_categories
from detrkit.data.transforms import (
    AugmentationConfig,
    RandomShortSideResize,
    RandomSizeCrop,
    make_train_transforms,
    make_val_transforms,
    resized_shape,
    to_training_sample,
)
from detrkit.data.validate import CocoFormatError

__all__ = [
    "COCO_NAMES",
    "MAX_SIZE",
    "SHORT_SIDE",
    "AugmentationConfig",
    "CocoDetection",
    "CocoFormatError",
    "CocoPanoptic",
    "DigitsDetection",
    "ImageInput",
    "ImageReadError",
    "Problem",
    "RandomShortSideResize",
    "RandomSizeCrop",
    "Report",
    "check_dataset",
    "check_format",
    "check_panoptic",
    "class_names_for",
    "collate_fn",
    "convert_to_coco",
    "draw_detections",
    "format_dataset",
    "image_list",
    "make_scene",
    "make_train_transforms",
    "make_val_transforms",
    "pad_images",
    "pq_categories",
    "prepare_images",
    "read_coco_json",
    "read_image",
    "require_trainable",
    "resize_image",
    "resized_shape",
    "scaled_image_size",
    "to_coco_results",
    "to_training_sample",
    "to_uint8_image",
    "unpadded_sizes",
    "write_digits_coco",
]
