"""Prometheus metrics, named as DESIGN.md fixes them (prefix ``edge_``).

One module so that every name lives in one place; the agent and the bridge run in
separate processes, and each exposes only what it updates.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# --- agent -------------------------------------------------------------------------------
FRAMES = Counter("edge_frames_total", "Frames by camera and result (processed, skipped, error)",
                 ["camera", "result"])
INFERENCE_SECONDS = Histogram("edge_inference_seconds", "Time in the ONNX detector per frame",
                              buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0))
CAMERA_FPS = Gauge("edge_camera_fps", "Processed frames per second", ["camera"])
CROSSINGS = Counter("edge_crossings_total", "Line crossings", ["camera", "line", "direction", "class"])
OUTBOX_DEPTH = Gauge("edge_outbox_depth", "Entries waiting in the outbox", ["stream"])
OUTBOX_BYTES = Gauge("edge_outbox_bytes", "Payload bytes waiting in the outbox")
OUTBOX_DROPPED = Counter("edge_outbox_dropped_total", "Entries dropped by the outbox", ["stream", "reason"])
PUBLISHED = Counter("edge_published_total", "Envelopes published to MQTT (first sends)", ["stream"])
ACKED = Counter("edge_acked_total", "Entries acknowledged end to end and deleted")
RESENT = Counter("edge_resent_total", "Entries sent again after the ack timeout")
PUBLISH_REFUSED = Counter("edge_publish_refused_total", "Publishes the broker refused (reason code >= 0x80)",
                          ["stream", "reason"])
MQTT_CONNECTED = Gauge("edge_mqtt_connected", "1 while the uplink is connected")
COMMANDS = Counter("edge_commands_total", "Remote commands", ["command", "result"])
VIEW_JPEGS = Counter("edge_view_jpegs_total", "JPEGs of a camera encoded for snapshots and live views "
                    "(only while someone asks)", ["camera"])
VIEW_STREAMS = Gauge("edge_view_streams", "MJPEG live views being watched")

# --- bridge ------------------------------------------------------------------------------
BRIDGE_RECEIVED = Counter("edge_bridge_received_total", "MQTT messages received")
BRIDGE_PRODUCED = Counter("edge_bridge_produced_total", "Records Kafka confirmed", ["topic"])
BRIDGE_RETRIES = Counter("edge_bridge_retries_total", "Produce retries", ["topic"])
BRIDGE_DLQ = Counter("edge_bridge_dlq_total", "Dead letters written", ["reason"])
BRIDGE_DUPLICATES = Counter("edge_bridge_duplicates_total", "Envelopes dropped as recent duplicates")
BRIDGE_DELIVERY_SECONDS = Histogram("edge_bridge_delivery_seconds", "MQTT receive -> Kafka ack",
                                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                             1.0, 2.5, 5.0, 10.0))
# livesum: with bridge.workers > 1 (prometheus-client's multiprocess mode) one series, the sum of
# the live workers, instead of one per pid that outlives its process.
BRIDGE_INFLIGHT = Gauge("edge_bridge_inflight", "MQTT messages received and not yet settled",
                        multiprocess_mode="livesum")
BRIDGE_BROKER_UP = Gauge("edge_bridge_broker_up", "1 while the bridge's central broker (kafka or rabbitmq) takes "
                         "records; 0 while it is unreachable or blocks publishing (RabbitMQ alarms)", ["broker"],
                         multiprocess_mode="livemin")
BRIDGE_API_DENIED = Counter("edge_bridge_api_denied_total",
                            "HTTP API requests refused for their credentials (401) or role (403)", ["code"])
BRIDGE_CONSUMER_LAG = Gauge("edge_bridge_consumer_lag",
                            "Kafka consumer-group lag on the bridge's topics (high watermark - committed); "
                            "refreshed when /metrics is scraped", ["topic", "group"], multiprocess_mode="livesum")

# --- consumer (edge-agent consume; DESIGN "Downstream") --------------------------------------
CONSUMED = Counter("edge_consumer_consumed_total", "Records read from Kafka", ["topic"])
PROCESSED = Counter("edge_consumer_processed_total",
                    "Records whose effect is committed (duplicates included: they are done too)", ["topic"])
DUPLICATES = Counter("edge_consumer_duplicates_total", "Records already processed by this group (no effect)",
                     ["topic"])
RETRIED = Counter("edge_consumer_retried_total", "Records put back for another try after a sink error",
                  ["topic"])
DEAD_LETTERED = Counter("edge_consumer_dlq_total", "Records the consumer wrote to the dlq", ["reason"])
LAG = Gauge("edge_consumer_lag", "High watermark - next offset to read, per assigned partition",
            ["topic", "partition"])
SINK_SECONDS = Histogram("edge_consumer_sink_seconds", "Time to commit one batch's effect in the sink",
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
SINK_UP = Gauge("edge_consumer_sink_up", "1 while the sink takes writes, 0 while consumption is paused for it",
                ["group"])
PAUSED = Gauge("edge_consumer_paused_partitions", "Partitions paused for a retry or a sink outage", ["group"])

# the sequence auditor
SEQ_LAST = Gauge("edge_seq_last", "Highest seq seen from a device", ["device"])
SEQ_MISSING = Gauge("edge_seq_missing", "Seqs of a device missing past the reorder timeout, unexplained",
                    ["device"])
SEQ_GAPS = Counter("edge_seq_gaps_total", "Unexplained holes in a device's seq (losses)", ["device"])
SEQ_EXPLAINED = Counter("edge_seq_explained_drops_total",
                        "Missing seqs explained by outbox.overflow / outbox.reset events", ["device"])
SEQ_RESETS = Counter("edge_seq_resets_total", "Times a device's seq went backwards (a device reset)", ["device"])


def exposition() -> tuple[bytes, str]:
    """The Prometheus text page and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
