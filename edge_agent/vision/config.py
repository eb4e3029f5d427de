"""What the vision side is configured with: the model, and per camera its lines and zones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from edge_agent.common.config import Strict

Point = tuple[Annotated[float, Field(ge=0.0, le=1.0)], Annotated[float, Field(ge=0.0, le=1.0)]]


class ModelConfig(Strict):
    path: Path = Path("models/yolox_nano.onnx")
    format: Literal["yolox", "yolov8"] = "yolox"
    input_size: tuple[int, int] = (416, 416)
    threads: int = Field(2, ge=1, le=64)
    confidence: float = Field(0.3, gt=0, lt=1)
    nms_iou: float = Field(0.45, gt=0, le=1)
    classes: list[str] = ["person"]
    providers: list[str] = ["CPUExecutionProvider"]


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
