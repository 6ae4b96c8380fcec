"""Scale-out on Ray Serve (`llorch serve MODEL --replicas N`): the optional `.[ray]` extra.

```
client ─► Ray Serve HTTP proxy ─► Ingress × --ingress-replicas (serve.scale.ingress: reads the
          (--host/--port)          body, takes the prompt text for routing) ─► DeploymentHandle +
                                   PrefixAffinityRouter (serve.scale.router; every ingress's
                                   router asks one PrefixTable actor, serve.scale.prefix_table)
                                   ─► Replica (serve.scale.replica: the single-process app,
                                   `serve.app.create_app` + its engine thread; its responses
                                   cross back in coalesced chunks, serve.scale.coalesce)
```

With `--ray-ingress haproxy` (serve.scale.direct) Ray's bundled HAProxy takes the proxy's
place and forwards each client to a replica's own HTTP server; no Ingress then.

`serve.scale.forward`, `serve.scale.coalesce`, `serve.scale.prefix_table` and
`serve.scale.environment` import no Ray; every other module here does, and only `serve.main`
imports them, lazily, when a scale-out flag is given: the single-process path never imports
Ray.
"""
