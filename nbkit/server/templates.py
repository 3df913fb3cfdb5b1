"""Kept for imports from before the move: the prompt code lives in nbkit.chat_format."""

from ..chat_format import chat_prompt_ids, special_strings

__all__ = ["chat_prompt_ids", "special_strings"]
