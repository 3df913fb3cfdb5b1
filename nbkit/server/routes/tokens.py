"""The tokenizer over HTTP, as llama-server and vLLM serve it: `POST /tokenize`, `POST /detokenize`.

Same key as generation (the Guard covers every route). Text is decoded as the generation routes decode
their output (special tokens skipped), so `detokenize(ids)` is the text a request with those ids returns.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from ..errors import APIError
from ..schemas import OpenAIError
from ..schemas_ops import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, TokenPiece
from ..service import Service, get_service

# Errors in OpenAI's shape, as llama-server answers them on these routes (errors.OPENAI_PATHS).
router = APIRouter(tags=["tokenizer"],
                   responses={code: {"model": OpenAIError} for code in (400, 401, 413, 429, 500, 503)})


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, svc: Service = Depends(get_service)):
    """`{"content": text}` (llama-server) or `{"prompt": text}` (vLLM) -> `{"tokens": [ids]}`. BOS is added
    with `add_special: true` (llama-server's default is false) or `add_special_tokens` (vLLM's default true)."""
    tokenizer = svc.ready().tokenizer
    if (body.content is None) == (body.prompt is None):
        raise APIError(None, "send the text as content (or vLLM's prompt), one of them", param="content")
    if body.add_special is not None and body.add_special_tokens is not None:
        raise APIError(None, "send add_special or add_special_tokens, not both", param="add_special")
    if body.content is not None:
        text, special = body.content, bool(body.add_special)
    else:
        text, special = body.prompt, body.add_special_tokens is not False
    ids = await run_in_threadpool(_encode, tokenizer, text, special)
    _, total = svc.limits()
    tokens = ids
    if body.with_pieces:
        tokens = [TokenPiece(id=i, piece=p) for i, p in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)]
    return TokenizeResponse(tokens=tokens, count=len(ids), max_model_len=total)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, svc: Service = Depends(get_service)):
    """`{"tokens": [ids]}` -> `{"content": text}` (and vLLM's `prompt`, the same text)."""
    tokenizer = svc.ready().tokenizer
    _, total = svc.limits()
    if total is not None and len(body.tokens) > total:
        raise APIError(None, f"{len(body.tokens)} tokens; at most {total} (the context length) are allowed",
                       param="tokens")
    svc.check_token_ids(body.tokens, param="tokens")
    text = await run_in_threadpool(tokenizer.decode, body.tokens, skip_special_tokens=True)
    return DetokenizeResponse(content=text, prompt=text)


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return list(ids)
