"""flashback-agents: fast local LLM agents with a persistent KV cache and the FlashBack append layout."""

from .context import CachedContext, ContextLoadError, ContextOverflowError, ContextStats, SyncResult
from .generation import GenerationConfig, GenerationResult, generate, stream
from .layout import ChatFormat, Layout, LayoutError, Message, ToolCall
from .models import (DEFAULT_MODEL, MARK_L, MARK_R, LoadedModel, ModelLoadError, cache_dir, load_model,
                     shared_model)
from .pool import ContextPool

__version__ = "0.1.0"

__all__ = [
    "CachedContext", "ContextLoadError", "ContextOverflowError", "ContextStats", "SyncResult",
    "GenerationConfig", "GenerationResult", "generate", "stream",
    "ChatFormat", "Layout", "LayoutError", "Message", "ToolCall",
    "DEFAULT_MODEL", "MARK_L", "MARK_R", "LoadedModel", "ModelLoadError", "cache_dir", "load_model",
    "shared_model", "ContextPool", "__version__",
]
