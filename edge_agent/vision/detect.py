"""Object detection with onnxruntime: letterbox, one ONNX run, decode, class-aware NMS.

Two output layouts, picked by ``model.format``:

* ``yolox``: input ``[1, 3, H, W]`` BGR 0-255 letterboxed top-left with 114 padding; output
  ``[1, A, 5 + C]`` with grid-relative xy, log wh, objectness and class scores (already
  sigmoided), anchors laid out stride 8, then 16, then 32.
* ``yolov8``: the Ultralytics YOLOv8/YOLO11 export, input RGB 0-1 letterboxed in the centre;
  output ``[1, 4 + C, N]`` with cx, cy, w, h in input pixels and per-class scores.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import onnxruntime as ort

from edge_agent.vision.config import ModelConfig, unknown_classes
from edge_agent.vision.onnx_file import class_names, model_file_problem

log = logging.getLogger(__name__)

YOLOX_STRIDES = (8, 16, 32)
PAD_VALUE = 114
# ByteTrack's second association stage needs the low-score boxes too, so the detector keeps
# boxes down to this score; the tracker splits them at ``model.confidence``.
LOW_SCORE_FLOOR = 0.1


class ModelFormatError(ValueError):
    """The ONNX model's inputs or outputs do not fit the configured format."""


class ModelFileError(ModelFormatError):
    """The model file is missing, unreadable or not an ONNX model."""


class UnknownClassError(ValueError):
    """A class filter names a class the model does not know."""


@dataclass
class Detections:
    """Boxes in source-image pixels (x1, y1, x2, y2), their scores and class indices.

    ``timing_ms``: inference is wall time of the onnxruntime call; preprocess and postprocess are
    CPU time of the thread that ran them, since they may overlap inference in another thread and
    their wall time would then count the wait for a core rather than their own cost.
    """

    xyxy: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int32
    timing_ms: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))


@dataclass(frozen=True)
class Letterbox:
    """How a source image was placed in the model input: input = source * scale + (dx, dy)."""

    scale: float
    dx: float
    dy: float


@dataclass(frozen=True)
class Prepared:
    """A frame made ready for the model."""

    blob: np.ndarray
    box: Letterbox
    image_hw: tuple[int, int]
    preprocess_ms: float


def letterbox_blob(image: np.ndarray, size_hw: tuple[int, int], *, centre: bool, rgb: bool = False,
                   scale: float = 1.0) -> tuple[np.ndarray, Letterbox]:
    """The model input: resized keeping the aspect ratio, padded with 114, NCHW float32.

    The resized picture goes straight into the float blob and only the padding strips are
    filled, which is several times cheaper than a padded uint8 canvas plus blobFromImage.
    """
    h, w = image.shape[:2]
    th, tw = size_hw
    s = min(th / h, tw / w)
    nh, nw = min(th, int(round(h * s))), min(tw, int(round(w * s)))
    dy, dx = ((th - nh) // 2, (tw - nw) // 2) if centre else (0, 0)
    # Bilinear, as in YOLOX's and Ultralytics' training pipelines, and far cheaper than INTER_AREA
    # (docs/agent.md has the figures).
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    planes = cv2.split(resized)  # contiguous planes convert faster than a strided transpose
    if rgb:
        planes = planes[::-1]
    blob = np.empty((1, 3, th, tw), np.float32)
    pad = PAD_VALUE * scale
    blob[0, :, :dy, :] = pad
    blob[0, :, dy + nh:, :] = pad
    blob[0, :, dy:dy + nh, :dx] = pad
    blob[0, :, dy:dy + nh, dx + nw:] = pad
    inner = blob[0, :, dy:dy + nh, dx:dx + nw]
    for channel, plane in enumerate(planes):
        inner[channel] = plane
    if scale != 1.0:
        inner *= scale
    return blob, Letterbox(s, dx, dy)


def nms_per_class(xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by class-aware NMS (boxes of different classes never suppress each other)."""
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    keep = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), class_ids.tolist(), 0.0, iou)
    return np.asarray(keep, dtype=np.int64).reshape(-1)


def _yolox_grid(size_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-anchor grid offsets (A, 2) and strides (A, 1), in YOLOX's output order."""
    grids, strides = [], []
    for s in YOLOX_STRIDES:
        gh, gw = size_hw[0] // s, size_hw[1] // s
        ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full((gh * gw, 1), s))
    return np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)


