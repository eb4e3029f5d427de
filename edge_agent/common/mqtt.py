"""MQTT connection settings both daemons apply the same way: TLS and username/password."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt

from edge_agent.common.config import MqttConfig, env_secret


def configure_transport(client: mqtt.Client, cfg: MqttConfig) -> None:
    """TLS (CA, optional client certificate; ``insecure`` skips the host name check) and
    username/password, the password from the environment variable ``password_env`` names."""
    if cfg.tls is not None:
        client.tls_set(ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
                       certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
                       keyfile=str(cfg.tls.key) if cfg.tls.key else None,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if cfg.tls.insecure:
            client.tls_insecure_set(True)
    if cfg.username:
        client.username_pw_set(cfg.username, env_secret(cfg.password_env))
