"""The embedded demo model: a tiny, random-weight Llama-style chat model built offline in seconds.

``llm-atc serve --cloud local`` without ``--name`` serves it (as ``llm-atc-demo``), so the whole path
(engine, endpoint, clients) can be tried on a machine without internet access; its replies are
noise, its plumbing is real. The tests and benchmarks use the same model.

The folder written by :func:`build_tiny_model` loads with ``AutoTokenizer`` /
``AutoModelForCausalLM`` (and ``transformers serve`` and vLLM, whose CPU kernels need a head size
of 64) without touching the Hugging Face Hub. It holds a byte-level BPE tokenizer trained on
generated text, a chat template with ``{% generation %}`` markers (so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` works), and a 2-layer
``LlamaForCausalLM`` saved as safetensors.

:func:`build_tiny_encoder` writes a tiny BERT the same way: an embedding model, or a classifier (a
cross-encoder for reranking with one label), for the embedding and rerank paths.

Command line: ``python -m llm_atc.demo OUTDIR``
"""

from __future__ import annotations

import pathlib
import random
import sys

from llm_atc import ui
from llm_atc.paths import home, private_dir

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
VOCAB_SIZE = 512

# Roles are plain-text headers ending in a newline, so byte-level BPE never
# merges header text into the first content token. Assistant content and its
# closing eos are wrapped in generation markers, so the assistant-token mask
# covers exactly what the model is trained to produce.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['role'] + ':\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to and in is it you that he was for on are with as I his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how said "
    "each she which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people my over "
    "know water than call first who may down side been now find model train serve cloud cluster token "
    "system user assistant hello please thanks answer question help data file run job fine tune"
).split()


def _corpus(n_lines: int = 2000, seed: int = 0):
    """Yield deterministic English-ish sentences, including chat-style lines."""
    rng = random.Random(seed)
    for i in range(n_lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
        sentence = words.capitalize() + rng.choice([".", "?", "!", ","])
        yield f"{('system', 'user', 'assistant')[i % 3]}:\n{sentence} {i % 97}\n"


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: pathlib.Path, *, layers: int = 2, hidden_size: int = 128) -> pathlib.Path:
    """Write a tiny chat model (tokenizer + LlamaForCausalLM) into ``path`` and return ``path``.
    ``layers`` and ``hidden_size`` make it bigger (benchmarks); heads stay 64 wide, as vLLM's CPU
    kernels need, and bigger models are saved in bfloat16."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" for a 1 MB model is noise
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    heads = hidden_size // 64
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if hidden_size == 128 else 11 * hidden_size // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 8),
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        **ids,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if hidden_size > 128:
        model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(max_new_tokens=16, do_sample=False, **ids)
    model.save_pretrained(
        path, safe_serialization=True, max_shard_size="300MB"
    )  # big ones in shards, as published models are
    tokenizer.save_pretrained(path)
    return path


def build_tiny_encoder(path: pathlib.Path, *, labels: int | None = None) -> pathlib.Path:
    """Write a tiny BERT into ``path``: an embedding model (``BertModel``), or with ``labels`` a sequence
    classifier (``BertForSequenceClassification``; one label: a cross-encoder for reranking). A WordPiece
    tokenizer trained on generated text; hidden size 128 with 2 heads of 64, as vLLM's CPU kernels need."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    if labels is None:
        model = BertModel(config)
    else:
        config.num_labels = labels
        model = BertForSequenceClassification(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


DEMO_NAME = "llm-atc-demo"  # what clients send as `model`


def demo_model() -> pathlib.Path:
    """The demo model's folder under ``$LLM_ATC_HOME/demo``, built on first use."""

    folder = home() / "demo" / DEMO_NAME
    if not (folder / "model.safetensors").is_file():
        with ui.spinner("Building the demo model (tiny, random weights: its replies are noise)"):
            private_dir(folder.parent)
            partial = folder.with_name(folder.name + ".partial")
            build_tiny_model(partial)
            partial.replace(folder)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m llm_atc.demo OUTDIR")
    print(build_tiny_model(pathlib.Path(sys.argv[1])))
