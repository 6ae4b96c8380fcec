"""Scale-out pieces that need no Ray cluster: the flags, the no-Ray message, the routing text,
the stream error framing, the merged metrics, and that one process never imports Ray."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from serve import main
from serve.errors import StartupError
from serve.options import ServeOptions
from serve.scale.forward import merge_metrics, routing_text, stream_error


def test_the_single_process_path_never_imports_ray():
    code = ("import sys, serve.main, serve.app, serve.engine, serve.options, serve.scale.forward; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_replicas_without_ray_say_how_to_install_it(monkeypatch, tiny_model_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(StartupError, match=r"pip install 'llorch\[ray\]'"):
        main.run(ServeOptions(tiny_model_dir, replicas=2))


@pytest.mark.parametrize("kwargs, message", [
    ({"replicas": 0}, "replicas must be at least 1"),
    ({"replicas": 2, "max_replicas": 3}, "not both"),
    ({"min_replicas": 1}, "--min-replicas needs --max-replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas must be"),
    ({"ray_address": "auto"}, "--ray-address needs --replicas"),
    ({"gpus_per_replica": 1.0}, "--gpus-per-replica needs --replicas"),
    ({"replicas": 2, "target_ongoing_requests": 0.0}, "target_ongoing_requests must be > 0"),
])
def test_scale_out_flags_that_contradict_each_other(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        ServeOptions(tmp_path, **kwargs)


def test_scale_out_is_on_for_replicas_or_autoscaling(tmp_path):
    assert not ServeOptions(tmp_path).scale_out
    assert ServeOptions(tmp_path, replicas=1).scale_out
    assert ServeOptions(tmp_path, min_replicas=0, max_replicas=4).scale_out


def test_routing_text_starts_with_the_system_prompt():
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert routing_text("/v1/chat/completions", json.dumps(chat).encode()) == "\nsystem:Be brief.\nuser:Hi"
    anthropic = {"system": [{"type": "text", "text": "S"}], "messages": [{"role": "user", "content": "q"}]}
    assert routing_text("/v1/messages/", json.dumps(anthropic).encode()) == "S\nuser:q"
    responses = {"instructions": "I", "input": "x"}
    assert routing_text("/v1/responses", json.dumps(responses).encode()) == "Ix"
    assert routing_text("/v1/completions", b'{"prompt": ["a", "b"]}') == "a"
    assert routing_text("/v1/completions", b'{"prompt": [1, 2]}') == "1 2 "
    for path, body in [("/v1/completions", b"{not json"), ("/v1/completions", b"[1]"),
                       ("/tokenize", b'{"prompt": "a"}'), ("/v1/chat/completions", b"")]:
        assert routing_text(path, body) == ""


def test_stream_error_uses_each_wire_formats_framing():
    openai_tail = stream_error("/v1/chat/completions", "gone", "replica_died").decode()
    first, done = openai_tail.strip().split("\n\n")
    assert json.loads(first.removeprefix("data: "))["error"]["code"] == "replica_died"
    assert done == "data: [DONE]"
    anthropic = stream_error("/v1/messages", "gone", "replica_died").decode()
    assert anthropic.startswith("event: error\n")
    assert json.loads(anthropic.split("data: ", 1)[1])["error"]["type"] == "api_error"
    responses = stream_error("/v1/responses", "gone", "replica_died").decode()
    assert json.loads(responses.split("data: ", 1)[1])["type"] == "error"


def test_merged_metrics_label_every_sample_with_its_replica():
    a = '# HELP t_total T.\n# TYPE t_total counter\nt_total{k="x y"} 1.0\ng 2.0\n'
    b = '# HELP t_total T.\n# TYPE t_total counter\nt_total{k="z"} 3.0\n'
    lines = merge_metrics({"b": b, "a": a}).splitlines()
    assert lines == ["# HELP t_total T.", "# TYPE t_total counter", 't_total{replica="a",k="x y"} 1.0',
                     'g{replica="a"} 2.0', 't_total{replica="b",k="z"} 3.0']


def test_the_ray_application_is_sized_from_the_servers_options(tmp_path):
    pytest.importorskip("ray", reason="Ray Serve is the optional .[ray] extra")
    from serve.scale.ray_app import application

    def replica_config(**kwargs):
        app = application(ServeOptions(tmp_path, max_batch=8, max_queue=10, **kwargs), "m", None)
        replica = app._bound_deployment.init_args[0]._bound_deployment
        return replica, replica._deployment_config

    replica, config = replica_config(min_replicas=1, max_replicas=3, threads=2)
    assert config.max_ongoing_requests == 18  # slots + queue, not Ray's 5
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas,
            config.autoscaling_config.target_ongoing_requests) == (1, 3, 8)
    assert replica.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.0}
    assert config.request_router_config.request_router_class == "serve.scale.router.PrefixAffinityRouter"
    assert config.request_router_config.request_router_kwargs == {"saturation": 8}
    assert replica_config(min_replicas=0, max_replicas=2)[1].autoscaling_config.min_replicas == 0
    replica, config = replica_config(replicas=2, provider="cuda", routing="least-loaded")
    assert replica.num_replicas == 2 and replica.ray_actor_options["num_gpus"] == 1.0
    assert "PowerOfTwo" in str(config.request_router_config.request_router_class)


def test_the_router_prefers_the_prefix_holder_until_its_slots_are_busy():
    pytest.importorskip("ray", reason="Ray Serve is the optional .[ray] extra")
    import asyncio
    from types import SimpleNamespace

    from serve.scale.router import BLOCK_CHARS, PrefixAffinityRouter

    router = object.__new__(PrefixAffinityRouter)  # no cluster: only the policy's own state
    router.initialize_state(saturation=2)
    lens = {"a": 0, "b": 0}
    router._replica_queue_len_cache = SimpleNamespace(get=lens.get)
    a, b = (SimpleNamespace(replica_id=rid, max_ongoing_requests=10) for rid in ("a", "b"))

    def request(text):
        return SimpleNamespace(args=[SimpleNamespace(prompt=text)])

    def ranks(text):
        return [[r.replica_id for r in rank] for rank in
                asyncio.run(router.choose_replicas([a, b], request(text)))]

    system = "You are a careful assistant. " * 20
    assert ranks(system + "first") == [["a", "b"]]  # nobody holds it: least loaded, then fewest prompts
    router.on_request_routed(request(system + "first"), "b", None)
    assert ranks(system + "second") == [["b"], ["a"]]  # b holds the shared prefix
    assert ranks("Something else entirely. " * 10) == [["a", "b"]]  # new prompts spread to a
    lens["b"] = 2  # b's two slots are busy: the least-loaded replica instead
    assert ranks(system + "third") == [["a", "b"]]
    assert ranks(system[:BLOCK_CHARS - 1]) == [["a", "b"]]  # under one block: no affinity
    router.seen.pop("b")  # b died: what it held is forgotten
    lens["b"] = 0
    assert ranks(system + "fourth") == [["a", "b"]]
