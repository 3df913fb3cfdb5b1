"""GGUF files: building llama.cpp (build.py), loading its bindings (bindings.py), converting and quantizing models
(convert.py), finding them (files.py)."""
