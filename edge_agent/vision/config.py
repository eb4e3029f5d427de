"""What the vision side is configured with: the model, and per camera its lines and zones.

What would fail at run time, and forever, is refused here, so that ``run``, a remote
``set_config`` and ``check-config`` refuse it alike: class names the model does not report,
and camera sources nothing can open.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from edge_agent.common.config import Strict, closest, did_you_mean
from edge_agent.vision.onnx_file import COCO_CLASSES, file_class_names, model_file_problem

Point = tuple[Annotated[float, Field(ge=0.0, le=1.0)], Annotated[float, Field(ge=0.0, le=1.0)]]

# What capture.py opens as a stream (OpenCV's FFmpeg backend); ``file://`` is a local file.
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp")
SOURCE_SCHEMES = (*STREAM_SCHEMES, "file")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: C:\ is a drive, not a scheme


def unknown_classes(wanted: Sequence[str], names: Sequence[str]) -> str | None:
    """``unknown class 'persn'; did you mean person?`` for the classes of ``wanted`` not in ``names``."""
    unknown = [c for c in wanted if c not in names]
    if not unknown:
        return None
    if len(unknown) == 1:
        return f"unknown class {unknown[0]!r}" + did_you_mean(unknown[0], names)
    hints = {c: closest(c, names) for c in unknown}
    return "unknown classes " + ", ".join(f"{c!r}" + (f" (did you mean {hints[c]}?)" if hints[c] else "")
                                          for c in unknown)


class ModelConfig(Strict):
    path: Path = Path("models/yolox_nano.onnx")
    format: Literal["yolox", "yolov8"] = "yolox"
    input_size: tuple[int, int] = (416, 416)
    threads: int = Field(2, ge=1, le=64)
    confidence: float = Field(0.3, gt=0, lt=1)
    nms_iou: float = Field(0.45, gt=0, le=1)
    classes: list[str] = ["person"]
    providers: list[str] = ["CPUExecutionProvider"]

    @field_validator("classes")
    @classmethod
    def _classes_the_model_reports(cls, classes: list[str], info: ValidationInfo) -> list[str]:
        path, fmt = info.data.get("path"), info.data.get("format")
        names = known_class_names(path, fmt) if path is not None and fmt is not None else None
        problem = unknown_classes(classes, names) if names is not None else None
        if problem:  # a custom error: pydantic would prefix a ValueError's text with "Value error, "
            raise PydanticCustomError("unknown_class", problem)
        return classes

    def class_names(self) -> tuple[str, ...] | None:
        """Every class the model reports (None: unknown, the file cannot be read)."""
        return known_class_names(self.path, self.format)

    def file_problems(self, where: str) -> list[str]:
        """``<where>.path: ...`` when the model file is missing, unreadable or not ONNX."""
        problem = model_file_problem(self.path)
        return [f"{where}.path: {problem}"] if problem else []


def known_class_names(path: Path, fmt: str) -> tuple[str, ...] | None:
    """The classes a model reports: from its file; a YOLOX model whose file is not here (a config
    checked away from its host) is a COCO one, as the detector assumes; otherwise unknown (None)."""
    names = file_class_names(path)
    if names is None and fmt == "yolox":
        return COCO_CLASSES
    return names


class LineConfig(Strict):
    id: str = Field(min_length=1)
    points: tuple[Point, Point]
    classes: list[str] | None = None  # None: every class the model reports
    anchor: Literal["bottom_center", "center", "top_center"] = "bottom_center"

    @model_validator(mode="after")
    def _not_degenerate(self) -> "LineConfig":
        if self.points[0] == self.points[1]:
            raise ValueError("a line needs two distinct points")
        return self


class ZoneConfig(Strict):
    id: str = Field(min_length=1)
    polygon: list[Point] = Field(min_length=3)
    classes: list[str] | None = None
    max_occupancy: int | None = Field(None, ge=0)
    anchor: Literal["bottom_center", "center", "top_center"] = "bottom_center"


class CameraConfig(Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    source: str = Field(min_length=1)  # rtsp://…, http://…, /dev/videoN, N, file:///…, or a path
    loop: bool = False
    fps: float = Field(5.0, gt=0, le=120)
    enabled: bool = True
    stall_s: float = Field(10.0, gt=0)  # no frame this long: camera.frame_stall
    reconnect_min_s: float = Field(1.0, gt=0)  # backoff between attempts to (re)open the source
    reconnect_max_s: float = Field(30.0, gt=0)
    down_after_s: float = Field(60.0, gt=0)  # no frames this long: alert.camera_down (once per outage)
    # Stream credentials kept out of the file: put into the URL only when the stream is opened.
    username: str | None = Field(None, min_length=1)
    password_env: str | None = None
    lines: list[LineConfig] = []
    zones: list[ZoneConfig] = []

    @field_validator("source")
    @classmethod
    def _a_source_capture_opens(cls, source: str) -> str:
        m = _SCHEME.match(source.strip())
        if m is None:
            return source  # a device index, /dev/videoN or a file path
        scheme = m.group(1).lower()
        if scheme not in SOURCE_SCHEMES:
            raise PydanticCustomError("unknown_scheme", f"unknown scheme {m.group(1)!r}"
                                      + did_you_mean(scheme, SOURCE_SCHEMES)
                                      + f" (known: {', '.join(SOURCE_SCHEMES)}; or /dev/videoN, N, a file path)")
        if scheme in STREAM_SCHEMES and not urlsplit(source.strip()).netloc:
            raise PydanticCustomError("no_host", f"the URL has no host: {scheme}://HOST/…")
        return source

    @model_validator(mode="after")
    def _unique_ids(self) -> "CameraConfig":
        ids = [x.id for x in self.lines] + [z.id for z in self.zones]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"line/zone ids must be unique per camera: {', '.join(dup)}")
        return self

    @model_validator(mode="after")
    def _credentials_for_a_stream_url(self) -> "CameraConfig":
        if self.username is None and self.password_env is None:
            return self
        if self.username is None:
            raise ValueError("password_env needs a username")
        netloc = urlsplit(self.source.strip()).netloc
        if not netloc:
            raise ValueError("username and password_env apply to a stream URL (rtsp://host/…) only")
        if "@" in netloc:
            raise ValueError("credentials go either in the source URL or in username/password_env, not both")
        return self