def _shape_text(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _dims_fit(actual: list, expected: list) -> bool:
    """Symbolic (named or None) dimensions fit anything."""
    if len(actual) != len(expected):
        return False
    return all(not isinstance(a, int) or e is None or a == e for a, e in zip(actual, expected))


def select_providers(wanted: list[str]) -> list[str]:
    """The configured execution providers that this onnxruntime build has, then CPU."""
    available = ort.get_available_providers()
    chosen = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning("execution providers not available, falling back: %s", ", ".join(missing))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class Detector:
    """One onnxruntime session; ``run`` is thread-safe, so cameras may share a detector."""

    def __init__(self, model: ModelConfig, *, class_names: list[str] | None = None):
        # OpenCV's own thread pool splits a resize across cores that onnxruntime is using: single-
        # threaded it is as fast in wall time and costs less CPU (process-wide; docs/agent.md).
        cv2.setNumThreads(1)
        self.config = model
        self.format = model.format
        self.size_hw = (int(model.input_size[1]), int(model.input_size[0]))  # config is [w, h]
        self.session = self._open_session(model)
        self.input_name = self.session.get_inputs()[0].name
        self.names = class_names or self._class_names_from_model()
        self._validate_io()
        self.wanted = self._class_filter(model.classes)
        self.confidence = model.confidence
        self.floor = min(LOW_SCORE_FLOOR, model.confidence)
        if self.format == "yolox":
            self._grid, self._strides = _yolox_grid(self.size_hw)

    # --- set-up ----------------------------------------------------------------------------
    @staticmethod
    def _open_session(model: ModelConfig) -> ort.InferenceSession:
        problem = model_file_problem(model.path)  # one clear line, not onnxruntime's protobuf traceback
        if problem:
            raise ModelFileError(f"model.path: {problem}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = model.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers burn the core that the video decoder and tracker need between runs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(model.path), sess_options=opts,
                                       providers=select_providers(model.providers))
        # A GPU provider that could not start falls back to the CPU without an error: say which runs.
        log.info("model %s: execution providers %s", model.path.name, ", ".join(session.get_providers()))
        return session

    def _class_names_from_model(self) -> list[str]:
        return class_names(self.session.get_modelmeta().custom_metadata_map)

    def _expected_shapes(self) -> tuple[list, list]:
        h, w = self.size_hw
        c = len(self.names)
        if self.format == "yolox":
            anchors = sum((h // s) * (w // s) for s in YOLOX_STRIDES)
            return [1, 3, h, w], [1, anchors, 5 + c]
        return [1, 3, h, w], [1, 4 + c, None]

    def _validate_io(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        exp_in, exp_out = self._expected_shapes()
        act_in, act_out = inputs[0].shape, outputs[0].shape
        ok = len(inputs) == 1 and _dims_fit(act_in, exp_in) and _dims_fit(act_out, exp_out)
        if self.format == "yolov8" and ok and isinstance(act_out[1], int) and act_out[1] != 4 + len(self.names):
            ok = False
        if not ok:
            exp_out_text = _shape_text(["N" if d is None else d for d in exp_out])
            raise ModelFormatError(
                f"model {self.config.path} does not fit format {self.format!r}: expected input "
                f"{_shape_text(exp_in)} and output {exp_out_text}, got input "
                f"{', '.join(_shape_text(i.shape) for i in inputs)} and output "
                f"{', '.join(_shape_text(o.shape) for o in outputs)}")

    def _class_filter(self, classes: list[str]) -> np.ndarray:
        problem = unknown_classes(classes, self.names)  # the config refuses these first; class_names= may differ
        if problem:
            raise UnknownClassError(f"model.classes: {problem}")
        if not classes:
            return np.arange(len(self.names))
        return np.array([self.names.index(c) for c in classes])

    # --- per frame -------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        if self.format == "yolox":  # BGR 0-255, top-left
            return letterbox_blob(image, self.size_hw, centre=False)
        return letterbox_blob(image, self.size_hw, centre=True, rgb=True, scale=1 / 255.0)  # Ultralytics

    def infer(self, blob: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: blob})[0][0]

    def decode(self, raw: np.ndarray, box: Letterbox, image_hw: tuple[int, int]) -> Detections:
        """Raw output -> boxes in source pixels above the low-score floor, after NMS."""
        if self.format == "yolox":
            xyxy, scores, cls = self._decode_yolox(raw)
        else:
            xyxy, scores, cls = self._decode_yolov8(raw)
        if len(scores) == 0:
            return Detections.empty()
        # Strided slices are views, so the in-place ops change xyxy itself.
        xs, ys = xyxy[:, 0::2], xyxy[:, 1::2]
        np.clip((xs - box.dx) / box.scale, 0, image_hw[1], out=xs)
        np.clip((ys - box.dy) / box.scale, 0, image_hw[0], out=ys)
        keep = nms_per_class(xyxy, scores, cls, self.config.nms_iou)
        return Detections(xyxy[keep].astype(np.float32), scores[keep].astype(np.float32),
                          cls[keep].astype(np.int32))

    def _best_class(self, class_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Best wanted class per anchor; indices of anchors whose score passes the floor."""
        best = class_scores.argmax(axis=1)
        score = class_scores[np.arange(len(best)), best]
        idx = np.flatnonzero(score >= self.floor)
        return idx, score[idx], self.wanted[best[idx]]

    def _decode_yolox(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Score = objectness x class score <= objectness: drop the background anchors first.
        rows = np.flatnonzero(raw[:, 4] >= self.floor)
        raw = raw[rows]
        idx, score, cls = self._best_class(raw[:, 4:5] * raw[:, 5 + self.wanted])
        sel, stride = raw[idx], self._strides[rows[idx]]
        centre = (sel[:, :2] + self._grid[rows[idx]]) * stride
        half = np.exp(sel[:, 2:4]) * stride / 2
        return np.concatenate([centre - half, centre + half], axis=1), score, cls

    def _decode_yolov8(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx, score, cls = self._best_class(raw[4 + self.wanted].T)
        cx, cy, w, h = raw[:4, idx]
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1), score, cls

    def prepare(self, image: np.ndarray) -> Prepared:
        """Preprocessing on its own, so a decode thread can do it while the model runs."""
        t0 = time.thread_time()
        blob, box = self.preprocess(image)
        return Prepared(blob, box, image.shape[:2], (time.thread_time() - t0) * 1e3)

    def run_prepared(self, p: Prepared) -> Detections:
        t1 = time.perf_counter()
        raw = self.infer(p.blob)
        t2, c2 = time.perf_counter(), time.thread_time()
        dets = self.decode(raw, p.box, p.image_hw)
        dets.timing_ms = {"preprocess": p.preprocess_ms, "inference": (t2 - t1) * 1e3,
                          "postprocess": (time.thread_time() - c2) * 1e3}
        return dets

    def run(self, image: np.ndarray) -> Detections:
        """Detect in one BGR image; ``timing_ms`` splits preprocess, inference and postprocess."""
        return self.run_prepared(self.prepare(image))

    def class_name(self, class_id: int) -> str:
        return self.names[class_id]
