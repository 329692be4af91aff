"""The device's side of the cloud path: offloading requests to cloud workers over MQTT 5.

    client.py     OffloadClient: one connection, many requests in flight, streamed chunks
    breaker.py    circuit breaker (pure state machine, injected clock)
    latency.py    measured round trips per generation-length bucket
    messages.py   the offload wire format: requests, chunks, errors (typed, versioned)

May import: serving (its request types and `cloud_view`), mqtt, config, errors.
"""
