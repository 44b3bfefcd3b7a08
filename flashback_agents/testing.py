"""A tiny randomly initialised Llama-family model for tests (built in seconds, fully offline)."""

from __future__ import annotations

from pathlib import Path

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


def build_tiny_model_dir(path: str | Path, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                         heads: int = 4, kv_heads: int = 2, max_positions: int = 512, seed: int = 0) -> Path:
    """Write a tiny random Llama + byte-level BPE tokenizer (ChatML template) to ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
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
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
                      bos_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(path))
    return path


def build_random_model_dir(path: str | Path, tokenizer_dir: str | Path, *, hidden: int, layers: int, heads: int,
                           kv_heads: int, intermediate: int, max_positions: int = 8192, dtype: str = "bfloat16",
                           device: str = "cpu", seed: int = 0) -> Path:
    """A randomly initialised Llama of a given shape with a real tokenizer: for *speed* benchmarks of
    model sizes whose weights cannot be downloaded here (timings do not depend on weight values)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
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
