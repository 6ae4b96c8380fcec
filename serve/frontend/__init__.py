"""`--api-workers N`: the engine in a process of its own, N HTTP worker processes in front.

```
            supervisor (serve.frontend.supervisor: binds the port, starts, watches, stops)
           ╱            ╲
 worker 1..N (uvicorn,    engine process (serve.frontend.hub)
 the serve.app routes)      Engine thread: scheduler + Runtime + sampling + grammar masks
   EngineClient ──(submit, cancel, drain, metrics)──► one reader thread per worker
   (serve.frontend.client) ◄──(one message per engine step: [(rid, Event)…], counters)──
```

Workers share the listening socket (inherited from the supervisor), parse bodies, render
chat templates, tokenize, and write JSON and SSE; the engine process runs the engine thread
exactly as the single-process server does (it also detokenizes and matches stop strings:
`Event`s carry text) and never runs an event loop. `serve.events` stays the contract: the
routes get the same `RequestStream` of `Event`s from `EngineClient.submit` as from
`Engine.submit`. Messages are pickled tuples over `multiprocessing.connection` (AF_UNIX).

Faults: a client that disconnects cancels its request in the engine (frees the slot); a worker
that dies has its requests cancelled and is started again; an engine process that dies ends
every request in flight with an error event (SSE: an error chunk; else a 500), the workers
exit and the server exits with status 1 (a process manager restarts it). SIGTERM drains: the
workers stop taking requests, the engine finishes the running ones (up to --drain-timeout),
then everyone exits 0. One model only (several are refused at startup).
"""
