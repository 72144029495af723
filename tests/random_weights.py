"""Random weights that show misplaced ones: shared by tests/ and the parity harness (parity/)."""
from __future__ import annotations

import torch


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random biases and BatchNorm statistics, and unit-gain Linear weights (attention that is not
    near uniform), so that a weight read into the wrong place shows in the embeddings."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / module.in_features**0.5)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.05)


@torch.no_grad()
def centre(last: torch.nn.Module, embed) -> None:
    """Random weights give every clip (and every prompt) nearly the same embedding, so a zero-shot
    check would see every clip predict one class. Subtracting from the bias of the projection's
    last layer (`last`: a Linear or msclap's LayerNorm) its mean output while `embed()` runs the
    test's inputs leaves what tells them apart; the weights stay the model every side loads."""
    seen: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    try:
        embed()
    finally:
        handle.remove()
    last.bias -= torch.cat(seen).mean(dim=0)
