"""Adapter training (extra ``train``): transcripts and retrieval corpora -> samples -> LoRA + marker rows.

``read_transcripts`` reads agent transcripts (OpenAI JSONL, LangChain dumps, LlamaIndex chat
histories); ``conversation_samples`` / ``ralm_samples`` render them with the inference layout;
``train`` runs the LoRA trainer (``trainer``; settings in ``config``, the peft model in ``lora``,
adapter and checkpoint files in ``checkpoint``); ``export_merged`` (``export``) writes a merged Hugging
Face checkpoint.
Imports of peft/accelerate happen inside the functions that need them.
"""

from .checkpoint import checkpoints
from .config import CheckpointError, TrainConfig, TrainError, TrainResult
from .export import export_merged, read_adapter_meta
from .lora import build_peft_model
from .samples import (IGNORE, Retriever, Sample, SampleStats, collate, conversation_sample, conversation_samples,
                      length_batches, ralm_samples)
from .trainer import evaluate, train
from .transcripts import (FORMATS, Conversation, TranscriptError, Transcripts, parse_conversation,
                          read_transcripts)

__all__ = [
    "IGNORE", "Retriever", "Sample", "SampleStats", "collate", "conversation_sample", "conversation_samples",
    "length_batches", "ralm_samples",
    "CheckpointError", "TrainConfig", "TrainError", "TrainResult", "build_peft_model", "checkpoints", "evaluate",
    "export_merged", "read_adapter_meta", "train",
    "FORMATS", "Conversation", "TranscriptError", "Transcripts", "parse_conversation", "read_transcripts",
]
