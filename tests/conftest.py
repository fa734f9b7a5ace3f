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
