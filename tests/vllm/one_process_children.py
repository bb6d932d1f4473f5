"""Run by test_vllm_children.py in a process of its own (argument: a JSON job file; results to its "out" path).

A guarded engine in one process (the uni executor, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the setup in
which vLLM hands the n children of a request without a seed one shared ``SamplingParams`` object. It
decodes one prompt as a request with ``n`` children, then as ``n`` separate requests, both times with
the same drawn Philox keys in the same row order, and writes both sets of tokens. Its own process,
because an engine core in the test process would cache vLLM's environment and pin torch's threads
for every later test.
"""

from __future__ import annotations

import json
import os
import sys


def main(job_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    from vllm import LLM, SamplingParams

    from ngsd.vllm import engine_kwargs, gate_book, processor

    job = json.loads(open(job_path).read())
    llm = LLM(**engine_kwargs(job["model"], expert="shipped", alpha=job["alpha"], distributed_executor_backend="uni",
                              enable_prefix_caching=False, kv_cache_memory_bytes=job["kv_cache_bytes"], **job["engine"]))
    arrivals: list[int] = []  # id of the SamplingParams of each row the gate book saw added
    update = gate_book.GateBook.update

    def recording(book, removed, added, moved):
        added = list(added)
        arrivals.extend(id(params) for _, params, _, _ in added)
        return update(book, removed, added, moved)

    gate_book.GateBook.update = recording

    def decode(prompts: int, n: int) -> list[list[int]]:
        processor.draw_seed = iter(range(1000, 1000 + job["n"])).__next__  # the same keys, row by row, both times
        params = SamplingParams(n=n, max_tokens=job["new_tokens"], temperature=0.8, top_p=0.9, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": job["prompt"]}] * prompts, params, use_tqdm=False)
        return [list(child.token_ids) for output in outputs for child in output.outputs]

    children = decode(prompts=1, n=job["n"])
    children_params = len(set(arrivals))
    separate = decode(prompts=job["n"], n=1)
    with open(job["out"], "w") as out:
        json.dump({"children": children, "separate": separate, "children_params": children_params}, out)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
