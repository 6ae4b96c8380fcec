"""One module per engine under test; each has `run(job: dict) -> dict`, called in a worker
process of its own (`bench.worker`), and raises `bench.peers.base.Skip` when it cannot run."""
