"""The word-level tokenizer of the tests' tiny models ("w3" .. "w{V-1}" plus <unk> <s> </s>). Its own module,
free of test-only imports, so benchmarks/gpu_check_helper.py builds the same models on a bare GPU machine."""

from __future__ import annotations


def word_level_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
