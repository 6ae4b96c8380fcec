"""`serve.models.ModelRegistry` with fake engines: LRU order, the memory budget, busy models
kept, a failed load remembered until retried, ids from directory names, the CLI's forms.
The same behaviour runs through the real server in test_models_e2e.py."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest

from serve.errors import ServiceUnavailableError
from serve.model_dir import ModelDirError
from serve.models import (
    ModelBusy,
    ModelEntry,
    ModelLoadFailed,
    ModelRegistry,
    build_entries,
    model_specs,
)
from serve.options import ModelSpec, ServeOptions, add_arguments, options_from_args, parse_size


class Engine:
    def __init__(self, name: str, kv: int = 0) -> None:
        self.name, self.kv, self.num_requests, self.stopped = name, kv, 0, False

    def kv_bytes(self) -> int:
        return self.kv

    def stop(self) -> None:
        self.stopped = True


def registry(names: str, **kw) -> tuple[ModelRegistry, list[str]]:
    loads: list[str] = []

    def load(entry: ModelEntry) -> Engine:
        if entry.id == "bad":
            raise FileNotFoundError(f"{entry.id}/model.onnx.data: truncated")
        loads.append(entry.id)
        return Engine(entry.id, kv=100)

    entries = [ModelEntry(n, ServeOptions(model_dir=Path(f"/nonexistent/{n}")), None) for n in names.split()]
    return ModelRegistry(entries, load, **kw), loads


def status(r: ModelRegistry) -> dict[str, str]:
    return {e.id: e.status for e in r.entries.values()}


def use(r: ModelRegistry, name: str) -> Engine:
    entry = r.entry(name)
    engine = r.lease(entry) or r.ensure_loaded(entry)
    r.release(entry)
    return engine


def test_least_recently_used_idle_model_makes_room():
    r, loads = registry("a b c", max_loaded=2)
    a = use(r, "a")
    use(r, "b")
    use(r, "a")  # b is now the least recently used
    use(r, "c")
    assert status(r) == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert not a.stopped and loads == ["a", "b", "c"]
    assert r.entry(None) is r.entry("a")  # no model: the first one


def test_a_busy_model_is_kept_and_a_load_waits_then_gives_up():
    r, _ = registry("a b", max_loaded=1, wait_timeout=0.3)
    entry = r.entry("a")
    r.lease(entry) or r.ensure_loaded(entry)  # a request holds a
    with pytest.raises(ServiceUnavailableError) as err:
        r.ensure_loaded(r.entry("b"))
    assert err.value.code == "model_capacity" and status(r)["a"] == "loaded"
    with pytest.raises(ModelBusy):
        r.unload(entry)
    later = threading.Timer(0.1, r.release, [entry])  # the request ends: b may load
    later.start()
    r.wait_timeout = 5
    r.ensure_loaded(r.entry("b"))
    later.join()
    assert status(r) == {"a": "unloaded", "b": "loaded"}


def test_memory_budget_counts_files_and_kv():
    r, _ = registry("a b c", memory_budget=250)  # each model: 0 file bytes + 100 KV bytes
    for n in "abc":
        r.entry(n).kv_bytes = 100  # the estimate before loading
    use(r, "a")
    use(r, "b")
    use(r, "c")
    assert status(r) == {"a": "unloaded", "b": "loaded", "c": "loaded"}
    r.entry("a").kv_bytes = 300
    with pytest.raises(ServiceUnavailableError, match="more than --memory-budget"):
        r.ensure_loaded(r.entry("a"))


def test_failed_load_is_remembered_until_retried():
    r, _ = registry("a bad")
    for _ in range(2):
        with pytest.raises(ModelLoadFailed, match="bad/model.onnx.data: truncated") as err:
            use(r, "bad")
        assert err.value.status_code == 500 and err.value.code == "model_load_failed"
    assert status(r) == {"a": "unloaded", "bad": "error"}
    with pytest.raises(ModelLoadFailed):
        r.ensure_loaded(r.entry("bad"), retry=True)
    r.unload(r.entry("bad"))  # clears the error
    assert status(r)["bad"] == "unloaded"


def test_ids_from_directory_names(default_model_dir, default_fp32_dir, tmp_path):
    options = ServeOptions(model_dir=default_model_dir)
    [one] = build_entries(options, [ModelSpec(default_model_dir)], strict=True)
    assert one.id == "smollm2-135m-instruct"
    two = build_entries(options, [ModelSpec(default_model_dir), ModelSpec(default_fp32_dir)], strict=True)
    assert [e.id for e in two] == ["smollm2-135m-instruct-int4", "smollm2-135m-instruct-fp32"]
    assert [e.options.model_dir for e in two] == [default_model_dir, default_fp32_dir]
    aliased = build_entries(options, [ModelSpec(default_model_dir, "x"), ModelSpec(default_fp32_dir)],
                            strict=True)
    assert [e.id for e in aliased] == ["x", "smollm2-135m-instruct"]
    with pytest.raises(ValueError, match="two models are named 'x'"):
        build_entries(options, [ModelSpec(default_model_dir, "x"), ModelSpec(default_fp32_dir, "x")],
                      strict=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "genai_config.json").write_text("{")
    [bad] = build_entries(options, [ModelSpec(tmp_path / "bad")], strict=False)  # served, failed
    assert bad.status == "error" and "genai_config.json: not valid JSON" in bad.error
    with pytest.raises(ModelDirError, match="genai_config.json: not valid JSON"):
        build_entries(options, [ModelSpec(tmp_path / "bad")], strict=True)
    with pytest.raises(ModelDirError, match="gone: model directory not found"):  # a typo: never served
        build_entries(options, [ModelSpec(default_model_dir), ModelSpec(tmp_path / "gone")], strict=False)


def parse(*argv: str) -> ServeOptions:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    add_arguments(parser)
    args = parser.parse_intermixed_args(list(argv))
    return options_from_args(args.models, args)


def test_command_line_forms():
    o = parse("m1=first", "--max-loaded-models", "2", "m2", "--memory-budget", "1.5G",
              "--idle-unload", "30", "--no-webui")
    assert (o.model_dir, o.model_name, o.more_models) == (Path("m1"), "first", (ModelSpec(Path("m2")),))
    assert (o.max_loaded_models, o.memory_budget, o.idle_unload, o.webui) == (2, 3 * 2**29, 30.0, False)
    assert parse("m").webui and parse("--models-dir", "d").model_dir is None
    assert parse_size("512M") == 2**29 and parse_size("8GiB") == 8 * 2**30 and parse_size("100") == 100
    for argv, message in [(("m1", "m2", "--model-name", "x"), "--model-name names the only model"),
                          ((), "no model"), (("m", "--max-loaded-models", "0"), "at least 1"),
                          (("m=",), "empty alias")]:
        with pytest.raises((ValueError, SystemExit), match=message):
            parse(*argv)
    with pytest.raises(ValueError, match="'lots' is not a size"):
        parse_size("lots")
    with pytest.raises(SystemExit):  # argparse: "invalid parse_size value: 'lots'"
        parse("m", "--memory-budget", "lots")


def test_models_dir_serves_exports_not_checkpoints(default_model_dir, default_hf_dir):
    """`--models-dir models/`: the int4 and fp32 exports, not the HF checkpoint beside them."""
    root = default_model_dir.parent
    assert default_hf_dir.parent == root and (default_hf_dir / "config.json").is_file()
    specs = model_specs(ServeOptions(model_dir=None, models_dir=root))
    assert default_model_dir in [s.path for s in specs] and default_hf_dir not in [s.path for s in specs]
    specs = model_specs(ServeOptions(model_dir=default_model_dir, model_name="x", models_dir=root))
    assert specs[0] == ModelSpec(default_model_dir, "x")
    assert [s.path for s in specs].count(default_model_dir) == 1  # named already: not twice
