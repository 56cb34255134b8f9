"""An APR file as a conversion source: ``apr-kernels convert run/model.apr model-q4k.apr --quantize q4k``.

What a deployed model needs from a training checkpoint: its model tensors (under Hugging Face
names), a LoRA run's adapters merged into their weights (``lora_merged`` records them, as for a
PEFT adapter), its config and tokenizer keys. Left out: the training state (``__training__.*``
tensors and ``training.*`` keys: optimizer moments, data position), which only ``--resume`` reads.
Stored quantised blocks (Q4_K, Q6_K, APR_Q4, APR_Q8) pass through byte for byte unless a LoRA
update must be merged into them (then they come out dequantised, and ``--quantize`` quantises the
merged weight again). Rows stay in their stored order: an APR file keeps its ``rope_type``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from apr_kernels._format import APR_DTYPE_OF, QUANTIZED, TORCH_DTYPES, LazyTensor

from .core import Source


def read_apr(path: Path) -> Source:
    import apr_kernels
    from apr_kernels.io import QuantizedTensor

    from .export import merged_tensor, model_tensor_names

    f = apr_kernels.open(path)
    try:
        names = model_tensor_names(f, path)  # HF name -> stored name (no training state, no adapters)
        lora = f.metadata.get("lora")
        tensors = {}
        for hf, stored in names.items():
            info = f.info(stored)
            module = stored[: -len(".weight")] if stored.endswith(".weight") else None
            if lora and module and f"{module}.lora_A" in f:  # merged in fp32, rounded once to the stored dtype
                dtype = torch.float32 if info.dtype in QUANTIZED else TORCH_DTYPES[info.dtype]
                tensors[hf] = LazyTensor(APR_DTYPE_OF[dtype], info.shape,
                                         lambda s=stored, d=dtype: merged_tensor(f, s, lora, d))
            elif info.dtype in QUANTIZED:
                tensors[hf] = LazyTensor(info.dtype, info.shape,
                                         lambda s=stored, i=info: QuantizedTensor(i.dtype, i.shape, f.get_raw(s)))
            else:
                tensors[hf] = LazyTensor(info.dtype, info.shape, lambda s=stored: f.get_tensor(s))
        # (sizes and counts are the output's, written by save; provenance is this file)
        meta = {k: v for k, v in f.metadata.items()
                if not k.startswith("training.") and k not in ("lora", "total_size", "param_count")}
        meta.update(original_format="apr", source=str(Path(path).resolve()))
        if lora:
            meta["lora_merged"] = dict(lora)
        tied = bool(f.config.tied_embeddings)
    except BaseException:
        f.close()
        raise
    return Source(str(path), tensors, meta, tied=tied, closers=[f.close])
