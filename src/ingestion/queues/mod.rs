//! The queues events arrive on and leave by: Celery over Redis, the Kafka consumer, the Kafka producer and its message formats, and the dead-letter queue.
