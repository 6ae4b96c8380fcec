"""transformers `LlamaForCausalLM` fp32 on torch CPU, through `generate()` with a streamer:
the baseline most people start from."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.peers.base import StreamRun, config_of, prompts_of, require, single_stream, timed


class _TokenStreamer:
    """A transformers streamer that hands each new token to the timing thread."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt itself
            self._prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.q.put(int(t))

    def end(self) -> None:
        self.q.put(None)


def generate_with_streamer(model, torch, ids: list[int], new_tokens: int, **kwargs) -> Iterator[int]:
    """Run `model.generate` on a thread; yield its tokens as they are produced."""
    streamer = _TokenStreamer()
    input_ids = torch.tensor([ids], dtype=torch.long)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, streamer=streamer, pad_token_id=2, **kwargs)
        except BaseException as exc:  # re-raised on the timing thread
            errors.append(exc)
        finally:
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while (tok := streamer.q.get()) is not None:
        yield tok
    thread.join()
    if errors:
        raise errors[0]


class TransformersPeer:
    def __init__(self, hf_dir: Path, *, threads: int) -> None:
        self.torch = require("torch", "pip install torch")
        transformers = require("transformers", "pip install transformers")
        self.torch.set_num_threads(threads)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_dir), torch_dtype=self.torch.float32)
        self.model.eval()

    def generate(self, ids: list[int], new_tokens: int) -> StreamRun:
        return timed(generate_with_streamer(self.model, self.torch, ids, new_tokens))


def run(job: dict) -> dict:
    cfg = config_of(job)
    t0 = time.perf_counter()
    peer = TransformersPeer(Path(job["args"]["model_dir"]), threads=cfg.threads)
    load_s = time.perf_counter() - t0
    from importlib import metadata

    return {**single_stream(peer, cfg, prompts_of(job)), "load_s": load_s,
            "version": f"transformers {metadata.version('transformers')}, "
                       f"torch {metadata.version('torch')}"}
