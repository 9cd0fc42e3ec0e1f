"""Running a trained model on people's own images: :class:`Detector`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from detrkit.checkpoints import load, require_finite_outputs, require_finite_weights
from detrkit.checkpoints.load import check_device, training_run_config
from detrkit.data import unpadded_sizes
from detrkit.data.coco_names import class_names_for
from detrkit.data.images import (
    MAX_SIZE,
    SHORT_SIDE,
    ImageInput,
    image_list,
    prepare_images,
    scaled_image_size,
)
from detrkit.fast import optimize_for_inference
from detrkit.models import PostProcess
from detrkit.models.postprocess import (
    MASK_THRESHOLD,
    PANOPTIC_MIN_AREA,
    PANOPTIC_THRESHOLD,
    Detections,
    PanopticResult,
    check_panoptic_options,
    check_threshold,
    instance_masks,
    mask_probabilities,
    panoptic_result,
    select_detections,
)


@dataclass
class ModelRun:
    """The model's outputs on a batch of images, with where each image lies in the batch."""

    outputs: dict  # the model's raw outputs
    input_size: tuple[int, int]  # the padded batch's (H, W)
    resized_sizes: list[tuple[int, int]]  # each image's (h, w) in the batch, before padding
    image_sizes: list[tuple[int, int]]  # each input image's own (height, width)

    @property
    def has_masks(self) -> bool:
        return "pred_masks" in self.outputs


def training_image_scale(weights: str | os.PathLike) -> tuple[float, Path] | None:
    """The ``image_scale`` of the ``detrkit train`` run that wrote ``weights`` and the file it
    was read from, when it is not 1; else None."""
    found = training_run_config(weights)
    if found is None or found[0].get("image_scale", 1) == 1:
        return None
    return float(found[0]["image_scale"]), found[1]


