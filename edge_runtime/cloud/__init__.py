"""The cloud worker: an MQTT front door onto the same engine loop the HTTP API uses.

    worker.py     CloudWorker: shared subscription on offload requests, submitted to a
                  serving.LocalWorker (offload off: its admission, deadlines, chunked
                  prefill and rates); answers on the requester's response topic
    body.py       an offloaded OpenAI body, read with the API's own schemas
    coalesce.py   when streamed tokens go out as one chunk

May import: serving, model, mqtt, offload.messages (the wire format), api.schemas (the
OpenAI bodies; never the FastAPI app), config, errors.
"""
