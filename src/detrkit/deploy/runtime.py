"""Running an exported file: ONNX Runtime for .onnx, ``torch.export.load`` for .pt2."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detrkit.checkpoints.finite import NonFiniteError, non_finite_names
from detrkit.data import unpadded_sizes
from detrkit.data.images import MAX_SIZE, SHORT_SIDE, ImageInput, image_list, prepare_images
from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detrkit.deploy.errors import ExportError
from detrkit.deploy.to_onnx import require_onnx
from detrkit.deploy.to_program import load_program
from detrkit.models.kinds import CLASSIFICATIONS, KINDS
from detrkit.models.postprocess import (
    MASK_THRESHOLD,
    PANOPTIC_MIN_AREA,
    PANOPTIC_THRESHOLD,
    Detections,
    PanopticResult,
    PostProcess,
    check_panoptic_options,
    check_threshold,
    instance_masks,
    panoptic_result,
    select_detections,
)
from detrkit.ops import ONNX_DOMAIN, RuntimeLibraryError, onnxruntime_library

# What files written before the metadata recorded it are taken to mean.
DEFAULT_RESIZE = {"short_side": SHORT_SIDE, "max_size": MAX_SIZE}


def file_format(path: Path) -> str:
    """The format of an exported file: "torch" for a torch.export archive (a zip), else "onnx"."""
    return "torch" if zipfile.is_zipfile(path) else "onnx"


class ExportedModel:
    """An exported detector: images in, :class:`~detrkit.models.postprocess.Detections` out, as
    :class:`detrkit.Detector` gives them; or named tensors in and out.

    >>> exported = ExportedModel("detr.onnx")
    >>> found = exported.detect("street.jpg", threshold=0.7)  # or a list of images
    >>> found.boxes, found.scores, found.names, found.category_ids
    >>> outputs = exported(images=images, mask=mask)  # {"pred_logits": ..., "pred_boxes": ...}
    >>> exported.output_names  # a panoptic model's add "pred_masks"
    >>> exported.metadata["class_names"]  # JSON text

    :meth:`detect` prepares images as the file's metadata says (``size`` and ``max_size``, its
    ``resize``; ``mean`` and ``std``) and post-processes what the file returns; the file alone
    is enough, without the checkpoint. Files written before the metadata had ``resize`` are
    resized to short side 800, long side at most 1333; without ``category_ids`` the labels are
    the category ids.

    ONNX files run on ONNX Runtime's CPU provider, programs with ``torch.export.load``; a
    program's ``ExportedProgram`` is kept as ``program``, for looking at its graph.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        self.format = file_format(self.path)
        if self.format == "onnx":
            require_onnx()
        try:
            if self.format == "onnx":
                self._open_onnx(threads)
            else:
                self._open_program()
        except ExportError:  # already says what is wrong with the file
            raise
        except Exception as error:  # whatever the runtime raises for a file it cannot read
            raise ExportError(f"{self.path}: cannot open the exported model: {error}") from error
        self.input_names = json.loads(self.metadata.get("inputs", '["images", "mask"]'))
        self.output_names = json.loads(
            self.metadata.get("outputs", '["pred_logits", "pred_boxes"]')
        )
        self._read_image_policy()

    def _read_image_policy(self) -> None:
        """What :meth:`detect` needs from the metadata, checked now: a bad value names its key."""
        resize = self._json("resize", DEFAULT_RESIZE)
        if not isinstance(resize, dict) or not {"short_side", "max_size"} <= set(resize):
            self._bad_metadata("resize", "an object with short_side and max_size")
        self.size: int | None = resize["short_side"]
        self.max_size: int = resize["max_size"]
        if not (
            (self.size is None or _is_positive_int(self.size)) and _is_positive_int(self.max_size)
        ):
            self._bad_metadata("resize", "a positive short_side (or null) and max_size")
        self.mean = self._json("image_mean", list(IMAGENET_MEAN))
        self.std = self._json("image_std", list(IMAGENET_STD))
        for key, values in (("image_mean", self.mean), ("image_std", self.std)):
            if not (isinstance(values, list) and len(values) == 3):
                self._bad_metadata(key, "a list of 3 numbers")
        # None for a file that is not detrkit's: detect() then refuses it.
        self.class_names: list[str] | None = self._json("class_names", None)
        self.category_ids: list[int] | None = self._json("category_ids", None)
        if self.category_ids is not None and (
            self.class_names is None or len(self.category_ids) != len(self.class_names)
        ):
            self._bad_metadata("category_ids", "one id per class name")
        self.classification: str | None = self.metadata.get("classification")
        if self.classification is not None and self.classification not in CLASSIFICATIONS:
            self._bad_metadata("classification", f"one of {', '.join(CLASSIFICATIONS)}")

    def _json(self, key: str, default: Any) -> Any:
        if key not in self.metadata:
            return default
        try:
            return json.loads(self.metadata[key])
        except ValueError:
            self._bad_metadata(key, "JSON")

    def _bad_metadata(self, key: str, expected: str) -> None:
        raise ExportError(
            f"{self.path}: the metadata's {key} must be {expected}, got "
            + (repr(self.metadata[key]) if key in self.metadata else "none")
        )

    def _open_onnx(self, threads: int | None) -> None:
        import onnxruntime

        self._session = onnxruntime.InferenceSession(
            str(self.path),
            onnxruntime_options(self.path, threads),
            providers=["CPUExecutionProvider"],
        )
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)

    def _open_program(self) -> None:
        self.program, self.metadata = load_program(self.path)
        self._module = self.program.module()

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        """Runs the model on CPU tensors named as its inputs; returns its outputs by name."""
        missing = [name for name in self.input_names if name not in inputs]
        unknown = [name for name in inputs if name not in self.input_names]
        if missing or unknown:
            raise ValueError(
                f"{self.path.name} takes {', '.join(self.input_names)}; "
                f"got {', '.join(inputs) or 'nothing'}"
            )
        ordered = [inputs[name].detach().cpu() for name in self.input_names]
        if self.format == "onnx":
            feeds = {
                name: np.ascontiguousarray(t.numpy()) for name, t in zip(self.input_names, ordered)
            }
            outputs = [torch.from_numpy(o) for o in self._session.run(self.output_names, feeds)]
        else:
            with torch.no_grad():
                outputs = list(self._module(*ordered))
        return dict(zip(self.output_names, outputs))

    def detect(
        self,
        images: ImageInput | Sequence[ImageInput],
        threshold: float = 0.5,
        masks: bool = True,
    ) -> Detections | list[Detections]:
        """Detects objects in one image (returns its
        :class:`~detrkit.models.postprocess.Detections`) or in a list of images (returns a
        list), as :class:`detrkit.Detector` does: images as Detector takes them (paths, PIL
        images, numpy arrays ``[H, W, C]``, tensors ``[C, H, W]``, a 4-D tensor being a list),
        resized, normalised and padded into one batch as the metadata says, then the file's
        outputs post-processed (:class:`~detrkit.models.PostProcess` for raw outputs); the
        detections scoring at least ``threshold``, best first, boxes in each image's own pixels.
        A panoptic model's come with masks unless ``masks`` is False.

        A file without a ``mask`` input runs the images one at a time (unpadded). A file
        exported with post-processing before it returned ``queries`` gives DETR's detections
        their queries (its detections are its queries, in order) and Deformable DETR's -1.
        """
        check_threshold(threshold)
        self._require_detect_metadata()
        pixels, single = image_list(images, "ExportedModel.detect")
        found = [
            item
            for batch in self._batches(pixels)
            for item in self._detect_batch(batch, threshold, masks)
        ]
        return found[0] if single else found

    def panoptic(
        self,
        images: ImageInput | Sequence[ImageInput],
        threshold: float = PANOPTIC_THRESHOLD,
        min_area: int = PANOPTIC_MIN_AREA,
    ) -> PanopticResult | list[PanopticResult]:
        """The panoptic segmentation of one image (a
        :class:`~detrkit.models.postprocess.PanopticResult`) or of a list of images (a list), as
        :meth:`detrkit.Detector.panoptic` makes it, from a panoptic model exported without
        post-processing: the original's merge of every query's class and mask (queries scoring
        above ``threshold``, segments over ``min_area`` pixels)."""
        check_panoptic_options(threshold, min_area)
        self._require_detect_metadata()
        if "pred_masks" not in self.output_names:
            raise ExportError(
                f"{self.path}: a detection model, without masks; panoptic() needs a panoptic "
                "model's export"
            )
        if "pred_logits" not in self.output_names:
            raise ExportError(
                f"{self.path}: exported with post-processing, which keeps each detection's mask "
                "but not every query's classes; panoptic() needs the panoptic model exported "
                "without --with-postprocess"
            )
        is_thing = self._is_thing()
        pixels, single = image_list(images, "ExportedModel.panoptic")
        results = []
        for batch in self._batches(pixels):
            outputs, input_size, resized, image_sizes = self._run_images(batch)
            results += [
                panoptic_result(
                    outputs["pred_logits"][index],
                    outputs["pred_masks"][index],
                    is_thing,
                    (input_size, resized[index], image_sizes[index]),
                    self.class_names,
                    self.category_ids,
                    threshold,
                    min_area,
                )
                for index in range(len(batch))
            ]
        return results[0] if single else results

    def _is_thing(self) -> list[bool]:
        """Whether each class is a thing: the metadata's ``is_thing``, or for files written
        before it was recorded, the model config's rule."""
        if "is_thing" in self.metadata:
            is_thing = self._json("is_thing", None)
        else:
            try:
                kind = KINDS[self.metadata["model_type"]]
                config = kind.config_class.from_dict(json.loads(self.metadata["config"]))
                is_thing = config.thing_classes()
            except (KeyError, ValueError, TypeError):
                is_thing = None
        if not (
            isinstance(is_thing, list)
            and len(is_thing) == len(self.class_names)
            and all(isinstance(value, bool) for value in is_thing)
        ):
            self._bad_metadata("is_thing", "one true or false per class name")
        return is_thing

    def _require_detect_metadata(self) -> None:
        if self.class_names is None or self.classification is None:
            raise ExportError(
                f"{self.path}: no class_names and classification in the file's metadata (not "
                "a file detrkit exported?): detect() and panoptic() need them; call the model "
                "with named tensors instead"
            )

    def _batches(self, pixels: list[Tensor]) -> list[list[Tensor]]:
        """One padded batch, or one image at a time for a file without a ``mask`` input."""
        return [pixels] if "mask" in self.input_names else [[image] for image in pixels]

    @torch.no_grad()
    def _run_images(
        self, pixels: list[Tensor]
    ) -> tuple[dict[str, Tensor], tuple[int, int], list, list[tuple[int, int]]]:
        """One run of the file on RGB ``uint8`` images, prepared as the metadata says. Returns
        its outputs, the padded input's size, each image's resized size and its own size."""
        batch, mask = prepare_images(pixels, self.size, self.max_size, self.mean, self.std)
        image_sizes = [tuple(image.shape[-2:]) for image in pixels]
        orig_sizes = torch.tensor(image_sizes, dtype=torch.int64)
        values = {"images": batch, "mask": mask, "orig_sizes": orig_sizes}
        outputs = self(**{name: values[name] for name in self.input_names})
        bad = non_finite_names(outputs)
        if bad:
            raise NonFiniteError(
                f"{self.path}: the model's outputs hold NaN or infinity ({', '.join(bad)}); its "
                "results would be meaningless"
            )
        return outputs, tuple(batch.shape[-2:]), unpadded_sizes(mask), image_sizes

    def _detect_batch(
        self, pixels: list[Tensor], threshold: float, masks: bool
    ) -> list[Detections]:
        """One run of the file on RGB ``uint8`` images; their detections."""
        outputs, input_size, resized, image_sizes = self._run_images(pixels)
        post_processed = "scores" in outputs
        if post_processed:
            results = [
                {name: outputs[name][index] for name in ("scores", "labels", "boxes")}
                for index in range(len(pixels))
            ]
            for index, result in enumerate(results):
                result["queries"] = self._queries(outputs, index)
        else:
            orig_sizes = torch.tensor(image_sizes, dtype=torch.int64)
            results = PostProcess(self.classification)(outputs, orig_sizes)
        found = []
        for index, result in enumerate(results):

            def detection_masks(keep: Tensor, index: int = index, result: dict = result) -> Tensor:
                # Post-processed, pred_masks has a row per detection; raw, one per query.
                rows = keep if post_processed else result["queries"][keep]
                args = (input_size, resized[index], image_sizes[index], MASK_THRESHOLD)
                return instance_masks(outputs["pred_masks"][index], rows, *args)

            with_masks = masks and "pred_masks" in outputs
            found.append(
                select_detections(
                    result,
                    threshold,
                    self.class_names,
                    image_sizes[index],
                    self.category_ids,
                    detection_masks if with_masks else None,
                )
            )
        return found

    def _queries(self, outputs: dict[str, Tensor], index: int) -> Tensor:
        """The object query of each post-processed detection of image ``index``."""
        if "queries" in outputs:
            return outputs["queries"][index]
        count = len(outputs["scores"][index])
        if self.classification == "softmax":  # DETR: a detection per query, in order
            return torch.arange(count)
        return torch.full((count,), -1, dtype=torch.int64)


def onnxruntime_options(path: str | os.PathLike, threads: int | None = None):
    """ONNX Runtime session options for the ONNX file ``path``: ``threads`` intra-op threads
    (None: ONNX Runtime's default) and, when the file has nodes of detrkit's domain (an export
    with ``attention_op="detrkit"``), detrkit's operator library registered. Raises ExportError
    when that library is needed and cannot be built."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # The opset imports name the domains the graph uses; the weights are parsed too, as the
    # format keeps them in the same message.
    domains = {
        entry.domain for entry in onnx.load(str(path), load_external_data=False).opset_import
    }
    if ONNX_DOMAIN in domains:
        try:
            options.register_custom_ops_library(str(onnxruntime_library()))
        except RuntimeLibraryError as error:
            raise ExportError(
                f"{path} has detrkit's own {ONNX_DOMAIN} nodes, which ONNX Runtime runs with "
                f"detrkit's operator library: {error}"
            ) from None
    return options


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
