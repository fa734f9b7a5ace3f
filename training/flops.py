"""The FLOPs of a training step and the peak they are measured against (MFU, HFU).

Model FLOPs per token (PaLM, appendix B; what README states):
    flops_per_token = 6 * N + 12 * n_layers * hidden_size * max_seq_length
N is the parameter count without the input embedding (a lookup, not a matmul); the output projection is counted.
6 = 2 (multiply-add) x 3 (forward + backward); the second term is attention's QK^T and AV at full sequence length.
Recomputation under gradient checkpointing is not counted in MFU (model FLOPs), and padding tokens are not counted
either: tokens are real tokens only, so padding lowers MFU, as it should.
    TFLOPS per GPU = real tokens/s per GPU * flops_per_token / 1e12;  MFU = TFLOPS per GPU / peak TFLOPS per GPU.
HFU (hardware FLOPs utilisation) adds the forward pass of every block recomputed in backward, a third of its share:
    hardware_flops_per_token = flops_per_token + sum over recomputed blocks of (2 * block params + 4 * hidden * seq)
so "full" checkpointing gives HFU ~ 4/3 MFU, "none" HFU = MFU.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Dense tensor-core peak TFLOPS per GPU for fp16/bf16, and plain fp32, by a substring of torch.cuda.get_device_name();
# the first match counts, so a variant comes before its family ("NVIDIA H100 PCIe" before "NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = {  # name: (half, fp32)
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100 NVL": (835.0, 60.0),
    "H100": (989.0, 67.0),  # SXM: "NVIDIA H100 80GB HBM3"
    "H800 PCIe": (756.0, 51.0),
    "H800": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "A800": (312.0, 19.5),
    "A10G": (125.0, 31.2),
    "L40S": (362.0, 91.6),
    "4090": (165.2, 82.6),
    "V100": (125.0, 15.7),
}


def flops_per_token(model: torch.nn.Module, n_layers: int, hidden_size: int, seq_len: int) -> float:
    """6 per parameter as above; 4 for a frozen one (requires_grad=False, new_rows_only): its backward still passes the
    gradient to its input, but computes none for itself."""
    embedding = getattr(model, "tok_embeddings", None)
    # The lookup costs no matmul; a tied embedding is also the output projection, which does.
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    lookup = id(embedding.weight) if embedding is not None and not tied else None
    matmuls = sum((6.0 if p.requires_grad else 4.0) * p.numel() for p in model.parameters() if id(p) != lookup)
    return matmuls + 12.0 * n_layers * hidden_size * seq_len


def recompute_flops_per_token(model: torch.nn.Module, hidden_size: int, seq_len: int) -> float:
    """The forward FLOPs per token of the blocks recomputed in backward (model.checkpointed_layers()): what HFU adds
    to the model FLOPs."""
    recomputed = getattr(model, "checkpointed_layers", lambda: [])()
    params = sum(p.numel() for i in recomputed for p in model.layers[i].parameters())
    return 2.0 * params + 4.0 * hidden_size * seq_len * len(recomputed)


def peak_tflops_per_gpu(setting: float, device: torch.device, precision: str) -> float | None:
    """The MFU denominator: the peak_tflops_per_gpu setting, else the GPU looked up by name, else None (no MFU)."""
    if setting > 0:
        return setting
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, fp32) in PEAK_TFLOPS.items():
        if key in name:
            return fp32 if precision == "fp32" else half
    logger.warning("unknown GPU %r: set peak_tflops_per_gpu to see MFU", name)
    return None
