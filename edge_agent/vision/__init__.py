"""Capture, detection, tracking and counting: no MQTT, no outbox, no Kafka."""
