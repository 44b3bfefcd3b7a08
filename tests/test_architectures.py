"""The architecture matrix: every family the README's "any Hugging Face causal LM" promise covers,
as tiny random models built here from their config classes (no download, seconds each).

For each: ``CachedContext`` logits equal a full recompute after a random sequence of append / sync /
rollback / fork / generate / save-load; ``ChatEngine`` turns compute exactly the new tokens (counted
at the model's forward, not from our own counters); the trainer's default LoRA targets resolve and
a 3-step run trains; ``on_overflow="shift"`` refuses models without rotary positions. The families
differ where caches break: attention biases (Qwen2), q/k norms (Qwen3), sliding windows (Mistral,
Gemma 2/3: a window of 8 tokens, crossed here), soft-capping (Gemma 2), RoPE base per layer type
(Gemma 3), fused QKV (Phi-3, GPT-2,
GPT-NeoX), learned absolute positions (GPT-2, OPT), partial rotary (GPT-NeoX), and recurrent / conv
state that cannot be cropped (Qwen3-Next, LFM2: restarted from state checkpoints, counted).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from flashback_agents import kvcache
from flashback_agents.context import CachedContext, ContextError
from flashback_agents.testing import TINY_ARCHS, assert_cache_matches_recompute, build_tiny_arch_dir

ARCHS = list(TINY_ARCHS)
HYBRID = {"qwen3_next", "lfm2"}  # recurrent (gated delta net) / short-conv layers + attention
NO_ROPE = {"gpt2", "opt"}
EXPECTED_TARGETS = {"phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"]}
ATOL = 1e-4

_DIRS: dict[str, object] = {}


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    def get(arch: str):
        if arch not in _DIRS:
            _DIRS[arch] = build_tiny_arch_dir(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return _DIRS[arch]
    return get


def _load(path):
    from flashback_agents import load_model

    return load_model(str(path), device="cpu", adapter=None)


@pytest.fixture(scope="module")
def lms(arch_dir):
    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = _load(arch_dir(arch))
        return cache[arch]
    return get


# ----------------------------------------------------------------------------- the cache

@pytest.mark.parametrize("arch", ARCHS)
def test_random_operations_equal_recompute(arch, lms, tmp_path):
    lm = lms(arch)
    rng = random.Random(hash(arch) % 1000)
    words = ["ERROR disk full", " the fox", " port 8080", " user asks", "\n2024-01-01 INFO", " tools"]
    ctx = CachedContext(lm, prefill_chunk=rng.choice([5, 7, 512]))
    ctx.append(lm.encode("The quick brown fox jumps over the lazy dog."))
    assert_cache_matches_recompute(ctx, ATOL, what="first append")
    for step in range(18):
        op = rng.choice(["append", "evidence", "sync", "rollback", "fork", "generate", "save"])
        if len(ctx) > 220:
            op = "rollback"
        if op == "append":
            ctx.append(rng.choice(words) * rng.randint(1, 3))
        elif op == "evidence":
            ctx.append_evidence(rng.choice(words), source="log")
        elif op == "sync":  # rewrite the tail: keep a prefix, then new tokens
            keep = rng.randint(1, len(ctx))
            ctx.sync(ctx.token_ids[:keep] + lm.encode(rng.choice(words)))
        elif op == "rollback":
            ctx.rollback(rng.randint(0, len(ctx) - 1))
        elif op == "fork":
            ctx = ctx.fork_prefix(rng.randint(1, len(ctx))) if rng.random() < 0.5 else ctx.fork()
        elif op == "generate":
            for _ in range(rng.randint(1, 6)):
                ctx.push_generated(int(ctx.next_token_logits().argmax()))
        else:
            ctx.save(tmp_path / "ctx.pt")
            ctx = CachedContext.load(lm, tmp_path / "ctx.pt")
        assert_cache_matches_recompute(ctx, ATOL, what=f"step {step} ({op})")
    if arch not in HYBRID:
        assert ctx.stats.tokens_recomputed == 0  # plain and sliding caches crop exactly


def test_sliding_window_layers_keep_every_token(lms):
    """Mistral / Gemma 2 sliding layers hold all tokens (croppable); the mask still applies the window."""
    for arch in ("mistral", "gemma2", "gemma3"):
        lm = lms(arch)
        ctx = CachedContext(lm)
        ctx.append(lm.encode("2024-01-01 12:00:00 INFO server started on port 8080 " * 3))
        assert len(ctx) > 3 * 8
        assert all(layer.keys.shape[-2] == len(ctx) for layer in ctx.cache.layers)
        ctx.rollback(len(ctx) - 5)  # back inside the first window: impossible with a window-sized cache
        assert ctx.stats.tokens_recomputed == 0
        assert_cache_matches_recompute(ctx, ATOL, what=f"{arch} rollback past the window")
        # the window matters: the model's logits do depend on it (a full-attention mask would differ)
        assert lm.model.config.sliding_window == 8


def test_hybrid_rewrite_restarts_from_the_last_checkpoint(lms):
    """A rewrite of the last message recomputes only from the checkpoint at the previous message end.

    The prompt is synced in one call (as the chat engine does); checkpoints are taken inside it, after
    each end-of-turn token, so the boundary of each message is one token (its trailing newline)
    before the next message.
    """
    for arch in sorted(HYBRID):
        lm = lms(arch)
        ctx = CachedContext(lm)
        m1 = lm.encode("<|im_start|>system\nYou analyse logs.<|im_end|>\n")
        m2 = lm.encode("<|im_start|>user\nCount the errors.<|im_end|>\n")
        m3 = lm.encode("<|im_start|>assistant\nThere are three errors")
        ctx.sync(m1 + m2 + m3)
        cps = [cp.length for cp in kvcache._checkpoints(ctx.cache)]
        assert cps == [len(m1) - 1, len(m1 + m2) - 1, len(m1 + m2 + m3)]
        assert kvcache.checkpoint_nbytes(ctx.cache) > 0 and ctx.nbytes > kvcache.checkpoint_nbytes(ctx.cache)
        shared = 4  # the rewrite keeps the first 4 tokens of the last message
        rewrite = m3[:shared] + lm.encode(" two warnings.")
        assert m3[shared] != rewrite[shared]
        r = ctx.sync(m1 + m2 + rewrite)
        assert ctx.stats.tokens_recomputed == 1 + shared  # from the end of m2, not from token 0
        assert (r.reused, r.computed) == (len(m1 + m2) - 1, 1 + len(rewrite))  # the sync result says so
        assert_cache_matches_recompute(ctx, ATOL, what=f"{arch} rewrite")
        ctx.rollback(len(ctx) - len(m1) - 2)  # into m2: back to the checkpoint at the end of m1
        assert ctx.stats.tokens_recomputed == 1 + shared + 3
        assert_cache_matches_recompute(ctx, ATOL, what=f"{arch} rollback")
        fork = ctx.fork_prefix(len(m1) + 1)
        assert fork.stats.tokens_recomputed == 2
        assert_cache_matches_recompute(fork, ATOL, what=f"{arch} fork")
        ctx.rollback(len(ctx) - 3)  # before the first checkpoint: from token 0, still exact
        assert_cache_matches_recompute(ctx, ATOL, what=f"{arch} rollback to the start")


# ----------------------------------------------------------------------------- the chat engine

class _ForwardCounter:
    """Counts the tokens the model actually runs (a forward pre-hook): the ground truth for reuse."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.tokens += int(ids.shape[-1])

    def take(self) -> int:
        n, self.tokens = self.tokens, 0
        return n


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_engine_turns_compute_only_new_tokens(arch, lms):
    from flashback_agents.engines import local_engine
    from flashback_agents.generation import GenerationConfig
    from flashback_agents.layout import Message

    lm = lms(arch)
    engine = local_engine(lm)
    counter = _ForwardCounter(lm.model)
    try:
        msgs = [Message("system", "You analyse logs."), Message("user", "Count the errors.")]
        prev = None
        for turn, question in enumerate(["And warnings?", "Which component?", "Thanks."]):
            counter.take()
            r = engine.chat(msgs, config=GenerationConfig(max_new_tokens=5))
            ran = counter.take()
            assert r.usage.cache_read + r.usage.computed == r.usage.input_tokens
            if prev is not None:
                # everything sent and generated before is reused (after an EOS, the EOS re-renders as the turn end)
                held = prev.usage.input_tokens + prev.usage.output_tokens
                assert r.usage.cache_read == held if prev.finish_reason == "length" else r.usage.cache_read >= held - 1
            # the model ran exactly: the new prompt tokens, the previous turn's last generated token (it
            # stays pending until the next call), the tokens generated now but the last one, and the
            # speculative drafts that were rejected (greedy decoding speculates by default)
            pending_before = 1 if prev is not None and prev.finish_reason == "length" else 0
            rejected = r.usage.drafted - r.usage.accepted
            assert ran == r.usage.computed + pending_before + r.usage.output_tokens - 1 + rejected, (turn, ran, r.usage)
            msgs = msgs + [Message("assistant", r.text, tool_calls=r.tool_calls), Message("user", question)]
            prev = r
    finally:
        counter.handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_engine_rewritten_last_message_restarts_at_the_previous_one(arch, lms):
    """A framework that edits the last user message: the model re-runs that message only (hybrids:
    from the checkpoint at the end of the system block, one token earlier), and usage says so."""
    from flashback_agents.engines import local_engine
    from flashback_agents.generation import GenerationConfig
    from flashback_agents.layout import Message

    lm = lms(arch)
    engine = local_engine(lm)
    system = Message("system", "You analyse logs.")
    first = engine.layout.render([system, Message("user", "Count the errors.")])
    held = first.index(lm.tokenizer.convert_tokens_to_ids("<|im_end|>")) + 2  # the system block, its newline too
    counter = _ForwardCounter(lm.model)
    try:
        engine.chat([system, Message("user", "Count the errors.")], config=GenerationConfig(max_new_tokens=3))
        counter.take()
        r = engine.chat([system, Message("user", "Count the warnings.")], config=GenerationConfig(max_new_tokens=3))
        ran = counter.take()
    finally:
        counter.handle.remove()
    assert ran == r.usage.computed + r.usage.output_tokens - 1  # usage counts what really ran
    reuse_floor = held - 1 if arch in HYBRID else held
    assert reuse_floor <= r.usage.cache_read < r.usage.input_tokens


