"""Notebook-side helpers: llama.cpp build, GGUF conversion, hub downloads, tunnels, chat widgets."""
