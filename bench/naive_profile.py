"""The original tool's profiling, rewritten here as the baseline for bench_profile.py.

Every Linear's input and output of every forward is kept in host memory (one sample per
forward, no padding); at the end the values of each layer side are concatenated and sorted
to read off the statistics. Memory grows with every calibration token (about 1.4 MB per
token for a 135M-parameter model), which is what the streaming profiler avoids.
"""

from __future__ import annotations

from collections import defaultdict

import torch

QUANTILE = 0.999


def _side_statistics(chunks: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """(ori, top_0_1, mean, std) of all elements, by sorting them as the original does."""
    values = torch.cat([c.reshape(-1) for c in chunks]).float()
    chunks.clear()  # the concatenation holds the values now
    ordered = torch.sort(values).values
    del values
    n = ordered.numel()
    std, mean = torch.std_mean(ordered, correction=0)  # population statistics, in float32 as the original
    return float(ordered[-1]), float(ordered[int(n * QUANTILE) - 1]), float(mean), float(std)


@torch.inference_mode()
def naive_profile(model, sequences: list[list[int]]) -> dict:
    """act_scales (keys ori, top_0_1, all_stat) of every nn.Linear, keeping all activations."""
    device = next(model.parameters()).device
    recorded: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: {"input": [], "output": []})
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    modules = dict(model.named_modules())

    def hook_for(name: str):
        def hook(module, args, output):
            recorded[name]["input"].append(args[0].detach().cpu())
            recorded[name]["output"].append(output.detach().cpu())

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        for sequence in sequences:
            model(input_ids=torch.tensor([sequence], dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    scales: dict = {"ori": {}, "top_0_1": {}, "all_stat": {}}
    for name in names:
        sides = recorded.pop(name)  # released layer by layer, as the statistics are computed
        stats = {side: _side_statistics(sides[side]) for side in ("input", "output")}
        scales["ori"][name] = {side: stats[side][0] for side in stats}
        scales["top_0_1"][name] = {side: stats[side][1] for side in stats}
        scales["all_stat"][name] = {side: {"mean": stats[side][2], "std": stats[side][3]} for side in stats}
    return scales