# ----------------------------------------------------------------------------- training

def _conversations(n: int = 6) -> list[dict]:
    """Short OpenAI-style agent conversations: a tool call, its result, an answer."""
    out = []
    for i in range(n):
        call = {"id": f"c{i}", "type": "function",
                "function": {"name": "add", "arguments": json.dumps({"a": i, "b": i + 1})}}
        out.append({"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                                 {"role": "assistant", "content": None, "tool_calls": [call]},
                                 {"role": "tool", "tool_call_id": f"c{i}", "content": str(2 * i + 1)},
                                 {"role": "assistant", "content": f"The answer is {2 * i + 1}."}]})
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_default_lora_targets_and_a_short_train_run(arch, arch_dir, tmp_path):
    pytest.importorskip("peft")
    from flashback_agents.training import (
        TrainConfig,
        conversation_samples,
        parse_conversation,
        train,
    )
    from flashback_agents.training.trainer import default_lora_targets

    lm = _load(arch_dir(arch))  # the trainer wraps the model in place: a fresh load
    targets = default_lora_targets(lm.model)
    assert targets == EXPECTED_TARGETS.get(arch, ["k_proj", "v_proj"])
    convs = [parse_conversation(c, source=f"c{i}") for i, c in enumerate(_conversations())]
    samples, _ = conversation_samples(lm, convs, max_length=256)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    config = TrainConfig(model=str(arch_dir(arch)), output_dir=str(tmp_path / "run"), steps=3, batch_size=2,
                         learning_rate=1e-2, eval_every=0, save_every=0, progress=False)
    result = train(config, samples, [], lm=lm)
    assert result.finished and len(result.train_loss) == 3
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.train_loss)
    meta = json.loads((tmp_path / "run" / "flashback_adapter.json").read_text())
    assert meta["target_modules"] == targets
    lora = [n for n, p in result.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(any(t in n for t in targets) for n in lora)
    frozen = [n for n, p in result.model.named_parameters() if not p.requires_grad and "base_layer" not in n
              and n.replace("base_model.model.", "") in before]
    assert frozen  # the rest is untouched
    for n in frozen[:5]:
        assert torch.equal(dict(result.model.named_parameters())[n], before[n.replace("base_model.model.", "")])


# ----------------------------------------------------------------------------- on_overflow="shift"

@pytest.mark.parametrize("arch", ARCHS)
def test_shift_needs_rotary_positions(arch, lms):
    lm = lms(arch)
    if arch in NO_ROPE or arch in HYBRID:
        with pytest.raises(ContextError, match="on_overflow='shift' does not work with this model"):
            CachedContext(lm, max_context_tokens=64, on_overflow="shift")
        CachedContext(lm, max_context_tokens=64, on_overflow="evict")  # the advised alternative works
        return
    CachedContext(lm, max_context_tokens=64, on_overflow="shift")
    # rope_shift_keys is exact on the first layer (keys depend only on the token and its position),
    # including partial rotary (GPT-NeoX rotates a quarter of each head)
    tail = lm.encode(" ERROR disk full on port 8080")
    a, b = CachedContext(lm), CachedContext(lm)
    a.append(lm.encode("The quick brown fox jumps") + tail)
    b.append(lm.encode("The quick") + tail)
    delta = len(b) - len(a)
    ka = kvcache.layer_tensors(a.cache)[0][0][..., -len(tail):, :]
    kb = kvcache.layer_tensors(b.cache)[0][0][..., -len(tail):, :]
    shifted = kvcache.rope_shift_keys(lm.model, ka, delta, layer_idx=0)
    assert (shifted - kb).abs().max().item() < 1e-4
    if arch == "gemma3":  # layer 0 is a sliding layer with its own RoPE base: the global one would be wrong
        wrong = kvcache.rope_shift_keys(lm.model, ka, delta, layer_idx=1)
        assert (wrong - kb).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_evict_compaction_stays_exact(arch, lms):
    """on_overflow="evict" (every architecture): old tool results become stubs, the tail is recomputed
    (hybrids: from the state checkpoint before the first evicted block), logits equal a recompute."""
    lm = lms(arch)
    ctx = CachedContext(lm, max_context_tokens=360, on_overflow="evict")
    ctx.append(lm.encode("<|im_start|>user\nCount the errors.<|im_end|>\n"))
    for i in range(6):
        ctx.append_evidence(f"2024-01-0{i + 1} 12:00:0{i} ERROR disk full on port 808{i}\n" * 6, source="app.log")
        ctx.append(lm.encode(f" step {i}"))
    assert ctx.stats.compactions >= 1 and len(ctx) <= 360
    assert_cache_matches_recompute(ctx, ATOL, what=f"{arch} after eviction")
