"""The T5 model: config, modules, Hugging Face checkpoint I/O. Never imports DeepSpeed or data code."""
from .hf_checkpoint import from_pretrained, hf_state_dict, load_hf_state_dict, save_pretrained
from .config import PRESETS, T5Config
from .t5 import Seq2SeqLMOutput, T5ForConditionalGeneration

__all__ = ["PRESETS", "T5Config", "T5ForConditionalGeneration", "Seq2SeqLMOutput", "from_pretrained",
           "save_pretrained", "hf_state_dict", "load_hf_state_dict"]
