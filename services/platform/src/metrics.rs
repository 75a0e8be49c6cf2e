//! The metrics this crate records, declared once with their descriptions and units. Code records
//! them through these names only; `describe` registers the descriptions with the recorder.

crate::declare_metrics! {
    gauge BUILD_INFO = "parley_build_info": "Always 1; the version label names the running build.";
    counter GRPC_SERVER_REQUESTS = "parley_grpc_server_requests_total" in Count:
        "gRPC calls served, by service, method and status code.";
    histogram GRPC_SERVER_DURATION = "parley_grpc_server_duration_seconds" in Seconds:
        "Time to answer a gRPC call (to its response headers), by service and method.";
    gauge JETSTREAM_CONSUMER_PENDING = "parley_jetstream_consumer_pending_messages" in Count:
        "Messages a JetStream consumer has not been delivered yet (its backlog), by stream and consumer.";
    gauge JETSTREAM_CONSUMER_ACK_PENDING = "parley_jetstream_consumer_ack_pending_messages" in Count:
        "Messages delivered to a JetStream consumer and not acknowledged yet, by stream and consumer.";
    counter DB_READS = "parley_db_reads_total" in Count: "Reads, by where they ran: a replica or the primary.";
    counter DB_REPLICA_FALLBACKS = "parley_db_replica_fallbacks_total" in Count:
        "Reads that failed on a replica and ran again on the primary, by replica.";
    gauge DB_REPLICA_UP = "parley_db_replica_up": "1 when the replica answers as a standby, else 0.";
    gauge DB_REPLICA_LAG_BYTES = "parley_db_replica_lag_bytes" in Bytes: "WAL the replica has not replayed yet.";
    gauge DB_REPLICA_LAG_SECONDS = "parley_db_replica_lag_seconds" in Seconds:
        "Age of the oldest primary position the replica has not replayed.";
    gauge DB_REPLICA_IN_ROTATION = "parley_db_replica_in_rotation": "1 when reads may go to the replica, else 0.";
    gauge DB_POOL_CONNECTIONS = "parley_db_pool_connections" in Count:
        "Connections of a pool, by pool and state (idle, in_use).";
}
