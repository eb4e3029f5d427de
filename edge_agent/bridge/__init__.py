"""The MQTT -> Kafka bridge daemon and its HTTP API."""
