"""The names of COCO's 80 object categories, indexed by their category ids (1 to 90).

Models trained on COCO with 91 classes (the published DETR and Deformable DETR weights) predict
the category id itself, so label ``i`` is ``COCO_NAMES[i]``; the 11 ids COCO never used are "N/A".
"""

from __future__ import annotations

_COCO_CATEGORIES = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}

# 91 entries: index = category id; 0 and the unused ids are "N/A".
COCO_NAMES: tuple[str, ...] = tuple(_COCO_CATEGORIES.get(i, "N/A") for i in range(91))


def class_names_for(config) -> list[str]:
    """The name of every label a model predicts: its config's ``class_names`` when set, COCO's
    for 91-class models, else the label numbers as text."""
    if config.class_names is not None:
        return list(config.class_names)
    if config.num_classes == len(COCO_NAMES):
        return list(COCO_NAMES)
    return [str(i) for i in range(config.num_classes)]
