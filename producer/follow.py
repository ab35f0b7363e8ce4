"""Reading topics without a consumer group, from a point in time."""

from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition


async def assign_since(consumer: AIOKafkaConsumer, topics: list[str], since: datetime) -> int:
    """Assign every partition of `topics` and seek each to its first record at or after `since`
    (its current end when there is none). Returns how many partitions were assigned.

    Every position is fixed before returning, so a record produced afterwards is never missed
    (a lazy seek-to-end would resolve only at the first fetch and could skip it).
    """
    # The public `consumer.topics()` fetches fresh metadata into a copy and
    # `partitions_for_topic` reads the consumer's own (stale) view, which knows no topic until
    # one is assigned; so read the partitions from the fresh copy itself.
    cluster = await consumer._client.fetch_all_metadata()
    tps = [
        TopicPartition(topic, partition)
        for topic in topics
        for partition in sorted(cluster.partitions_for_topic(topic) or ())
    ]
    consumer.assign(tps)
    if not tps:
        return 0
    # Ends first: a record produced between the two look-ups then lies past the end taken
    # (read), rather than before an end taken after it (skipped).
    ends = await consumer.end_offsets(tps)
    found = await consumer.offsets_for_times(dict.fromkeys(tps, int(since.timestamp() * 1000)))
    for tp in tps:
        hit = found.get(tp)
        consumer.seek(tp, hit.offset if hit is not None else ends[tp])
    return len(tps)
