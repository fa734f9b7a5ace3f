"""Session fixtures shared by every test: a tiny tokenizer trained on the fly, offline."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Mixed Chinese and English text, enough for a tokenizer of a few hundred pieces.
TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Large language models learn from text in many languages.",
    "Translate the following sentence into Chinese.",
    "Human: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "Please summarise the article below in one sentence.",
    "def add(a, b):\n    return a + b",
    "There are 12 apples and 7 oranges, 19 fruits in all.",
    "The weather today is sunny with a light breeze from the west.",
    "Question: who wrote the book? Answer: the author did.",
    "我们今天去公园散步，天气非常好。",
    "大型语言模型可以理解中文和英文。",
    "请把下面的句子翻译成英文。",
    "北京是中国的首都，有着悠久的历史。",
    "小明有十二个苹果，吃掉了三个，还剩九个。",
    "阅读下面的文章，然后回答问题。",
    "人工智能正在改变我们的生活和工作方式。",
    "请用一句话概括这篇新闻的主要内容。",
    "春天来了，花儿都开了，小鸟在树上唱歌。",
] * 20


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    from llama.tiny import train_tokenizer

    return train_tokenizer(TOKENIZER_TEXT, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)


@pytest.fixture(scope="session")
def bpe_tokenizer_dirs(tmp_path_factory) -> dict:
    """Tiny byte-level BPE tokenizers of the tokenizer.json families, trained on TOKENIZER_TEXT once per session
    (llama.tiny.train_bpe_tokenizer, 600 tokens: a few hundred merges): {family: dir}, each dir holding
    tokenizer.json, tokenizer_config.json and special_tokens_map.json as a transformers model dir does.
      "llama3"           <|begin_of_text|> added before every text, eos <|end_of_text|>
      "llama3-instruct"  the same tokenizer, eos <|eot_id|> and Llama 3's chat template
      "qwen2"            no bos, eos <|im_end|>, pad <|endoftext|>, NFC, ChatML template
      "smollm2"          no bos added (bos_token <|im_start|> is only named), eos <|im_end|>, specials at ids 0-2
    Shared: write model files elsewhere (llama.tiny.make_tiny_model(out_dir, dir) copies the tokenizer files)."""
    from llama.tiny import BPE_FAMILIES, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("bpe")
    return {family: train_bpe_tokenizer(TOKENIZER_TEXT, root / family, family).parent for family in BPE_FAMILIES}


@pytest.fixture(scope="session")
def templated_tokenizers(bpe_tokenizer_dirs, tokenizer_path, tmp_path_factory):
    """templated_tokenizers(name, template) -> (llama.load_tokenizer's, transformers' AutoTokenizer) of the session
    tokenizer `name` (a bpe_tokenizer_dirs family, or "sentencepiece" for tokenizer_path) saved with that chat
    template (tests/chat_tokenizers.py)."""
    from chat_tokenizers import TemplatedTokenizers

    return TemplatedTokenizers({**bpe_tokenizer_dirs, "sentencepiece": tokenizer_path}, tmp_path_factory)
