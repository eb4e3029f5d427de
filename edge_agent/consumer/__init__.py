"""The central consumer side: consumer groups on the central topics, a sink with an exactly-once
effect (PostgreSQL) or a user handler, dead letters, the sequence auditor, topics and replay."""
