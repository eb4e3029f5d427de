"""Test support: real brokers and daemons as child processes, for the tests, benchmarks and demo.

- ``processes``: free ports, bounded waits, ``ManagedProcess`` / ``AgentProcess`` (process groups)
- ``tls``: a throw-away CA (``Pki``) and ``start_stunnel``
- ``mqtt``: ``MosquittoBroker`` / ``start_mosquitto``, ``ExternalMqtt``
- ``kafka``: ``TansuBroker``, ``ExternalKafka``, ``TlsKafka``, ``create_topics``, consumer defaults
- ``records``: ``consume_all``, ``read_topic``, ``TopicRecorder`` (what reached Kafka)
- ``agent``: an agent's config, HTTP API and systemd notify socket
- ``rabbitmq``: ``RabbitNode`` (a private ``rabbitmq-server`` node), ``ExternalRabbit``, ``start_rabbitmq``
- ``postgres``: ``PostgresCluster`` (a private cluster), ``start_postgres``, ``fresh_database``

It depends on the installed ``edge_agent`` only through child processes; ``edge_agent`` never
imports it (checked by import-linter).
"""