class Detector:
    """A model with its preprocessing and post-processing: images in, named detections out.

    >>> detector = Detector.from_checkpoint("detr-r50-e632da11.pth", threshold=0.7)
    >>> found = detector("street.jpg")  # or a PIL image, an array, a tensor, or a list of them
    >>> found.boxes, found.scores, found.names

    Images are resized as at validation (short side ``size``, long side at most ``max_size``;
    ``size=None`` keeps them as they are), normalised with ImageNet's mean and std and padded into
    one batch; boxes come back in each input image's own pixels.

    With a ``precision`` ("fp32", "bf16", or "fp16" on a GPU) the detector runs a copy of the
    model prepared by :func:`~detrkit.fast.optimize_for_inference` (batch norm folded, weights
    channels-last when ``channels_last``, in that precision): faster, and in fp32 the same
    detections. Without one (the default) it runs ``model`` itself.
    """

    def __init__(
        self,
        model: nn.Module,
        threshold: float = 0.5,
        size: int | None = SHORT_SIDE,
        max_size: int = MAX_SIZE,
        device: str | torch.device | None = None,
        precision: str | None = None,
        channels_last: bool = True,
    ) -> None:
        check_threshold(threshold)
        if (size is not None and size < 1) or max_size < 1:
            raise ValueError(f"size and max_size must be positive, got {size} and {max_size}")
        self.device = check_device(device) if device is not None else _default_device()
        require_finite_weights(model, "the model given to Detector")
        self.model = model.to(self.device).eval()
        if precision is not None:
            self.model = optimize_for_inference(self.model, precision, channels_last)
        self.config = model.config
        self.threshold = threshold
        self.size = size
        self.max_size = max_size
        self.class_names = class_names_for(self.config)
        self.postprocess = PostProcess.for_config(self.config)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        threshold: float = 0.5,
        **options,
    ) -> Detector:
        """Loads any checkpoint :func:`detrkit.load` reads; ``options`` as in the constructor.

        A checkpoint of a ``detrkit train`` run at an ``image_scale`` other than 1 resizes images
        by that scale unless ``size`` or ``max_size`` is given: a model trained on small images
        finds little on large ones (:func:`training_image_scale`)."""
        device = check_device(device) if device is not None else _default_device()
        found = training_image_scale(path)
        if found is not None and not {"size", "max_size"} & set(options):
            size, max_size = scaled_image_size(found[0])
            options.update(size=size, max_size=max_size)
        model = load(path, map_location=device)
        require_finite_weights(model, str(path))
        return cls(model, threshold, device=device, **options)

    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """RGB ``uint8`` ``[3, H_i, W_i]`` images -> the model's input: ``images`` ``[B, 3, H, W]``
        (resized, normalised, padded) and ``mask`` ``[B, H, W]``, on the detector's device."""
        batch, mask = prepare_images(images, self.size, self.max_size)
        return batch.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def run(self, images: Sequence[Tensor]) -> ModelRun:
        """Runs the model on RGB ``uint8`` ``[3, H, W]`` images (one padded batch)."""
        batch, mask = self.preprocess(images)
        outputs = self.model(batch, mask)
        require_finite_outputs(outputs, "Detector")
        return ModelRun(
            outputs,
            tuple(batch.shape[-2:]),
            unpadded_sizes(mask),
            [tuple(image.shape[-2:]) for image in images],
        )

    @torch.no_grad()
    def detections(
        self, run: ModelRun, threshold: float | None = None, masks: bool = True
    ) -> list[Detections]:
        """Each image's detections in ``run`` scoring at least ``threshold`` (default: the
        detector's), best first; with their masks when the model has masks, unless ``masks``
        is False."""
        threshold = self.threshold if threshold is None else threshold
        sizes = torch.tensor(run.image_sizes, device=self.device)
        found = []
        for index, result in enumerate(self.postprocess(run.outputs, sizes)):

            def query_masks(keep: Tensor, index: int = index, result: dict = result) -> Tensor:
                return self.query_masks(run, index, result["queries"][keep])

            found.append(
                select_detections(
                    result,
                    threshold,
                    self.class_names,
                    run.image_sizes[index],
                    self.config.category_ids,
                    query_masks if masks and run.has_masks else None,
                )
            )
        return found

    def query_masks(
        self, run: ModelRun, index: int, queries: Tensor, probabilities: bool = False
    ) -> Tensor:
        """The masks of some queries of image ``index`` of ``run`` at the input image's size:
        ``[K, H, W]`` bool (:func:`~detrkit.models.postprocess.instance_masks`), or with
        ``probabilities`` the sigmoid of the mask logits, float (resized bilinearly)."""
        self._require_masks(run)
        pred_masks = run.outputs["pred_masks"][index]
        queries = queries.to(pred_masks.device)
        args = (run.input_size, run.resized_sizes[index], run.image_sizes[index])
        if not probabilities:
            return instance_masks(pred_masks, queries, *args, MASK_THRESHOLD).cpu()
        return mask_probabilities(pred_masks, queries, *args).cpu()

    def panoptic_segments(
        self,
        run: ModelRun,
        threshold: float = PANOPTIC_THRESHOLD,
        min_area: int = PANOPTIC_MIN_AREA,
    ) -> list[PanopticResult]:
        """Each image's panoptic segmentation in ``run``, as the original DETR makes it
        (:func:`~detrkit.models.postprocess.panoptic_segmentation`: queries scoring above
        ``threshold``, segments over ``min_area`` pixels), at the input image's size."""
        self._require_masks(run)
        is_thing = self.config.thing_classes()
        return [
            panoptic_result(
                logits.cpu(),
                pred_masks.cpu(),
                is_thing,
                (run.input_size, run.resized_sizes[index], run.image_sizes[index]),
                self.class_names,
                self.config.category_ids,
                threshold,
                min_area,
            )
            for index, (logits, pred_masks) in enumerate(
                zip(run.outputs["pred_logits"], run.outputs["pred_masks"])
            )
        ]

    def _require_masks(self, run: ModelRun) -> None:
        if not run.has_masks:
            raise ValueError(no_masks_message(self.config))

    @torch.no_grad()
    def detect(
        self, images: Sequence[Tensor], threshold: float | None = None, masks: bool = True
    ) -> tuple[list[Detections], dict]:
        """Runs the model on RGB ``uint8`` ``[3, H, W]`` images; returns their detections scoring
        at least ``threshold`` (default: the detector's), with masks when the model has them
        (unless ``masks`` is False), and the model's raw outputs."""
        run = self.run(images)
        return self.detections(run, threshold, masks), run.outputs

    def panoptic(
        self,
        images: ImageInput | Sequence[ImageInput],
        threshold: float = PANOPTIC_THRESHOLD,
        min_area: int = PANOPTIC_MIN_AREA,
    ) -> PanopticResult | list[PanopticResult]:
        """The panoptic segmentation of one image (a :class:`PanopticResult`) or of a list of
        images (a list), as :meth:`panoptic_segments` makes it. Raises ValueError for a model
        without masks (a detection model)."""
        check_panoptic_options(threshold, min_area)
        if not self.has_masks:
            raise ValueError(no_masks_message(self.config))
        pixels, single = image_list(images)
        found = self.panoptic_segments(self.run(pixels), threshold, min_area)
        return found[0] if single else found

    @property
    def has_masks(self) -> bool:
        """Whether the model predicts masks (DETR's panoptic models)."""
        return self.config.model_type == "detr_segmentation"

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Detections | list[Detections]:
        """Detects objects in one image (returns its :class:`Detections`) or in a list of images
        (returns a list). A 4-D tensor ``[B, C, H, W]`` counts as a list of B images."""
        pixels, single = image_list(images)
        found, _ = self.detect(pixels)
        return found[0] if single else found


def no_masks_message(config) -> str:
    """Why a model without masks cannot give a panoptic segmentation."""
    return (
        f"a detection model ({config.model_type}) has no masks: panoptic needs a "
        "detr_segmentation model, e.g. detr_r50_panoptic"
    )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
