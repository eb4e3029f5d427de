"""The DESIGN contract and what both daemons share (no MQTT client, no camera, no Kafka)."""
