"""The T5 model: config, modules, Hugging Face checkpoint I/O. Never imports DeepSpeed or data code."""
