"""Serving: the one engine loop and the decisions around it, behind every front door.

    engine_loop.py  LocalWorker: one thread runs the continuous batch; admits, expires,
                    measures rates, swaps models. The one engine loop: the HTTP API and the
                    cloud worker (offload off) both submit to it
    dispatch.py     Dispatcher: local / cloud / refuse for the HTTP front door, decided once
                    (drained devices, the scheduler's verdict, a queue review's offload), with
                    one deadline default on the engine loop's clock
    scheduler.py    the pure decision core: local / cloud / refuse, from the queue, an
                    injected clock, measured rates and the batch's own limits
    request.py      one request's way through the loop, and the types on both sides of it
    cloud_view.py   what serving sees of the cloud path: its state for the scheduler, submit
                    for the dispatcher (protocols the offload client satisfies)
    rate_probe.py   a direct measurement of prefill and decode-step times
    rates.py        what a request costs end to end, learned from the requests served
                    (engine step, serving path per token, prefill, per-request costs)
    capacity.py     max_batch and the queue bound from measured step times and memory, for
                    each model loaded (start-up, hot swap), unless the config sets max_batch
    model_swap.py   which generator new requests start on during a hot swap

May import: model, engines, bundle, errors. Never offload, cloud, api, fleet or mqtt: the
front doors (api/, cloud/) submit to this package, and it reaches the cloud path only
through `cloud_view.CloudPath`.
"""
