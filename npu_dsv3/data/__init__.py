"""Training data: raw jsonl / json / parquet -> megatron indexed datasets (``.bin/.idx``) with
the model's HF tokenizer (``npu-dsv3 data preprocess``), and the datasets training reads
from them (megatron's GPTDataset through BlendedMegatronDatasetBuilder for pretraining,
:class:`~npu_dsv3.data.dataset.InstructionDataset` for the packed instruction files)."""
