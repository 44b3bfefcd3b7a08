"""flashback-agents: fast local LLM agents with a persistent KV cache and the FlashBack append layout."""

from .errors import FlashBackError
from .context import (CachedContext, ContextConfig, ContextError, ContextLoadError, ContextOverflowError, ContextStats,
                      SyncResult)
from .generation import GenerationConfig, GenerationConfigError, GenerationResult, generate, stream
from .layout import ChatFormat, Layout, LayoutError, Message, ToolCall
from .models import (DEFAULT_MODEL, MARK_L, MARK_R, LoadedModel, ModelLoadError, cache_dir, load_model,
                     shared_model)
from .pool import ContextPool, MemoryBudget, PoolTimeoutError
from .kvstore import DiskKVStore, KVStoreWarning
from .chat import ChatEngine  # noqa: E402  (after the core: chat builds on it)
from .engines import local_engine, release_engines, shared_engine  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "FlashBackError",
    "CachedContext", "ContextConfig", "ContextError", "ContextLoadError", "ContextOverflowError", "ContextStats", "SyncResult",
    "GenerationConfig", "GenerationConfigError", "GenerationResult", "generate", "stream",
    "ChatFormat", "Layout", "LayoutError", "Message", "ToolCall",
    "DEFAULT_MODEL", "MARK_L", "MARK_R", "LoadedModel", "ModelLoadError", "cache_dir", "load_model",
    "shared_model", "ContextPool", "MemoryBudget", "PoolTimeoutError", "DiskKVStore", "KVStoreWarning", "ChatEngine", "release_engines",
    "local_engine", "shared_engine", "__version__",
]
