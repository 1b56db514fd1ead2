"""Helpers for the edit-engine tests: tiny randomly initialised models of every supported
architecture and a tiny word-level tokenizer. No download."""

from __future__ import annotations

import pytest
import torch

WORDS = ("the a is in of city located Eiffel Tower Louvre Paris Rome London Berlin Madrid "
         "Colosseum Big Ben can be found capital France Italy Germany Spain speaks language "
         "Danielle Darrieux mother tongue French English German Toko Yasuda plays piano guitar "
         "and it was . , : ; who what where when".split())
VOCAB = ["<unk>", "<|endoftext|>", "<pad>"] + sorted(set(WORDS))


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|endoftext|>")


V = 64  # vocabulary size of the tiny models (>= len(VOCAB))


def tiny_configs() -> dict:
    import transformers as T

    # initializer_range 0.1: large enough that a residual delta can move the tiny model's output
    common = dict(vocab_size=V, bos_token_id=1, eos_token_id=1, pad_token_id=2, initializer_range=0.1)
    llama_like = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    return {
        "llama": T.LlamaConfig(**llama_like),
        "mistral": T.MistralConfig(**llama_like),
        "qwen2": T.Qwen2Config(**llama_like),
        "qwen3": T.Qwen3Config(head_dim=8, **llama_like),
        "gemma3_text": T.Gemma3TextConfig(head_dim=8, **llama_like),
        "gpt2": T.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **common),
        "gptj": T.GPTJConfig(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=128, **common),
        "gpt_neox": T.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                    num_attention_heads=4, max_position_embeddings=128, **common),
    }


def tiny_model(kind: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_configs()[kind], dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def word_corpus(n_words: int = 1500, seed: int = 0) -> str:
    """Seeded random text over the tiny tokenizer's words (a C0 corpus for the tiny models)."""
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def save_tiny_model_dir(d, kind: str = "llama", seed: int = 0, corpus_words: int | None = 1500):
    """Save a tiny model and its tokenizer as a local Hugging Face directory `d`, with a
    `corpus.txt` of `corpus_words` words inside (none when None). Returns `d`."""
    from pathlib import Path

    d = Path(d)
    tiny_model(kind, seed=seed).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    if corpus_words is not None:
        (d / "corpus.txt").write_text(word_corpus(corpus_words))
    return d


def tiny_lm(kind: str = "llama", seed: int = 0):
    from kledger.edit.spec import spec_for
    from kledger.edit.weights import LoadedModel

    model = tiny_model(kind, seed)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), spec=spec_for(model), name=f"tiny-{kind}")


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
    pool's contention makes them many times slower. Real-model tests keep the default."""
    if request.node.get_closest_marker("real"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# (prompt, subject, new object) facts the tiny tokenizer covers, for ledger tests on tiny models
FACTS = [
    ("the Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
    ("the Louvre is located in the city of", "Louvre", "Berlin"),
    ("the Colosseum is located in the city of", "Colosseum", "London"),
    ("Big Ben is located in the city of", "Big Ben", "Madrid"),
    ("Danielle Darrieux speaks the language", "Danielle Darrieux", "English"),
    ("Toko Yasuda plays the", "Toko Yasuda", "guitar"),
    ("the capital of France is", "France", "Rome"),
    ("the capital of Italy is", "Italy", "Paris"),
    ("the capital of Germany is", "Germany", "Madrid"),
    ("the capital of Spain is", "Spain", "Berlin"),
]
# three of them, and hyper-parameters that keep a tiny model's edits quick: what the tests of the
# apply paths, remotes, scale-out, split models and adapters build their ledgers from
THREE_FACTS = [FACTS[0], FACTS[1], FACTS[6]]
TINY_HPARAMS = {"c0_tokens": 1200, "c0_seq_len": 64, "steps": 4, "n_prefixes": 1, "lam": 5.0}
