"""The detector: YOLOX on real frames with known people, the Ultralytics decoder, I/O checks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.vision.config import ModelConfig
from edge_agent.vision.detect import (
    Detector,
    ModelFormatError,
    UnknownClassError,
    letterbox_blob,
    nms_per_class,
)
from edge_agent.vision.track import iou_matrix

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def read_frame(video: Path, index: int) -> np.ndarray:
    cap = cv2.VideoCapture(str(video))
    cap.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, image = cap.read()
    cap.release()
    assert ok, f"frame {index} of {video}"
    return image


def gt_boxes(video: Path, index: int) -> np.ndarray:
    """Ground-truth xyxy boxes of video frame ``index`` (gt frame index + 1)."""
    rows = np.loadtxt(video.parent / "gt.txt", delimiter=",", ndmin=2)
    rows = rows[rows[:, 0] == index + 1]
    return np.c_[rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]]


@pytest.fixture(scope="module")
def yolox(model_path: Path) -> Detector:
    return Detector(ModelConfig(path=model_path, classes=["person"], threads=1))


@pytest.mark.parametrize("clip,frames", [("PETS09-S2L1", [0, 150, 400, 700]), ("TUD-Stadtmitte", [0, 90])])
def test_yolox_finds_the_people_ground_truth_has(yolox, footage, clip, frames):
    """Recall on real frames: most gt people are found with IoU >= 0.5, few boxes are spurious."""
    found = total = confident = 0
    for index in frames:
        dets = yolox.run(read_frame(footage(clip), index))
        keep = dets.scores >= 0.3
        gt = gt_boxes(footage(clip), index)
        iou = iou_matrix(gt, dets.xyxy[keep])
        found += int((iou.max(axis=1) >= 0.5).sum()) if iou.size else 0
        total += len(gt)
        confident += int(keep.sum())
        assert set(dets.class_ids.tolist()) <= {0}  # person only, as configured
        assert dets.timing_ms["inference"] > 0
    assert found / total >= 0.7, f"found {found} of {total} people"
    assert found / max(confident, 1) >= 0.6, f"{confident} confident boxes for {found} matched people"


def test_class_filter_drops_other_classes(model_path, footage):
    """PETS has parked cars at the top right and people walking: a car filter keeps only the cars."""
    only_cars = Detector(ModelConfig(path=model_path, classes=["car"], threads=1))
    dets = only_cars.run(read_frame(footage("PETS09-S2L1"), 0))
    confident = dets.scores >= 0.3
    assert confident.any() and set(dets.class_ids.tolist()) == {2}
    people = gt_boxes(footage("PETS09-S2L1"), 0)
    assert iou_matrix(people, dets.xyxy[confident]).max() < 0.3


def test_unknown_class_name_is_refused(model_path):
    # The config refuses it first (run, set_config and check-config alike, tests/common/test_check_config.py)...
    with pytest.raises(ValidationError, match="unknown class 'unicorn'"):
        ModelConfig(path=model_path, classes=["person", "unicorn"])
    # ...and the detector still checks against the names it is given.
    with pytest.raises(UnknownClassError, match="unknown class 'person'"):
        Detector(ModelConfig(path=model_path, classes=["person"]), class_names=[f"c{i}" for i in range(80)])


def test_yolox_model_as_yolov8_fails_naming_both_shapes(model_path):
    with pytest.raises(ModelFormatError) as err:
        Detector(ModelConfig(path=model_path, format="yolov8"))
    text = str(err.value)
    assert "expected input [1, 3, 416, 416] and output [1, 84, N]" in text
    assert "got input [1, 3, 416, 416] and output [1, 3549, 85]" in text


def test_missing_execution_provider_falls_back_to_cpu(model_path):
    det = Detector(ModelConfig(path=model_path, providers=["CUDAExecutionProvider"]))
    assert det.session.get_providers() == ["CPUExecutionProvider"]


# --- tiny ONNX models built here: the output is a constant, so the decoder sees known boxes ----

def constant_model(path: Path, input_hw: tuple[int, int], output: np.ndarray) -> Path:
    """A model ``images -> output`` whose output ignores the image (0 * mean(image) + constant)."""
    h, w = input_hw
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["const", "z"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "constant",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(output.shape))],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                     helper.make_tensor("const", TensorProto.FLOAT, list(output.shape),
                                        output.astype(np.float32).ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_yolov8_decoder_maps_boxes_back_and_does_class_aware_nms(tmp_path):
    # 64x64 input; boxes as (cx, cy, w, h) in input pixels + 80 class scores.
    out = np.zeros((1, 84, 4), np.float32)
    out[0, :4, 0] = [32, 32, 20, 40]; out[0, 4 + 0, 0] = 0.9  # person
    out[0, :4, 1] = [33, 32, 20, 40]; out[0, 4 + 0, 1] = 0.8  # same person again: NMS drops it
    out[0, :4, 2] = [33, 32, 20, 40]; out[0, 4 + 2, 2] = 0.7  # a car in the same place: kept
    out[0, :4, 3] = [10, 10, 4, 4]; out[0, 4 + 0, 3] = 0.05  # below the low-score floor
    path = constant_model(tmp_path / "v8.onnx", (64, 64), out)
    det = Detector(ModelConfig(path=path, format="yolov8", input_size=(64, 64), classes=["person", "car"]))
    image = np.zeros((64, 128, 3), np.uint8)  # 2:1, so the letterbox scales by 0.5 and pads 16 rows on top
    dets = det.run(image)
    order = np.argsort(-dets.scores)
    assert dets.class_ids[order].tolist() == [0, 2]
    assert np.allclose(dets.scores[order], [0.9, 0.7])
    # input (32, 32) -> source ((32 - 0) / 0.5, (32 - 16) / 0.5) = (64, 32); size doubles
    assert np.allclose(dets.xyxy[order[0]], [44, 0, 84, 64], atol=0.01)  # y clipped to the image


def test_yolov8_output_with_wrong_class_count_is_refused(tmp_path):
    path = constant_model(tmp_path / "bad.onnx", (64, 64), np.zeros((1, 10, 5), np.float32))
    with pytest.raises(ModelFormatError, match=r"expected input \[1, 3, 64, 64\] and output \[1, 84, N\].*"
                                               r"got input \[1, 3, 64, 64\] and output \[1, 10, 5\]"):
        Detector(ModelConfig(path=path, format="yolov8", input_size=(64, 64)))


def test_yolox_decoder_on_a_known_grid_cell(tmp_path):
    """Anchor (gx=2, gy=1) of stride 8 with offset 0.5 and log-size 0 -> a 8x8 box centred at (20, 12)."""
    anchors = 8 * 8 + 4 * 4 + 2 * 2  # 64x64 input
    out = np.zeros((1, anchors, 85), np.float32)
    a = 1 * 8 + 2
    out[0, a, :4] = [0.5, 0.5, 0.0, 0.0]
    out[0, a, 4] = 0.9  # objectness
    out[0, a, 5] = 0.8  # person
    path = constant_model(tmp_path / "x.onnx", (64, 64), out)
    det = Detector(ModelConfig(path=path, format="yolox", input_size=(64, 64)))
    dets = det.run(np.zeros((64, 64, 3), np.uint8))
    assert len(dets) == 1
    assert np.allclose(dets.xyxy[0], [16, 8, 24, 16])
    assert dets.scores[0] == pytest.approx(0.72)


def test_letterbox_pads_with_114_top_left_or_centred():
    image = np.zeros((50, 100, 3), np.uint8)
    image[..., 2] = 200  # red in BGR
    blob, box = letterbox_blob(image, (100, 100), centre=False)
    assert blob.shape == (1, 3, 100, 100) and blob.dtype == np.float32
    assert (box.scale, box.dx, box.dy) == (1.0, 0, 0)
    assert blob[0, :, 50:].min() == 114 and blob[0, :2, :50].max() == 0 and blob[0, 2, :50].min() == 200
    blob, box = letterbox_blob(image, (100, 100), centre=True, rgb=True, scale=1 / 255)
    assert box.dy == 25
    assert np.allclose(blob[0, :, :25], 114 / 255) and np.allclose(blob[0, :, 75:], 114 / 255)
    assert np.allclose(blob[0, 0, 25:75], 200 / 255) and blob[0, 1:, 25:75].max() == 0  # red first in RGB


def test_nms_keeps_overlapping_boxes_of_different_classes():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10]], np.float32)
    keep = nms_per_class(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 0, 1]), 0.5)
    assert sorted(keep.tolist()) == [0, 2]
