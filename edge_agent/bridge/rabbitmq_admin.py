"""RabbitMQ-side answers for the bridge API: queue depth and consumers, dead letters, DLQ retry.

Blocking (pika's ``BlockingConnection``, one per call): the HTTP layer calls it from a worker
thread, as it does ``queue_admin.KafkaQueueAdmin``. AMQP tells a queue's ready messages and its
consumers (a passive declare); the unacknowledged ones only the management plugin knows, so
``lag`` is the ready messages (DESIGN asks ready + unacknowledged: that needs the plugin).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

import pika
from pika.exceptions import AMQPError
from pydantic import ValidationError

from edge_agent.bridge.queue_admin import RETRIABLE_REASONS, QueueAdminError, RetryResult, TopicStatus
from edge_agent.bridge.rabbitmq import connection_parameters
from edge_agent.bridge.rabbitmq_config import RabbitMqConfig
from edge_agent.bridge.validate import NotStrictJson, strict_envelope
from edge_agent.common.envelope import utc_now_iso
from edge_agent.common.logs import clip
from edge_agent.common.wire import DLQ_REASON, DLQ_RETRIED_AT, DLQ_SOURCE_TOPIC

log = logging.getLogger(__name__)


def letter_refusal(body: bytes, reason: str | None) -> str | None:
    """Why a dead letter must not go back to its stream, or None (the rule of the Kafka DLQ retry)."""
    if reason is None:
        return f"no {DLQ_REASON} header"
    try:
        strict_envelope(body)
    except (NotStrictJson, ValidationError) as e:
        return f"not a valid envelope: {clip(str(e).replace(chr(10), ' '))}"
    return None


class RabbitQueueAdmin:
    """Status and DLQ retry against RabbitMQ; one instance per process, calls from any thread."""

    def __init__(self, cfg: RabbitMqConfig, *, source_topic: Callable[[str], str | None] = lambda s: s,
                 scan_limit: int = 200_000):
        self._cfg = cfg
        self._params = connection_parameters(cfg)
        self.source_topic = source_topic  # dlq-source-topic (the MQTT topic) -> the stream it was meant for
        self.scan_limit = scan_limit
        self._retry_lock = threading.Lock()  # two concurrent retries would send the same letters twice

    def _connect(self) -> pika.BlockingConnection:
        try:
            return pika.BlockingConnection(self._params)
        except AMQPError as e:
            raise QueueAdminError(f"RabbitMQ: {e!r}") from e

    def status(self, topics: Sequence[str]) -> list[TopicStatus]:
        conn = self._connect()
        try:
            channel = conn.channel()
            dlq = self._declared(channel, self._cfg.queues["dlq"])
            out = []
            for topic in topics:
                queue = self._cfg.queues.get(topic)
                ready, consumers = self._declared(channel, queue) if queue else (0, 0)
                out.append(TopicStatus(topic=topic, lag=ready, consumerCount=consumers, dlqSize=dlq[0]))
            return out
        except AMQPError as e:
            raise QueueAdminError(f"RabbitMQ: {e!r}") from e
        finally:
            _close(conn)

    lags = status  # as cheap as it gets: no scan

    @staticmethod
    def _declared(channel: Any, queue: str) -> tuple[int, int]:
        ok = channel.queue_declare(queue, passive=True).method
        return ok.message_count, ok.consumer_count

    def retry_dead_letters(self, topic: str, max_messages: int) -> RetryResult:
        """Re-publish up to ``max_messages`` dead letters of ``topic`` to its exchange, confirmed.

        Letters are taken from the dlq queue one by one without acking; a re-published one is
        acked once RabbitMQ confirmed the re-publish; every other one (another stream's, poison,
        a failed re-publish) goes back to the queue at the end, so nothing leaves the DLQ unsent.
        """
        exchange = self._cfg.exchanges.get(topic)
        if exchange is None:
            return RetryResult(retried=0, errors=0)
        with self._retry_lock:
            conn = self._connect()
            try:
                return self._retry(conn.channel(), topic, exchange, max_messages)
            except AMQPError as e:
                raise QueueAdminError(f"RabbitMQ: {e!r}") from e
            finally:
                _close(conn)

    def _retry(self, channel: Any, topic: str, exchange: str, max_messages: int) -> RetryResult:
        channel.confirm_delivery()
        retried = errors = skipped = 0
        keep: list[int] = []  # delivery tags to put back
        for _ in range(self.scan_limit):
            if retried >= max_messages:
                break
            method, props, body = channel.basic_get(self._cfg.queues["dlq"], auto_ack=False)
            if method is None:
                break
            headers = dict(props.headers or {})
            source = headers.get(DLQ_SOURCE_TOPIC)
            if source is None or self.source_topic(str(source)) != topic:
                keep.append(method.delivery_tag)
                continue
            reason = headers.get(DLQ_REASON)
            if reason is not None and reason not in RETRIABLE_REASONS:
                skipped += 1
                keep.append(method.delivery_tag)
                continue
            refusal = letter_refusal(body, reason)
            if refusal is not None:
                errors += 1
                log.warning("dlq retry refused a letter: %s", refusal, extra={"topic": topic})
                keep.append(method.delivery_tag)
                continue
            headers[DLQ_RETRIED_AT] = utc_now_iso()
            try:
                # the routing key it was dead-lettered with is the original <device>.<camera>
                channel.basic_publish(exchange, method.routing_key, body, _republished(props, headers), mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
                errors += 1
                log.warning("dlq retry to %s failed: %r", exchange, e, extra={"topic": topic})
                keep.append(method.delivery_tag)
                continue
            channel.basic_ack(method.delivery_tag)
            retried += 1
        for tag in keep:
            channel.basic_nack(tag, requeue=True)
        return RetryResult(retried=retried, errors=errors, skipped=skipped)


def _republished(props: Any, headers: dict[str, Any]) -> pika.BasicProperties:
    return pika.BasicProperties(content_type=props.content_type or "application/json", delivery_mode=2,
                                message_id=props.message_id, correlation_id=props.correlation_id,
                                timestamp=props.timestamp, headers=headers)


def _close(conn: pika.BlockingConnection) -> None:
    try:
        conn.close()
    except AMQPError:
        pass
