"""A tiny randomly initialised Llama-family model for tests (built in seconds, fully offline)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .kvcache import cache_len
from .models import refuse_custom_code
from .retrieval.base import Document

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ERROR INFO WARN DEBUG level component.",
    "def main(): return 0  # python code with numbers 0123456789 and symbols {}[]()<>:;,.\"'",
    "User asks a question; the assistant answers with tools. Tool results are appended at the end.",
    "2024-01-01 12:00:00 INFO server started on port 8080\n2024-01-01 12:00:01 ERROR disk full",
]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_tokenizer(path: Path, vocab_size: int):
    """A byte-level BPE tokenizer trained on a few lines, with the ChatML template, saved to ``path``."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def build_tiny_model_dir(path: str | Path, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                         heads: int = 4, kv_heads: int = 2, max_positions: int = 512, seed: int = 0) -> Path:
    """Write a tiny random Llama + byte-level BPE tokenizer (ChatML template) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast = _tiny_tokenizer(path, vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
                      bos_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(path))
    return path


# Tiny configs per architecture: what makes each family different from Llama is kept (attention
# biases, q/k norms, a sliding window of 8 tokens so tests cross it, soft-capping, fused QKV, learned
# absolute positions, partial rotary, recurrent/conv layers); everything else is as small as it goes.
_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2}
_SLIDING = {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {**_SHAPE}),
    "qwen2": ("Qwen2Config", {**_SHAPE}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {**_SHAPE, "head_dim": 16}),  # q/k RMSNorm
    "mistral": ("MistralConfig", {**_SHAPE, "sliding_window": 8}),
    "gemma2": ("Gemma2Config", {**_SHAPE, **_SLIDING, "attn_logit_softcapping": 50.0,
                                "final_logit_softcapping": 30.0}),
    "gemma3": ("Gemma3TextConfig", {**_SHAPE, **_SLIDING,  # RoPE base per layer type
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {**_SHAPE}),  # fused qkv_proj
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4}),  # c_attn, learned positions
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "word_embed_proj_dim": 64}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "rotary_pct": 0.25}),  # query_key_value, partial RoPE
    "lfm2": ("Lfm2Config", {**_SHAPE, "num_hidden_layers": 3, "full_attn_idxs": [1]}),  # short-conv + attention
    "qwen3_next": ("Qwen3NextConfig", {**_SHAPE, "head_dim": 16, "layer_types": ["linear_attention", "full_attention"],
                                       "linear_num_value_heads": 2, "linear_num_key_heads": 2,
                                       "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 2,
                                       "num_experts_per_tok": 1, "moe_intermediate_size": 32,
                                       "shared_expert_intermediate_size": 32}),  # gated delta net + attention, MoE
}


def build_tiny_arch_dir(path: str | Path, arch: str, *, vocab_size: int = 512, max_positions: int = 512,
                        seed: int = 0) -> Path:
    """Write a tiny random model of architecture ``arch`` (a key of :data:`TINY_ARCHS`) with the tiny
    tokenizer to ``path``: built from the config class in seconds, no download."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(TINY_ARCHS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast = _tiny_tokenizer(path, vocab_size)
    config_name, kwargs = TINY_ARCHS[arch]
    config_cls = getattr(transformers, config_name)
    positions = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    eos, bos = fast.convert_tokens_to_ids("<|im_end|>"), fast.convert_tokens_to_ids("<|endoftext|>")
    cfg = config_cls(vocab_size=len(fast), **{positions: max_positions}, **kwargs, eos_token_id=eos,
                     bos_token_id=bos, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(path))
    return path


def build_random_model_dir(path: str | Path, tokenizer_dir: str | Path, *, hidden: int, layers: int, heads: int,
                           kv_heads: int, intermediate: int, max_positions: int = 8192, dtype: str = "bfloat16",
                           device: str = "cpu", seed: int = 0) -> Path:
    """A randomly initialised Llama of a given shape with a real tokenizer: for *speed* benchmarks of
    model sizes whose weights cannot be downloaded here (timings do not depend on weight values)."""
    path = Path(path)
    refuse_custom_code(tokenizer_dir, "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, rope_theta=100000.0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def full_logits(lm, ids):
    """Next-token logits of a full recompute of ``ids`` (one plain forward, no cache): what a cached
    context must equal."""
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0, -1].float()


def assert_cache_matches_recompute(ctx, atol: float = 1e-4, *, what: str = "") -> float:
    """The cache invariant, one helper for every test: after running any pending token, the cache of
    ``ctx`` holds exactly ``ctx.token_ids`` and its next-token logits equal a full recompute of those ids
    (max absolute difference below ``atol``). ``what`` names the step in the failure message. Returns the
    difference."""
    ctx.flush()
    ids = list(ctx.token_ids)
    prefix = f"{what}: " if what else ""
    assert cache_len(ctx.cache) == len(ids), f"{prefix}the cache holds {cache_len(ctx.cache)} tokens, not {len(ids)}"
    diff = (ctx.next_token_logits() - full_logits(ctx.lm, ids)).abs().max().item()
    assert diff < atol, f"{prefix}cached logits differ from a recompute by {diff:.2e}"
    return diff


def run_in_thread(fn, deadline: float):
    """Run ``fn`` in a daemon thread for at most ``deadline`` seconds: (finished, its value or the exception
    it raised). A call that waits forever fails the test instead of hanging it."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            out["value"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(deadline)
    return (not t.is_alive()), out.get("value")


#: words the scripted documents are made of
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


class ScriptedRetriever:
    """A retriever for tests of the retrieval loop: fresh, distinct documents on every call (the same
    one with ``same=True``), worded by ``text(word, n, other_word)``; it snapshots the context's ids
    at each call, so a test can compute the exact expected cost."""

    def __init__(self, ctx=None, same: bool = False, words: Sequence[str] = WORDS,
                 text: Callable[[str, int, str], str] = lambda w, n, o: f"{w} ZEBRAEVIDENCE {w} note {n}"):
        self.ctx, self.same, self.words, self.text = ctx, same, list(words), text
        self.calls, self.snapshots, self.queries = 0, [], []

    def retrieve(self, query: str, k: int = 2) -> list[Document]:
        self.queries.append(query)
        if self.ctx is not None:
            self.snapshots.append(self.ctx.token_ids)
        out = []
        for j in range(k):
            n = 0 if self.same else self.calls * k + j
            w = self.words[n % len(self.words)]
            out.append(Document(text=self.text(w, n, self.words[(n + 3) % len(self.words)]), id=f"doc{n}",
                                metadata={"source": f"/d/{w}.txt"}))
        self.calls += 1
        return out
