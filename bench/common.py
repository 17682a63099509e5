"""Shared pieces of the benchmarks: results, machine description, percentiles."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results.json"
DOC = REPO / "docs" / "benchmarks.md"


@dataclass
class Result:
    """One benchmark figure: rankloop's value against a baseline measured in the same run."""

    name: str
    metric: str
    value: float
    baseline: float
    baseline_label: str
    unit: str
    higher_is_better: bool = False
    target: str = ""
    details: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.value / self.baseline if self.baseline else float("inf")
        return self.baseline / self.value if self.value else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": round(self.ratio, 2)}


def epoch_details(quality: dict, pairs: int, ours_s: float, trl_pairs: int, trl_s: float, config,
                  keys: tuple[str, ...]) -> dict:
    """The details of a time-to-an-epoch row against TRL: both accuracies (`accuracy_comparison`),
    each side's pairs per second (TRL may skip pairs), and the rankloop settings that ran."""
    return {**quality, "trl_pairs_trained": trl_pairs, "rankloop_pairs_per_s": round(pairs / ours_s, 2),
            "trl_pairs_per_s": round(trl_pairs / trl_s, 2),
            "rankloop_config": {k: getattr(config, k) for k in
                                ("batch_size", "gradient_accumulation_steps", "lora_top_layers", "lora_r", "packed",
                                 "precision", "learning_rate", "max_length", *keys)}}


def accuracy_comparison(ours: list[bool], reference: list[bool]) -> dict:
    """Two sides' held-out accuracies on the same pairs, each with its exact interval, and the
    paired difference (rankloop minus reference) with its interval and what it says."""
    from annotations.intervals import accuracy, describe, paired_difference

    difference = paired_difference(ours, reference)
    verdict = ("more accurate" if difference["low"] > 0 else "less accurate" if difference["high"] < 0
               else "as accurate within the interval")
    rounded = lambda figure: {k: round(v, 3) if isinstance(v, float) else v for k, v in figure.items()}  # noqa: E731
    return {"rankloop_accuracy": rounded(accuracy(sum(ours), len(ours))),
            "reference_accuracy": rounded(accuracy(sum(reference), len(reference))),
            "difference": rounded(difference), "verdict": f"rankloop {verdict}",
            "quality": f"accuracy on {len(ours)} unseen pairs {describe(accuracy(sum(ours), len(ours)), 'accuracy')} vs "
                       f"{describe(accuracy(sum(reference), len(reference)), 'accuracy').split(', n=')[0]}; paired "
                       f"difference {difference['difference']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]: "
                       f"{verdict}"}


def percentile(values, q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


def median(values) -> float:
    return statistics.median(values)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime())}


def write_results(results: list[Result], command: str) -> None:
    """Add `results` to bench/results.json (figures of other benchmarks stay as they were) and
    render docs/benchmarks.md from it."""
    info = machine()
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    measured = f"{info['date']}, commit {info['commit']}, `{command}`"
    figures = {**previous.get("figures", {}), **{r.name: {**r.as_dict(), "measured": measured} for r in results}}
    data = {"machine": info, "command": command, "figures": figures}
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    write_doc(data)


def write_doc(data: dict) -> None:
    """docs/benchmarks.md from the contents of bench/results.json."""
    info, command, figures = data["machine"], data["command"], data["figures"]
    lines = [
        "# Benchmarks",
        "",
        f"Reproduce with `make bench` (one: `python -m bench --only NAME`). Machine: {info['cpu']}, "
        f"{info['cores']} cores, torch {info['torch']}, Python {info['python']}. Last run: `{command}` at commit "
        f"{info['commit']}, {info['date']}; each row says when it was measured (figures from earlier runs stay until "
        "their benchmark runs again).",
        "Each figure is a ratio against a baseline measured in the same run on the same data.",
        "What each figure measures, the levers tried, what helped and what did not: "
        "[performance.md](performance.md).",
        "",
        "A speed ratio counts only at equal quality: the quality column gives each side's, with its interval or "
        "standard error, where the benchmark measures one.",
        "",
        "| benchmark | metric | rankloop | baseline | ratio | quality (rankloop vs baseline) | target | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        lines.append(f"| {name} | {f['metric']} | {f['value']:.3g} {f['unit']} | {f['baseline']:.3g} {f['unit']} "
                     f"({f['baseline_label']}) | {f['ratio']}× | {f.get('details', {}).get('quality', '—')} | "
                     f"{f['target']} | {f.get('measured', 'an earlier run (git log bench/results.json)')} |")
    lines.append("")
    for name, f in figures.items():
        if f.get("details"):
            lines.append(f"**{name}**: " + "; ".join(f"{k} = {v}" for k, v in f["details"].items()))
            lines.append("")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines))


def print_table(results: list[Result]) -> None:
    print(f"{'benchmark':24} {'metric':34} {'rankloop':>12} {'baseline':>12} {'ratio':>7}  target")
    for r in results:
        print(f"{r.name:24} {r.metric:34} {r.value:>10.3g}{r.unit:>2} {r.baseline:>10.3g}{r.unit:>2} "
              f"{r.ratio:>6.2f}×  {r.target}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(base_path, out_dir, seed: int = 0, scale: float = 0.02, like_dpo_round: bool = False):
    """A LoRA adapter with random (non-zero) weights over `base_path`: a stand-in version for
    benchmarks that measure serving, not quality. By default r16 on every linear layer of all
    layers (the largest adapter a round makes: KTO, PPO); `like_dpo_round`: shaped as a DPO or
    SFT round's at its defaults (the top 8 layers). Made on the serving model thread: torch work
    on any other thread of a process that serves would slow its serving (app.model_thread.on_model_thread)."""
    from app.serving import on_model_thread

    return on_model_thread(_make_adapter, base_path, out_dir, seed, scale, like_dpo_round)


def _make_adapter(base_path, out_dir, seed: int, scale: float, like_dpo_round: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    from align.dpo import DPORoundConfig
    from align.models import load_causal_lm
    from align.training import lora_config

    torch.manual_seed(seed)
    base = load_causal_lm(base_path)
    config = lora_config(DPORoundConfig(), "CAUSAL_LM", model=base) if like_dpo_round else \
        LoraConfig(r=16, target_modules="all-linear")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
