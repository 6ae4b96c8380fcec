"""Scale-out on Ray Serve (`llorch serve MODEL --replicas N`): the optional `.[ray]` extra.

```
client ─► Ray Serve HTTP proxy ─► Ingress (serve.scale.ingress: reads the body, takes the
          (--host/--port)          prompt text for routing) ─► DeploymentHandle + PrefixAffinityRouter
                                   (serve.scale.router) ─► Replica (serve.scale.replica: the
                                   single-process app, `serve.app.create_app` + its engine thread)
```

`serve.scale.forward` (the request/response envelope and the prompt text) imports no Ray;
every other module here does, and only `serve.main` imports them, lazily, when a scale-out
flag is given: the single-process path never imports Ray.
"""
