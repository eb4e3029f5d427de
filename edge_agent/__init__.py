"""Edge counting agent: camera host daemon and the MQTT -> Kafka bridge."""

__version__ = "0.1.0"
