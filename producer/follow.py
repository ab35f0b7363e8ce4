"""Reading topics without a consumer group, from a point in time."""

from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition


async def assign_since(consumer: AIOKafkaConsumer, topics: list[str], since: datetime) -> int:
    """Assign every partition of `topics` and seek each to its first record at or after `since`
    (its end when there is none). Returns how many partitions were assigned."""
    await consumer.topics()  # loads cluster metadata, which an unassigned consumer lacks
    tps = [
        TopicPartition(topic, partition)
        for topic in topics
        for partition in sorted(consumer.partitions_for_topic(topic) or ())
    ]
    consumer.assign(tps)
    found = await consumer.offsets_for_times(dict.fromkeys(tps, int(since.timestamp() * 1000)))
    for tp in tps:
        hit = found.get(tp)
        if hit is None:
            await consumer.seek_to_end(tp)
        else:
            consumer.seek(tp, hit.offset)
    return len(tps)
