"""GGUF files: building llama.cpp (build.py), converting and quantizing models (convert.py), finding them (files.py)."""
