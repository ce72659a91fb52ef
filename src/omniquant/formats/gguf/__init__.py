"""GGUF, the one-file format llama.cpp and Ollama run: the writer (`writer`), the tokenizer
vocabulary (`vocab`) and the RoPE scaling (`rope`), all from the learned grids."""
