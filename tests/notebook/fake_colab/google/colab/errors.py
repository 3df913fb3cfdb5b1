class Error(Exception):
    """Base of Colab's errors (huggingface_hub catches it around userdata.get)."""
