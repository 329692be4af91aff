"""Serving: the one engine loop and the decisions around it, behind every front door.

    engine_loop.py  LocalWorker: one thread runs the continuous batch; admits, expires,
                    measures rates, swaps models
    scheduler.py    the pure decision core: local / cloud / refuse, from the queue, an
                    injected clock and measured rates
    request.py      one request's way through the loop, and the types on both sides of it
    cloud_view.py   what the scheduler sees of the cloud path (a protocol the offload client
                    satisfies)
    rate_probe.py   a direct measurement of prefill and decode-step times
    model_swap.py   which generator new requests start on during a hot swap

May import: model, engines, bundle, errors. Never offload, cloud, api, fleet or mqtt: the
front doors (api/, cloud/) submit to this package, and the cloud path reaches it only
through `cloud_view.CloudPath`.
"""
