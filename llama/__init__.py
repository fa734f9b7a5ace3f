"""The LLaMA model family in MetaAI's layout: config, model, tokenizer, generation, conversion. Knows nothing of
training."""
from llama.configuration_llama import LlamaConfig
from llama.generation import generate, stream
from llama.llama_model import Llama
from llama.tokenization_llama import SentencePieceTokenizer
from llama.tokenizer import Tokenizer, check_tokenizer_matches
from llama.tokenizer_files import load_tokenizer
from llama.tokenizer_json import TokenizerJson

__all__ = ["LlamaConfig", "Llama", "Tokenizer", "SentencePieceTokenizer", "TokenizerJson", "generate", "stream",
           "check_tokenizer_matches", "load_tokenizer"]
