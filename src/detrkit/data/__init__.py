"""Data: datasets, augmentations and batching."""

from detrkit.data.batching import collate_fn, pad_images
from detrkit.data.check import Problem, Report, check_dataset
from detrkit.data.coco import (
    CocoDetection,
    ImageReadError,
    read_coco_json,
    read_image,
    require_trainable,
)
from detrkit.data.digits import DigitsDetection, make_scene, write_digits_coco
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
    "AugmentationConfig",
    "CocoDetection",
    "CocoFormatError",
    "DigitsDetection",
    "ImageReadError",
    "Problem",
    "RandomShortSideResize",
    "RandomSizeCrop",
    "Report",
    "check_dataset",
    "collate_fn",
    "make_scene",
    "make_train_transforms",
    "make_val_transforms",
    "pad_images",
    "read_coco_json",
    "read_image",
    "require_trainable",
    "resized_shape",
    "to_training_sample",
    "write_digits_coco",
]
