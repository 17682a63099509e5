"""Where the served model runs (app/serving.py: `serving_device`): the CPU unchanged, a CUDA GPU
when one is visible, a GPU asked for where there is none refused; and the device figures
script (bench/device.py) that measures candidates, chat and a hot swap on whatever is present.
The GPU test runs only where a GPU is (a `device` machine); elsewhere it is skipped."""

from __future__ import annotations

import json

import pytest
import torch

from app.serving import PolicyServer, SamplingParams, serving_device
from tests.app.test_hot_swap import save_tiny_adapter

NO_GPU = not torch.cuda.is_available()


@pytest.mark.skipif(not NO_GPU, reason="checks a machine without a GPU")
def test_without_a_gpu_the_server_runs_on_the_cpu_and_refuses_to_pretend(tiny_model_dir):
    assert serving_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU is visible: use auto or cpu"):
        PolicyServer(tiny_model_dir, device="cuda")
    with pytest.raises(ValueError, match="serving device 'tpu' is unknown"):
        serving_device("tpu")


def test_the_server_says_where_it_computes(server):
    assert server.describe() == f"in process, {server.device.type} {server.dtype}"
    assert next(server.model.parameters()).device == server.device


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_on_a_gpu_candidates_chat_a_hot_swap_and_a_merge_all_run_there(tiny_model_dir, tmp_path):
    server = PolicyServer(tiny_model_dir, dtype="auto")
    assert server.device.type == "cuda" and next(server.model.parameters()).is_cuda
    sampling = SamplingParams(max_new_tokens=8)
    groups = server.generate_many([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]], n=3,
                                  sampling=sampling, preemptible=True)
    assert [len(g) for g in groups] == [3, 3]
    path = save_tiny_adapter(tiny_model_dir, tmp_path / "v1")
    server.set_live("v1", path)
    *_, (text, version) = server.stream([{"role": "user", "content": "hello"}], sampling)
    assert version == "v1" and isinstance(text, str)
    assert server.merge("v1") and "v1" in server.merged_versions()
    assert server.generate([{"role": "user", "content": "again"}], sampling=sampling)[0].version == "v1"


def test_the_device_figures_script_measures_what_is_present(tiny_model_dir, tmp_path, capsys):
    from bench.device import main

    out = tmp_path / "figures.json"
    assert main(["--base", str(tiny_model_dir), "--quick", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["device"] == ("cpu" if NO_GPU else "cuda")
    for key in ("candidates_item_alone_s", "candidates_item_batched_s", "chat_first_token_s", "hot_swap_cold_s"):
        assert figures[key]["n"] >= 1 and 0 < figures[key]["median"] < 120
    assert figures["peak_memory_mib"] > 0
    table = capsys.readouterr().out
    assert "| hot swap, never loaded: to a complete 16-token answer |" in table
